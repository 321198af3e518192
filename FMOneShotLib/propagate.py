"""Propagation through a volume: SAM 2's video predictor carries masks from seed slices to their neighbours.

The slices of a volume, in order, are the frames of a video (the approach of MedSAM2 and of SAM 2's authors
for 3D images). From each label's seed slice, SAM 2's video predictor (``sam2.sam2_video_predictor``:
``init_state``, ``add_new_mask``, ``propagate_in_video`` forward, then in reverse) predicts the label on every
neighbouring slice from its memory of the slices before it, in both directions, and stops where the
structure ends (:func:`structure_ended`). The chain's own findings and the propagated masks are then
reconciled per slice by :func:`reconcile`.

Shapes: a volume of N slices of (H, W) pixels in [0, 1]; masks (H, W) bool; labels are indices 0 .. L-1 of
the template's labels.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch

from . import models

# A propagated label has ended on the first slice beyond its seeds whose mask is smaller than this fraction
# of the seed's mask (the chain's own rule for a detection too small to be the structure: min_area_fraction).
STOP_FRACTION = 0.03


def structure_ended(area: float, seed_area: float, stop_fraction: float = STOP_FRACTION) -> bool:
    """Whether a propagated mask of ``area`` pixels means the structure has ended: below ``stop_fraction`` of
    the seed mask's ``seed_area`` (an empty mask, SAM 2's answer when its object score says "absent", always
    is)."""
    return area <= 0 or area < stop_fraction * seed_area


class _Frames:
    """The slices as SAM 2's video frames, prepared on demand exactly as ``sam2.utils.misc.load_video_frames``
    prepares JPEG frames (RGB uint8, PIL resize to image_size x image_size, / 255, ImageNet mean and std),
    so that the volume is never written to lossy JPEG files nor held at 1024 x 1024 in memory as a whole."""

    MEAN = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
    STD = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]

    def __init__(self, image_at: Callable[[int], np.ndarray], n_slices: int, image_size: int):
        self.image_at, self.n, self.size = image_at, n_slices, image_size
        self.encoded = []  # slice indices in the order SAM 2 asked for them (each costs one encoder pass)

    def __len__(self):
        return self.n

    def __getitem__(self, z):
        from PIL import Image

        from .segmenters import to_rgb8

        self.encoded.append(int(z))
        rgb = np.array(Image.fromarray(to_rgb8(self.image_at(int(z)))).resize((self.size, self.size)))
        frame = torch.from_numpy(rgb / 255.0).permute(2, 0, 1).float()
        return (frame - self.MEAN) / self.STD


@contextlib.contextmanager
def _frames_from(frames: _Frames, height: int, width: int):
    """While it lasts, SAM 2's ``init_state`` reads its video from ``frames`` instead of a folder of JPEG
    files, and ``propagate_in_video`` draws no console progress bar of its own (the chain reports progress)."""
    import sam2.sam2_video_predictor as vp

    saved = vp.load_video_frames, vp.tqdm
    vp.load_video_frames = lambda **_: (frames, height, width)
    vp.tqdm = lambda iterable, **_: iterable
    try:
        yield
    finally:
        vp.load_video_frames, vp.tqdm = saved


class Propagator:
    """SAM 2's video predictor over the slices of one volume (Ravi et al. 2024; ``SAM2VideoPredictor``).

    ``model``, ``weights``, ``overrides``: as :func:`models.sam2` (the segmenter's own: see
    ``Sam2Segmenter.propagator``). ``stop_fraction``: :func:`structure_ended`.
    """

    def __init__(self, model: str = "tiny", weights: str = "pretrained", device: str = "cpu",
                 precision: str = "fp32", overrides: dict | None = None, stop_fraction: float = STOP_FRACTION):
        self.device, self.precision, self.stop_fraction = device, precision, stop_fraction
        self.predictor = models.sam2(model, weights, overrides, video=True).to(device)
        self.encoded: list = []  # the slices the last run encoded, in order
        self.seconds = 0.0

    def run(self, image_at: Callable[[int], np.ndarray], n_slices: int, seeds: dict) -> dict:
        """Propagate ``seeds`` ({label: (slice, (H, W) bool mask)}) through the slices 0 .. n_slices - 1,
        ``image_at(z)`` giving slice z as (H, W) in [0, 1].

        All labels are tracked together (one encoding of a slice serves them all): forward from the first
        seed slice to the end, then in reverse from the last seed slice to the start (SAM 2's
        ``propagate_in_video``); a label stops in a direction on the first slice beyond its seed where
        :func:`structure_ended`, and the propagation stops when every label has. On a slice visited by both
        passes (between two labels' seeds) the reverse pass's mask is kept, as in SAM 2's own examples.

        Returns {(slice, label): ((H, W) bool mask, score)}, score the mean SAM 2 probability (sigmoid of the
        mask logits) inside the mask; the seed slices included, slices where the label ended excluded.
        """
        if not seeds:
            return {}
        t0 = time.perf_counter()
        height, width = np.asarray(seeds[next(iter(seeds))][1]).shape
        frames = _Frames(image_at, n_slices, self.predictor.image_size)
        out = {}
        with torch.inference_mode(), models.autocast(self.device, self.precision), \
                _frames_from(frames, height, width):
            state = self.predictor.init_state(video_path="", offload_video_to_cpu=True, offload_state_to_cpu=True)
            seed_area = {}
            for label, (z, mask) in seeds.items():
                self.predictor.add_new_mask(state, int(z), label, np.asarray(mask, bool))
                seed_area[label] = float(np.asarray(mask).sum())
            first = {label: int(z) for label, (z, _) in seeds.items()}
            for reverse in (False, True):
                start = max(first.values()) if reverse else min(first.values())
                active = set(seeds)
                for z, ids, logits in self.predictor.propagate_in_video(state, start_frame_idx=start,
                                                                        reverse=reverse):
                    for k, label in enumerate(ids):
                        if label not in active:
                            continue
                        logit = logits[k, 0].float().cpu()
                        mask, prob = (logit > 0).numpy(), torch.sigmoid(logit).numpy()
                        beyond = z < first[label] if reverse else z > first[label]
                        if beyond and structure_ended(mask.sum(), seed_area[label], self.stop_fraction):
                            active.discard(label)
                            continue
                        out[(z, label)] = (mask, float(prob[mask].mean()) if mask.any() else 0.0)
                    if not active:
                        break
        self.encoded = frames.encoded
        self.seconds += time.perf_counter() - t0
        return out


def seeds_of(labels: np.ndarray, values: list, present: np.ndarray, confidence: np.ndarray) -> dict:
    """Each label's seed: the slice where the chain found it with the highest confidence, and its mask there.
    ``labels`` (N, H, W) label values, ``present`` and ``confidence`` (N, L). Labels found nowhere have none."""
    seeds = {}
    for i, value in enumerate(values):
        if present[:, i].any():
            z = int(np.argmax(np.where(present[:, i], confidence[:, i], -np.inf)))
            seeds[i] = (z, labels[z] == value)
    return seeds


def reconcile(labels: np.ndarray, present: np.ndarray, confidence: np.ndarray, values: list,
              propagated: dict, seeds: dict) -> None:
    """Merge the chain's findings with the propagated masks, in place. Per label with a seed:

    * the propagated slices are the label's extent (from its seed to where :func:`structure_ended`);
    * inside it, a slice where the chain found the label keeps the chain's mask (the adapter and the
      segmenter saw that slice); a slice where it did not gets the propagated mask, on pixels no other
      label holds, with the propagation's score as its confidence;
    * outside it, the chain's detections of the label are removed: SAM 2 followed the structure from its
      most confident slice and saw it end before them.

    ``labels`` (N, H, W) label values, ``present`` / ``confidence`` (N, L), ``propagated`` as
    :meth:`Propagator.run` returns it, ``seeds`` as :func:`seeds_of`.
    """
    for i, value in enumerate(values):
        if i not in seeds:
            continue
        extent = {z for (z, label), (mask, _) in propagated.items() if label == i and mask.any()}
        extent.add(seeds[i][0])
        for z in np.flatnonzero(present[:, i]):
            if int(z) not in extent:
                labels[z][labels[z] == value] = 0
                present[z, i], confidence[z, i] = False, 0.0
        for z in sorted(extent):
            if present[z, i]:
                continue
            mask, score = propagated[(z, i)]
            free = mask & (labels[z] == 0)
            if free.any():
                labels[z][free] = value
                present[z, i], confidence[z, i] = True, score


def propagate_volume(propagator: Propagator, image_at: Callable[[int], np.ndarray], labels: np.ndarray,
                     present: np.ndarray, confidence: np.ndarray, values: list) -> dict:
    """The chain's hook: seeds from its findings (:func:`seeds_of`), propagation through all N slices of the
    volume (:meth:`Propagator.run`), and :func:`reconcile`, in place. Returns the propagated masks."""
    seeds = seeds_of(labels, values, present, confidence)
    propagated = propagator.run(image_at, labels.shape[0], seeds)
    reconcile(labels, present, confidence, values, propagated, seeds)
    return propagated
