"""Segmenters turn point prompts on a target slice into a mask.

SAM (with downloaded weights) arrives with the backends issue behind this same interface. The offline
refiner needs no weights: it grows the region of pixels whose features resemble the positive prompts more
than the negative ones, keeps what is connected to a positive prompt, and respects a localisation prior
(an adapter's probability map) where one exists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from .correspond import similarity_maps, upsample
from .errors import FMOneShotError
from .features import sample_features
from .postprocess import keep_components, smooth


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


SEGMENTERS = {"offline": OfflineRefiner, "none": RegionSegmenter}


def create_segmenter(name: str = "auto", **options) -> Segmenter:
    """``auto`` is the best available: SAM when its weights are present (backends issue), else offline."""
    if name == "auto":
        name = "offline"
    if name not in SEGMENTERS:
        raise FMOneShotError(f"Unknown segmenter {name!r}.", f"choose one of: auto, {', '.join(sorted(SEGMENTERS))}.")
    return SEGMENTERS[name](**options)
