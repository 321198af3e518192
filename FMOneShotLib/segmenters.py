"""Segmenters turn point prompts on a target slice into a mask.

SAM (segment-anything's predictor) encodes a slice once, only where prompts exist; a single point gets SAM's
three masks and keeps the best-scoring one, several points get its single mask, as segment-anything advises;
it is the default (``auto``) whenever a SAM checkpoint is in the cache. The
offline refiner needs no weights: it grows the region of pixels whose features resemble the positive prompts more
than the negative ones, keeps what is connected to a positive prompt, and respects a localisation prior
(an adapter's probability map) where one exists.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from abc import ABC, abstractmethod

import numpy as np
import torch

from . import models
from . import weights as W
from .correspond import similarity_maps, upsample
from .errors import FMOneShotError
from .features import sample_features
from .postprocess import keep_components, smooth
from .threads import model_forward


class Segmenter(ABC):
    name = ""

    @abstractmethod
    def segment(self, image: np.ndarray, features: torch.Tensor, positive: np.ndarray, negative: np.ndarray,
                prior: np.ndarray | None = None) -> np.ndarray:
        """Mask (H, W) bool of ``image`` (H, W, in [0, 1]) from prompts (x, y) in pixels.

        ``features`` are the slice's standardised (C, h, w) features; ``prior`` an optional (H, W)
        probability of the structure from an adapter.
        """


class OfflineRefiner(Segmenter):
    """Prompt-driven region growing on the slice's own features (no weights)."""

    name = "offline"

    def __init__(self, min_similarity: float = 0.7, prior_weight: float = 10.0, smooth_radius: int = 1):
        self.min_similarity = min_similarity
        self.prior_weight = prior_weight
        self.smooth_radius = smooth_radius

    def segment(self, image, features, positive, negative, prior=None):
        shape = image.shape
        positive = np.asarray(positive, float).reshape(-1, 2)
        negative = np.asarray(negative, float).reshape(-1, 2)
        if len(positive) == 0:
            return np.zeros(shape, bool)
        s_pos = upsample(similarity_maps(sample_features(features, positive, shape), features), shape).amax(0)
        if len(negative):
            s_neg = upsample(similarity_maps(sample_features(features, negative, shape), features), shape).amax(0)
            s_neg = torch.maximum(s_neg, torch.full_like(s_neg, self.min_similarity))
        else:
            s_neg = torch.full_like(s_pos, self.min_similarity)
        score = (s_pos - s_neg).numpy()
        if prior is not None:
            score = score + self.prior_weight * (2.0 * np.asarray(prior) - 1.0)
        mask = keep_components(score > 0, seeds=positive)
        return smooth(mask, self.smooth_radius)


class RegionSegmenter(Segmenter):
    """No segmenter: the adapter's localised region (prior > 0.5) is the answer."""

    name = "none"

    def segment(self, image, features, positive, negative, prior=None):
        if prior is None:
            raise FMOneShotError("The segmenter 'none' needs a localised region from an adapter.",
                                 "paint a template mask (or choose an adapter), or use --segmenter offline.")
        return keep_components(np.asarray(prior) > 0.5, seeds=positive)


class _PointPromptedSegmenter(Segmenter):
    """What SAM and SAM 2 share: a slice encoded once (the expensive image encoder, timed and counted), only
    when a label is prompted on it, and reused for every label prompted on the same slice; point prompts
    (x, y) in pixels, label 1 positive, 0 negative; multimask output only for a single point (ambiguous), then
    the mask with the best predicted IoU. Subclasses set ``predictor`` (``predict(point_coords, point_labels,
    multimask_output)`` as SamPredictor / SAM2ImagePredictor), ``device``, ``precision`` and implement
    ``_set_image``."""

    predictor = None
    _key = None
    encodings = 0  # slices encoded (the expensive step)
    forward_seconds = 0.0  # seconds in the image encoder
    decode_seconds = 0.0  # seconds in the prompt encoder and mask decoder (once per label and slice)

    def _set_image(self, image: np.ndarray) -> None:
        raise NotImplementedError

    def _encode(self, image: np.ndarray) -> None:
        key = slice_key(image)
        if key == self._key:
            return
        t = time.perf_counter()
        with torch.inference_mode(), model_forward(), models.autocast(self.device, self.precision):
            self._set_image(image)
        self.forward_seconds += time.perf_counter() - t
        self.encodings += 1
        self._key = key

    def forget_encoding(self) -> None:
        """The next slice is encoded even if it is the one encoded last."""
        self._key = None

    def segment(self, image, features, positive, negative, prior=None):
        positive = np.asarray(positive, float).reshape(-1, 2)
        negative = np.asarray(negative, float).reshape(-1, 2)
        if len(positive) == 0:
            return np.zeros(image.shape, bool)
        self._encode(image)
        coords = np.concatenate([positive, negative])
        labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
        t = time.perf_counter()
        # the prompt encoder and mask decoder (a two-way transformer over the 64 x 64 embedding, then masks
        # upsampled to the slice) are a model forward too: the model threads, float32 as the features above
        with torch.inference_mode(), model_forward():
            masks, scores, _ = self.predictor.predict(point_coords=coords, point_labels=labels,
                                                      multimask_output=len(coords) == 1)
        self.decode_seconds += time.perf_counter() - t
        return masks[int(np.argmax(scores))].astype(bool)


class SamSegmenter(_PointPromptedSegmenter):
    """Segment Anything: point prompts (label 1 positive, 0 negative) -> one mask.

    A single point is ambiguous (a part, the object, the whole): SAM's three multimask tokens answer it and
    the mask with the best predicted IoU is kept. Several points are not ambiguous, and the multimask tokens
    were trained for single prompts, so they get SAM's single-mask output (``multimask_output=False``), as
    the docstring of segment-anything's ``SamPredictor.predict`` advises (Kirillov et al. 2023, sec. 3).
    The slice is encoded once (``SamPredictor.set_image``) and the encoding is reused for every label
    prompted on the same slice. ``weights``: 'pretrained' (the verified cache), a file, or 'random' (tests).
    """

    name = "sam"

    def __init__(self, model: str = "vit_b", weights: str = "pretrained", device: str = "auto",
                 precision: str = "auto", overrides: dict | None = None):
        from segment_anything import SamPredictor

        self.model_type = model
        self.device = models.resolve_device(device)
        self.precision = models.resolve_precision(precision, self.device)
        sam = models.sam(model, weights, overrides).to(self.device)
        self.predictor = SamPredictor(sam)

    def _set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(to_rgb8(image))
        self.predictor.features = self.predictor.features.float()


def slice_key(image: np.ndarray) -> tuple:
    """What identifies a slice's pixels (shape and a 128-bit digest), so that an encoding is reused."""
    return image.shape, hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


class OnChosenSlices(Segmenter):
    """A segmenter that runs only on chosen slices, known by their pixels (:func:`slice_key`), and
    returns an empty mask elsewhere without any work; it records the slices it ran on."""

    def __init__(self, inner: Segmenter, images: dict):
        self.inner, self.name = inner, inner.name
        self.slice_of = {slice_key(image): z for z, image in images.items()}
        self.ran_on: set = set()

    def __getattr__(self, attr):  # precision, encodings, forward_seconds, forget_encoding: the inner one's
        return getattr(self.inner, attr)

    def segment(self, image, features, positive, negative, prior=None):
        z = self.slice_of.get(slice_key(image))
        if z is None:
            return np.zeros(image.shape, bool)
        self.ran_on.add(z)
        return self.inner.segment(image, features, positive, negative, prior)


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8: the grey slice as the RGB image SAM and SAM 2 were trained on."""
    return np.repeat((np.clip(image, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=2)


class Sam2Segmenter(_PointPromptedSegmenter):
    """SAM 2 (Ravi et al. 2024, "SAM 2: Segment Anything in Images and Videos"): ``SAM2ImagePredictor`` of
    the ``sam2`` package, whose Hiera image encoders are several times lighter than SAM's ViTs.

    A slice is encoded once (``set_image``), only when a label is prompted on it, and the encoding serves
    every label prompted on the same slice. Point prompts (x, y) in pixels of the (H, W) slice, label 1
    positive, 0 negative, any aspect ratio (SAM 2 resizes the slice to 1024 x 1024 and maps the points with
    it). Multimask output only for a single point, where one click is ambiguous (SAM 2's own advice), and
    then the mask with the highest predicted IoU; with more points the one mask SAM 2 returns.
    ``weights``: 'pretrained' (the verified cache, sam2_<model>), a checkpoint file, or 'random' (tests).
    """

    name = "sam2"

    def __init__(self, model: str = "tiny", weights: str = "pretrained", device: str = "auto",
                 precision: str = "auto", overrides: dict | None = None):
        models.require_sam2()
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model_type, self.weights, self.overrides = model, weights, dict(overrides or {})
        self.device = models.resolve_device(device)
        self.precision = models.resolve_precision(precision, self.device)
        self.predictor = SAM2ImagePredictor(models.sam2(model, weights, overrides).to(self.device))

    def _set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(to_rgb8(image))
        features = self.predictor._features  # bf16 under autocast; the prompt decoder runs in float32
        self.predictor._features = {"image_embed": features["image_embed"].float(),
                                    "high_res_feats": [f.float() for f in features["high_res_feats"]]}

    def propagator(self, **options):
        """A :class:`propagate.Propagator` on SAM 2's video predictor with this segmenter's model and weights."""
        from .propagate import Propagator

        return Propagator(self.model_type, self.weights, self.device, self.precision, self.overrides, **options)


SEGMENTERS = {"offline": OfflineRefiner, "none": RegionSegmenter, "sam": SamSegmenter, "sam2": Sam2Segmenter}


# What "auto" picks, in order: the first whose checkpoint is in the cache, else the offline refiner. SAM 2
# before SAM (its Hiera encoders are lighter than SAM's ViTs: docs/models.md), and the smallest first (the
# product's figures are CPU figures); SAM ViT-B first of SAM's.
AUTO_SEGMENTERS = (("sam2", "tiny"), ("sam2", "small"), ("sam2", "base_plus"), ("sam2", "large"),
                   ("sam", "vit_b"), ("sam", "vit_l"), ("sam", "vit_h"))


def available_sam(folder=None) -> str | None:
    """The SAM model whose checkpoint is in the cache (ViT-B first: the fastest), else None."""
    for model in models.SAM_TYPES:
        if W.is_present(f"sam_{model}", folder):
            return model
    return None


def resolve_segmenter(name: str = "auto", options: dict | None = None) -> tuple:
    """``auto`` -> ('sam', {}) when SAM weights are named in ``options``, else the first of AUTO_SEGMENTERS
    whose checkpoint is in the cache (('sam2', {'model': 'tiny'}), ...; SAM 2 only where the sam2 package is
    installed), else ('offline', {})."""
    if name != "auto":
        return name, {}
    if (options or {}).get("weights") is not None:
        return "sam", {}
    for kind, model in AUTO_SEGMENTERS:
        if W.is_present(f"{kind}_{model}") and (kind != "sam2" or importlib.util.find_spec("sam2") is not None):
            return kind, {"model": model}
    return "offline", {}


def create_segmenter(name: str = "auto", **options) -> Segmenter:
    """``auto`` is the best available: SAM when its weights are in the cache, else the offline refiner."""
    name, defaults = resolve_segmenter(name, options)
    if name not in SEGMENTERS:
        raise FMOneShotError(f"Unknown segmenter {name!r}.", f"choose one of: auto, {', '.join(sorted(SEGMENTERS))}.")
    if name not in ("sam", "sam2"):
        options = {k: v for k, v in options.items() if k not in SAM_OPTIONS}
    if name == "sam2":
        options = {k: v for k, v in options.items() if k != "multimask"}  # SAM 2: multimask for one point only
    return SEGMENTERS[name](**{**defaults, **options})


SAM_OPTIONS = ("model", "weights", "device", "precision", "overrides")
