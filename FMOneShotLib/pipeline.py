"""The one-shot chain: fit on the template once, then apply to every slice of any number of target volumes.

For each target slice and label:
  1. features of the slice (batched, at the feature grid), standardised like the template's;
  2. correspondences of the template's positive and negative points (paper A, Eq. 1) with their similarity;
  3. with an adapter (by default, trained on the painted masks or on the masks the segmenter draws from the
     template's clicks): the adapter's probability map localises the
     structure; its largest confident region decides whether the structure is on the slice at all, and
     ten random pixels of it join the corresponding positive points as prompts (paper B);
     without one: the mean similarity of the positive correspondences decides presence;
  4. the segmenter turns the prompts into a mask; overlaps between labels go to the more probable label;
  5. landmarks: the correspondence of every template landmark, in pixels and in mm; with an adapter chosen
     explicitly, the centre of the adapter's localised region of each landmark (paper B) instead;
  Blank slices (one grey value after normalisation: constant, all missing, or wholly outside the window)
  are left empty and give landmarks confidence 0;
  6. after the last slice, a 3D clean-up per label: detections in connected components (over the processed
     slices) smaller than ``minor_components`` of the largest are dropped, and those slices count as empty.

A trained adapter is stored in the template (``template.adapter``), so saving the template after ``fit`` keeps
it, and a later ``fit`` with the same backend and adapter reuses it instead of training again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .adapters import Adapter, adapter_from_state, create_adapter, mask_to_grid, template_views
from .correspond import FeatureStandardizer, correspond, upsample
from .errors import FMOneShotError
from .features import create_extractor, sample_features
from .image import BLANK_SPREAD, Volume, intensity_window, label_volume, normalize
from .postprocess import drop_minor_components, keep_components
from .propagate import propagate_volume
from .segmenters import Segmenter, create_segmenter, resolve_segmenter
from .template import Template
from .threads import small_work


class Cancelled(Exception):
    """Raised inside :meth:`OneShot.apply` when the cancel callback says so; nothing is returned."""


@dataclass
class Landmark:
    name: str
    slice: int
    xy: tuple  # pixel (x, y) on that slice
    physical: tuple  # LPS mm
    confidence: float


@dataclass
class Result:
    """What one target volume gave: label volume, per-slice confidences and prompts, landmarks, timings."""

    labels: Volume
    label_names: list
    confidence: np.ndarray  # (n_slices, n_labels): mean probability / similarity behind each decision
    present: np.ndarray  # (n_slices, n_labels) bool
    prompts: dict = field(default_factory=dict)  # (slice, label) -> (positive (n, 2), negative (m, 2))
    # (slice, label) -> the raw correspondences of the template's positive and negative points (paper A's
    # Acc+ / Acc- are measured on these), on every slice processed, whether the label was found or not.
    matches: dict = field(default_factory=dict)
    landmarks: dict = field(default_factory=dict)  # name -> [Landmark per slice]
    timings: dict = field(default_factory=dict)

    def best_landmarks(self) -> dict:
        """Per landmark, the slice's correspondence with the highest confidence."""
        return {n: max(per_slice, key=lambda lm: lm.confidence) for n, per_slice in self.landmarks.items()}

    label_values: list = field(default_factory=list)
    # The slices that ``confidence``, ``present``, ``prompts`` and landmarks count: slice k is the plane
    # index[slice_axis] == k of the target volume (x=0, y=1, z=2), in the anatomical plane ``orientation``.
    orientation: str = "axial"
    slice_axis: int = 2

    def mask(self, name: str) -> np.ndarray:
        """(z, y, x) bool mask of one label."""
        return self.labels.array == self.label_values[self.label_names.index(name)]


class OneShot:
    """``OneShot(template).fit()`` once, then ``apply(volume)`` for each target volume."""

    def __init__(self, template: Template, backend: str = "offline", adapter: str | None = "auto",
                 segmenter: str | Segmenter = "auto", backend_options: dict | None = None, seed: int = 0,
                 prompt_points: int = 10, min_area_fraction: float = 0.03, min_similarity: float = 0.3,
                 adapter_options: dict | None = None, landmark_radius: float = 2.0,
                 segmenter_options: dict | None = None, minor_components: float = 0.25, propagate: bool = False):
        self.template = template.validate()
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self.adapter_name = adapter
        self.adapter_options = dict(adapter_options or {})
        self.landmark_radius = landmark_radius  # feature cells: the ROI of a landmark for a landmark adapter
        self.landmark_adapter: Adapter | None = None
        self.adapter_reused = False
        if propagate:  # checked before any model is built
            kind = (resolve_segmenter(segmenter, segmenter_options)[0] if isinstance(segmenter, str)
                    else segmenter.name)
            if kind != "sam2":
                raise FMOneShotError(f"Propagation needs the SAM 2 segmenter, not {kind!r}.",
                                     "add --segmenter sam2 (with its weights), or drop --propagate.")
        self.segmenter = (create_segmenter(segmenter, **(segmenter_options or {})) if isinstance(segmenter, str)
                          else segmenter)
        # SAM 2 carries each label from its most confident slice through the volume (propagate.py)
        self.propagator = self.segmenter.propagator() if propagate else None
        self.seed = seed
        self.prompt_points = prompt_points
        self.min_area_fraction = min_area_fraction
        self.min_similarity = min_similarity
        # 3D clean-up: per label, detections in components under this fraction of the largest are dropped
        # (on CHAOS across subjects: empty slices left empty 35% -> 56%, Dice unchanged; docs/results.md)
        self.minor_components = minor_components
        self.extractor = None
        self.adapter: Adapter | None = None
        self.fit_seconds = 0.0

    # ------------------------------------------------------------------ fit
    def _features(self, images: np.ndarray, pixel_spacing) -> torch.Tensor:
        with torch.inference_mode():
            return self.standardizer(self.extractor.extract(images, pixel_spacing))

    def fit(self) -> "OneShot":
        """Features of the template, its queries and masks, and the adapter (trained, or the saved one reused).
        Runs on one PyTorch thread except the model forwards (:mod:`FMOneShotLib.threads`)."""
        with small_work():
            return self._fit()

    def _fit(self) -> "OneShot":
        t0 = time.perf_counter()
        tpl = self.template
        self.extractor = create_extractor(self.backend, **self.backend_options)
        raw = [self.extractor.extract(normalize(s.image, s.window)[None], s.pixel_spacing)[0] for s in tpl.slices]
        self.standardizer = FeatureStandardizer.fit(raw, self.extractor.channel_weights(raw[0].shape[0]))
        std_feats = [self.standardizer(f) for f in raw]
        feats = [self.standardizer.for_similarity(f) for f in std_feats]
        names = tpl.label_names

        def queries(table_name):
            out = {}
            for name in names:
                q = [sample_features(f, getattr(s, table_name)[name], s.image.shape)
                     for s, f in zip(tpl.slices, feats) if len(getattr(s, table_name).get(name, ()))]
                out[name] = torch.cat(q) if q else torch.zeros(0, feats[0].shape[0])
            return out

        self.q_pos, self.q_neg = queries("positive"), queries("negative")
        self.q_landmarks = {}
        for s, f in zip(tpl.slices, feats):
            for name, xy in s.landmarks.items():
                self.q_landmarks.setdefault(name, []).append(sample_features(f, xy[None], s.image.shape))
        self.q_landmarks = {n: torch.cat(q).mean(0, keepdim=True) for n, q in self.q_landmarks.items()}

        # Reference area of each label (mm^2) for the presence decision, from masks or the template clicks.
        # "auto" trains the classification adapter on the painted masks, or on the segmenter's masks from
        # the template's own clicks: on the sample CT, clicks alone gave liver/spleen Dice 0.54/0.50 without
        # an adapter and 0.55/0.73 with one.
        use_adapter = self.adapter_name not in (None, "none") and bool(names)
        self.template_masks = [self._template_masks(s, f) for s, f in zip(tpl.slices, feats)] if names else []
        self.reference_area = {}
        for i, name in enumerate(names):
            areas = [m[i].sum() * s.pixel_spacing[0] * s.pixel_spacing[1]
                     for s, m in zip(tpl.slices, self.template_masks) if m[i].any()]
            self.reference_area[name] = float(np.mean(areas)) if areas else 0.0
        if use_adapter:
            kind = "classification" if self.adapter_name == "auto" else self.adapter_name
            self.adapter = self._saved_adapter(kind)
            self.adapter_reused = self.adapter is not None
            if self.adapter is None:
                self.adapter = self._fit_adapter(kind, std_feats, self.template_masks)
                description, tensors = self.adapter.state()
                tpl.adapter = {"description": description, "backend": self.extractor.settings(), "labels": names}
                tpl.adapter_tensors = tensors
        if self.q_landmarks and self.adapter_name not in (None, "none", "auto"):
            # Landmarks as regions: a disc of landmark_radius feature cells around each landmark is its ROI.
            discs = []
            for s, f in zip(tpl.slices, std_feats):
                (H, W), (h, w) = s.image.shape, f.shape[1:]
                yy, xx = np.mgrid[:H, :W]
                radius = self.landmark_radius * max(H / h, W / w)
                discs.append(np.stack([(xx - s.landmarks[n][0]) ** 2 + (yy - s.landmarks[n][1]) ** 2 <= radius ** 2
                                       if n in s.landmarks else np.zeros((H, W), bool) for n in self.q_landmarks]))
            self.landmark_adapter = self._fit_adapter(self.adapter_name, std_feats, discs)
        self.fit_seconds = time.perf_counter() - t0
        return self

    def _fit_adapter(self, kind: str, std_feats: list, masks: list) -> Adapter:
        """A new adapter trained on the template slices' features and pixel masks (L, H, W) per slice, plus,
        when it augments, the features of every slice's :func:`template_views`."""
        adapter = create_adapter(kind, seed=self.seed, **self.adapter_options)
        feats, pixel_masks = list(std_feats), list(masks)
        if adapter.augment:
            for s, ms in zip(self.template.slices, masks):
                views = template_views(normalize(s.image, s.window), ms)
                feats += list(self._features(np.stack([image for image, _ in views]), s.pixel_spacing))  # one batch
                pixel_masks += [view_masks for _, view_masks in views]
        grids = [np.stack([mask_to_grid(m, f.shape[1:]) for m in ms]) for ms, f in zip(pixel_masks, feats)]
        return adapter.fit(feats, grids)

    def _saved_adapter(self, kind: str) -> Adapter | None:
        """The template's trained adapter when it was trained the same way on the same features, else None."""
        saved = self.template.adapter
        if not saved:
            return None
        # every option, defaults included: an adapter saved under other defaults (an older FMOneShot) retrains
        options = create_adapter(kind, seed=self.seed, **self.adapter_options).options()
        same = (saved["description"].get("adapter") == kind and saved.get("backend") == self.extractor.settings()
                and saved.get("labels") == self.template.label_names
                and saved["description"].get("options") == options)
        return adapter_from_state(saved["description"], self.template.adapter_tensors) if same else None

    def _template_masks(self, s, feats) -> np.ndarray:
        """(L, H, W): the painted mask of each label, else the segmenter's mask from the template's own clicks.
        The positive points of the other labels on the slice are negatives too: they lie in other structures."""
        out = []
        for name in self.template.label_names:
            if name in s.masks and s.masks[name].any():
                out.append(s.masks[name])
            elif len(s.positive.get(name, ())):
                image = normalize(s.image, s.window)
                others = [s.positive[o] for o in s.positive if o != name]
                negative = np.concatenate([s.negative.get(name, np.zeros((0, 2))), *others]).reshape(-1, 2)
                out.append(self.segmenter.segment(image, feats, s.positive[name], negative))
            else:
                out.append(np.zeros(s.image.shape, bool))
        return np.stack(out)

    # ------------------------------------------------------------------ apply
    def apply(self, volume: Volume, progress: Callable | None = None, cancel: Callable | None = None,
              slices=None) -> Result:
        """Run the chain on ``volume`` (all slices, or the indices in ``slices``).

        Slices are taken in the template's plane (``Template.orientation``: for a sagittal template, the
        volume's sagittal slices); the label volume comes back on the volume's own grid.
        ``progress(done, total)`` is called after each slice; ``cancel()`` returning True stops within one
        slice by raising :class:`Cancelled`. Runs on one PyTorch thread except the model forwards
        (:mod:`FMOneShotLib.threads`).
        """
        with small_work():
            return self._apply(volume, progress, cancel, slices)

    def _apply(self, volume: Volume, progress: Callable | None, cancel: Callable | None, slices) -> Result:
        if self.extractor is None:
            self.fit()
        tpl = self.template
        names = tpl.label_names
        L = len(names)
        axis = volume.slice_axis(tpl.orientation)
        source, volume = volume, volume.resliced(axis)
        todo = list(range(volume.n_slices)) if slices is None else [int(z) for z in slices]
        bad = [z for z in todo if not 0 <= z < volume.n_slices]
        if bad:
            raise FMOneShotError(f"Slices {bad} are outside the volume (0 to {volume.n_slices - 1}).",
                                 "choose slices inside the volume.")
        labels = np.zeros(volume.array.shape, np.uint16)
        confidence = np.zeros((volume.n_slices, L))
        present = np.zeros((volume.n_slices, L), bool)
        prompts, matches, landmarks = {}, {}, {n: [] for n in self.q_landmarks}
        timings = {"features": 0.0, "adapter": 0.0, "correspondence": 0.0, "segmenter": 0.0}
        window = intensity_window(volume, tpl.modality or volume.modality)
        spacing = volume.pixel_spacing
        pixel_area = spacing[0] * spacing[1]
        shape = volume.slice_shape
        batch = max(1, self.extractor.batch_size)
        done, blank_slices = 0, set()
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            images = normalize(volume.array[chunk], window)
            t = time.perf_counter()
            std_feats = self._features(images, spacing)
            feats = self.standardizer.for_similarity(std_feats)
            timings["features"] += time.perf_counter() - t
            # the landmark adapter runs once per batch at the grid; its maps are upsampled slice by slice
            lm_grid = None
            if self.landmark_adapter is not None:
                t = time.perf_counter()
                lm_grid = self.landmark_adapter.predict(std_feats)
                timings["adapter"] += time.perf_counter() - t
            probs = None
            if self.adapter is not None:
                t = time.perf_counter()
                probs = upsample(self.adapter.predict(std_feats).reshape(-1, *feats.shape[-2:]), shape)
                probs = probs.reshape(len(chunk), L + 1, *shape).numpy()
                timings["adapter"] += time.perf_counter() - t
            for b, z in enumerate(chunk):
                if cancel is not None and cancel():
                    raise Cancelled(f"cancelled at slice {z}")
                rng = np.random.default_rng(self.seed + z)
                scores = np.full((L,) + shape, -np.inf, dtype=np.float32)
                # a slice of one grey value (constant, all missing, or outside the window) holds nothing
                blank = float(np.ptp(images[b])) <= BLANK_SPREAD
                if blank:
                    blank_slices.add(z)
                for i, name in enumerate(names):
                    if blank:
                        matches[(z, name)] = (np.zeros((0, 2)), np.zeros((0, 2)))
                        continue
                    t = time.perf_counter()
                    pos = correspond(self.q_pos[name], feats[b], shape) if len(self.q_pos[name]) else None
                    neg = correspond(self.q_neg[name], feats[b], shape) if len(self.q_neg[name]) else None
                    timings["correspondence"] += time.perf_counter() - t
                    pos_xy = pos.xy if pos is not None else np.zeros((0, 2))
                    neg_xy = neg.xy if neg is not None else np.zeros((0, 2))
                    matches[(z, name)] = (pos_xy, neg_xy)
                    prior = None
                    if probs is not None:
                        prior = probs[b, i + 1]
                        region = self._region(probs[b], i, pixel_area, name)
                        conf = float(prior[region].mean()) if region.any() else 0.0
                        if not region.any():
                            continue
                        inside = region[np.round(pos_xy[:, 1]).astype(int), np.round(pos_xy[:, 0]).astype(int)] \
                            if len(pos_xy) else np.zeros(0, bool)
                        cells = np.argwhere(region)
                        pick = cells[rng.choice(len(cells), min(self.prompt_points, len(cells)), replace=False)]
                        pos_xy = np.concatenate([pos_xy[inside], pick[:, ::-1].astype(float)])
                        if len(neg_xy):
                            out = ~region[np.round(neg_xy[:, 1]).astype(int), np.round(neg_xy[:, 0]).astype(int)]
                            neg_xy = neg_xy[out]
                    else:
                        conf = float(pos.score.mean()) if pos is not None else 0.0
                        if conf < self.min_similarity:
                            continue
                    t = time.perf_counter()
                    mask = self.segmenter.segment(images[b], feats[b], pos_xy, neg_xy, prior=prior)
                    timings["segmenter"] += time.perf_counter() - t
                    if mask.sum() * pixel_area < self.min_area_fraction * self.reference_area.get(name, 0.0):
                        continue
                    confidence[z, i] = conf
                    present[z, i] = True
                    prompts[(z, name)] = (pos_xy, neg_xy)
                    scores[i][mask] = prior[mask] if prior is not None else conf
                if L:
                    best = scores.argmax(axis=0)
                    hit = np.isfinite(scores.max(axis=0))
                    values = np.array([lb.value for lb in tpl.labels])
                    labels[z][hit] = values[best[hit]]
                if self.q_landmarks:
                    t = time.perf_counter()
                    names_lm = list(self.q_landmarks)
                    c = correspond(torch.cat([self.q_landmarks[n] for n in names_lm]), feats[b], shape,
                                   subpixel=True)  # landmarks do not snap to feature cells
                    lm_probs = None if lm_grid is None else upsample(lm_grid[b], shape).numpy()
                    for k, n in enumerate(names_lm):
                        (x, y), score = c.xy[k], float(c.score[k])
                        if lm_probs is not None:
                            # paper B: the centre of the localised region; the correspondence where none is found
                            region = localised_region(lm_probs, k)
                            if region.any():
                                wts = lm_probs[k + 1][region]
                                ys, xs = np.nonzero(region)
                                x, y = float((xs * wts).sum() / wts.sum()), float((ys * wts).sum() / wts.sum())
                                score = float(wts.mean())
                        score = 0.0 if blank else score
                        landmarks[n].append(Landmark(n, z, (float(x), float(y)),
                                                     tuple(volume.index_to_physical([x, y, z]).tolist()), score))
                    timings["correspondence"] += time.perf_counter() - t
                done += 1
                if progress is not None:
                    progress(done, len(todo))
        self._clean_up_3d(labels, present, confidence, sorted(set(todo) - blank_slices))
        if self.propagator is not None:  # through every slice of the volume, from the labels' best slices
            t = time.perf_counter()
            propagate_volume(self.propagator, lambda k: normalize(volume.array[k], window), labels, present,
                             confidence, [lb.value for lb in tpl.labels])
            timings["propagation"] = time.perf_counter() - t
        out = label_volume(source, Volume.unslice(labels, axis),
                           name=f"{volume.name}-labels" if volume.name else "labels")
        return Result(out, names, confidence, present, prompts, matches, landmarks, timings,
                      label_values=[lb.value for lb in tpl.labels], orientation=volume.orientation_of(2),
                      slice_axis=axis)

    def _clean_up_3d(self, labels: np.ndarray, present: np.ndarray, confidence: np.ndarray, done: list) -> None:
        """Per label, drop detections in 3D components under ``minor_components`` of the largest, in place.
        Processed slices at most two apart are neighbours (a skipped slice, such as the template's own, does
        not split a structure); runs farther apart (sampled slices) are cleaned each on its own."""
        if self.minor_components <= 0 or not done:
            return
        cuts = [k + 1 for k in range(len(done) - 1) if done[k + 1] - done[k] > 2]
        for run in np.split(np.asarray(done), cuts):
            stack = labels[run]
            for i, lb in enumerate(self.template.labels):
                mine = stack == lb.value
                kept = drop_minor_components(mine, self.minor_components)
                stack[mine & ~kept] = 0
                gone = run[present[run, i] & ~kept.any(axis=(1, 2))]
                present[gone, i], confidence[gone, i] = False, 0.0
            labels[run] = stack

    def _region(self, probs: np.ndarray, i: int, pixel_area: float, name: str) -> np.ndarray:
        """The adapter's localised region of label i, or nothing when it is too small to be the structure."""
        region = localised_region(probs, i)
        if region.sum() * pixel_area < self.min_area_fraction * self.reference_area.get(name, 0.0):
            return np.zeros_like(region)
        return region


def localised_region(probs: np.ndarray, i: int) -> np.ndarray:
    """(L + 1, H, W) adapter probabilities -> the most probable component where label i wins the argmax
    with a probability above 0.5 (paper B's connected-component step); empty when it wins nowhere."""
    win = (probs.argmax(axis=0) == i + 1) & (probs[i + 1] > 0.5)
    return keep_components(win, weights=probs[i + 1]) if win.any() else win
