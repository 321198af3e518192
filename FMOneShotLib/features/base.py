"""The single feature-extractor interface and the registry of backends.

Every backend (the offline one here, the foundation models later) turns a batch of normalised slices into
a feature grid ``(B, C, h, w)``. The grid covers the whole image: cell (i, j) is centred on pixel
``((j + 0.5) * W / w - 0.5, (i + 0.5) * H / h - 0.5)``, so coordinates convert without knowing the backend
(:func:`pixel_to_grid`). Features stay at the grid; the chain upsamples similarity maps, never features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import numpy as np
import torch

from ..errors import FMOneShotError
from ..weights import AUTO_ORDER, resolve_backend  # noqa: F401  (re-exported: features.resolve_backend)


class FeatureExtractor(ABC):
    """Dense features of 2D slices. Subclasses set ``name`` and implement :meth:`extract`."""

    name: str = ""
    #: Suggested number of slices per forward pass on the CPU.
    batch_size: int = 8

    @abstractmethod
    def extract(self, slices: np.ndarray, pixel_spacing=(1.0, 1.0)) -> torch.Tensor:
        """Features of ``slices`` (B, H, W) float32 in [0, 1] -> tensor (B, C, h, w) float32 on the CPU."""

    def channel_weights(self, n_channels: int) -> torch.Tensor:
        """Weights applied after per-channel standardisation, before cosine similarity (default: equal)."""
        return torch.ones(n_channels)

    def settings(self) -> dict:
        """What a template must record to reproduce these features."""
        return {"backend": self.name}


_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {}


def register(name: str):
    """Class decorator: make a backend selectable by ``name`` everywhere (library, CLI, Slicer)."""

    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def create_extractor(name: str, **options) -> FeatureExtractor:
    """The backend registered as ``name`` (or the one ``auto`` resolves to), built with ``options``.
    Foundation-model options (device, precision) are dropped when ``auto`` falls back to offline."""
    if name == "auto":
        name = resolve_backend(name)[0]
        if name == "offline":
            options = {}
    if name not in _REGISTRY:
        raise FMOneShotError(f"Unknown feature backend {name!r}.",
                             f"choose one of: auto, {', '.join(available_backends())}.")
    return _REGISTRY[name](**options)


def pixel_to_grid(xy, image_shape, grid_shape) -> np.ndarray:
    """Pixel (x, y) -> continuous grid (x, y) for a grid covering the image (see module docstring)."""
    xy = np.asarray(xy, dtype=float)
    H, W = image_shape
    h, w = grid_shape
    return np.stack([(xy[..., 0] + 0.5) * w / W - 0.5, (xy[..., 1] + 0.5) * h / H - 0.5], axis=-1)


def sample_features(features: torch.Tensor, xy, image_shape) -> torch.Tensor:
    """Bilinear samples of a (C, h, w) grid at pixel positions ``xy`` (N, 2) -> (N, C)."""
    C, h, w = features.shape
    g = pixel_to_grid(xy, image_shape, (h, w))
    # grid_sample with align_corners=False maps -1..1 to the outer edges of the grid cells.
    norm = torch.as_tensor(np.stack([(g[:, 0] + 0.5) / w * 2 - 1, (g[:, 1] + 0.5) / h * 2 - 1], -1),
                           dtype=features.dtype)
    out = torch.nn.functional.grid_sample(features[None], norm[None, :, None, :], mode="bilinear",
                                          padding_mode="border", align_corners=False)
    return out[0, :, :, 0].T.contiguous()


def log_bin(features: torch.Tensor, levels: int = 2) -> torch.Tensor:
    """Log-binning of Amir et al. (METHOD.md): enrich each cell with the mean of its neighbourhood in bins of
    log-spaced sizes. ``features`` (B, C, h, w) -> (B, C * (1 + 8 * levels), h, w).

    Level k (0 .. levels-1) averages the features over 3^k x 3^k cells (cells beyond the border not counted)
    and samples that average at the 3 x 3 offsets {-3^k, 0, 3^k}; the centre is taken at level 0 only.
    Offsets beyond the border take the nearest cell inside. Bins are in that order: level, then row, column.
    """
    B, C, h, w = features.shape
    out = []
    for k in range(levels):
        size = 3 ** k
        pooled = features if size == 1 else torch.nn.functional.avg_pool2d(
            features, size, stride=1, padding=size // 2, count_include_pad=False)
        ys = torch.arange(h)
        xs = torch.arange(w)
        for dy in (-size, 0, size):
            for dx in (-size, 0, size):
                if k > 0 and dy == 0 and dx == 0:
                    continue
                iy = (ys + dy).clamp(0, h - 1)
                ix = (xs + dx).clamp(0, w - 1)
                out.append(pooled[:, :, iy][:, :, :, ix])
    return torch.cat(out, dim=1)


def forward_in_batches(extractor, slices: np.ndarray) -> torch.Tensor:
    """What every foundation-model backend's ``extract`` does: ``extractor.preprocess(slices)`` (B, H, W) ->
    its model input, then ``extractor.forward`` on ``extractor.batch_size`` inputs at a time on its device,
    under inference mode, the model-forward thread policy (:mod:`FMOneShotLib.threads`) and its autocast
    precision; each batch log-binned when ``log_bin_levels`` is set. Returns (B, C, h, w) float32 on the CPU."""
    from .. import models
    from ..threads import model_forward

    x = extractor.preprocess(slices)
    out = []
    with torch.inference_mode(), model_forward(), models.autocast(extractor.device, extractor.precision):
        for start in range(0, len(x), extractor.batch_size):
            f = extractor.forward(x[start:start + extractor.batch_size].to(extractor.device))
            if extractor.log_bin_levels:
                f = log_bin(f, extractor.log_bin_levels)
            out.append(f.float().cpu())
    return torch.cat(out)
