"""The offline backend: hand-made dense features that need no downloaded weights.

It exists so that the demo, the tests and air-gapped sites get real, measurable results. Each grid cell gets
  * multi-scale intensity (Gaussian-smoothed image at 4 scales),
  * edges: gradient magnitude at 3 scales, blob and ridge: scale-normalised Laplacian of Gaussian at 4 scales,
  * log-binned context as in Amir et al. (METHOD.md): the mean intensity of the 3x3 neighbouring cells at
    3 log-spaced sizes (1, 3, 9 cells), 27 values,
  * position relative to the body: left-right and front-back offset from the body's centre in units of its
    extent, and the depth below the skin.
The image is first reduced to a working grid whose longest side is at most ``max_side`` cells.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage as ndi

from .base import FeatureExtractor, register

SMOOTH_SCALES = (0.7, 1.5, 3.0, 6.0)
GRADIENT_SCALES = (1.0, 2.0, 4.0)
LOG_SCALES = (1.0, 2.0, 4.0, 8.0)
BIN_LEVELS = (1, 3, 9)
BODY_THRESHOLD = 0.08

# Channel groups and the weight each group has in the cosine similarity (after standardisation).
GROUPS = (
    ("intensity", len(SMOOTH_SCALES), 1.0),
    ("gradient", len(GRADIENT_SCALES), 0.5),
    ("log", len(LOG_SCALES), 0.7),
    ("context", 9 * len(BIN_LEVELS), 1.0),
    ("position", 3, 1.0),
)
N_CHANNELS = sum(n for _, n, _ in GROUPS)


def _largest_region(fg: np.ndarray) -> np.ndarray:
    """The largest connected region of ``fg`` with its holes filled (empty when there is none)."""
    lab, n = ndi.label(fg)
    if n == 0:
        return fg
    sizes = ndi.sum_labels(fg, lab, index=np.arange(1, n + 1))
    return ndi.binary_fill_holes(lab == (int(np.argmax(sizes)) + 1))


def body_mask(image: np.ndarray, threshold: float = BODY_THRESHOLD) -> np.ndarray:
    """The largest connected region brighter than ``threshold`` with its holes filled (the patient).

    A dark slice (the coil's fall-off at the ends of an MR volume), where that finds under a fifth of the
    slice, is thresholded again at a tenth of its 99th percentile: with the fixed threshold only 5% of such a
    body was found, and the position features then placed organs in the air around it."""
    smoothed = ndi.gaussian_filter(image, 1.0)
    body = _largest_region(smoothed > threshold)
    low = 0.1 * float(np.percentile(smoothed, 99))
    if body.mean() < 0.2 and low < threshold:
        body = _largest_region(smoothed > low)
    if body.sum() < 0.02 * body.size:
        return np.ones_like(image, dtype=bool)
    return body


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """a[y + dy, x + dx] with edge values repeated beyond the border."""
    h, w = a.shape
    ys = np.clip(np.arange(h) + dy, 0, h - 1)
    xs = np.clip(np.arange(w) + dx, 0, w - 1)
    return a[np.ix_(ys, xs)]


def slice_features(image: np.ndarray) -> np.ndarray:
    """(C, h, w) float32 features of one slice already at the working grid."""
    out = []
    smooth = [ndi.gaussian_filter(image, s) for s in SMOOTH_SCALES]
    out += smooth
    out += [ndi.gaussian_gradient_magnitude(image, s) * s for s in GRADIENT_SCALES]
    out += [-ndi.gaussian_laplace(image, s) * s * s for s in LOG_SCALES]
    base = smooth[0]
    for size in BIN_LEVELS:
        box = ndi.uniform_filter(base, size=size, mode="nearest") if size > 1 else base
        for dy in (-size, 0, size):
            for dx in (-size, 0, size):
                out.append(_shift(box, dy, dx))
    body = body_mask(image)
    ys, xs = np.nonzero(body)
    cy, cx = ys.mean(), xs.mean()
    ry, rx = max(2.0 * ys.std(), 1.0), max(2.0 * xs.std(), 1.0)
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]].astype(np.float32)
    depth = ndi.distance_transform_edt(body)
    out += [(xx - cx) / rx, (yy - cy) / ry, depth / max(float(depth.max()), 1.0)]
    return np.stack(out).astype(np.float32)


@register("offline")
class OfflineFeatures(FeatureExtractor):
    """Hand-made multi-scale, log-binned and positional features (no weights; see module docstring)."""

    name = "offline"
    batch_size = 16

    def __init__(self, max_side: int = 160):
        self.max_side = int(max_side)

    def grid_shape(self, image_shape) -> tuple:
        H, W = image_shape
        factor = max(1, math.ceil(max(H, W) / self.max_side))
        return max(1, round(H / factor)), max(1, round(W / factor))

    def extract(self, slices: np.ndarray, pixel_spacing=(1.0, 1.0)) -> torch.Tensor:
        slices = np.asarray(slices, dtype=np.float32)
        if slices.ndim == 2:
            slices = slices[None]
        h, w = self.grid_shape(slices.shape[1:])
        t = torch.from_numpy(slices)[:, None]
        if (h, w) != slices.shape[1:]:
            t = torch.nn.functional.adaptive_avg_pool2d(t, (h, w))
        grid = t[:, 0].numpy()
        return torch.from_numpy(np.stack([slice_features(g) for g in grid]))

    def channel_weights(self, n_channels: int) -> torch.Tensor:
        weights = []
        for _, n, w in GROUPS:
            weights += [w / math.sqrt(n)] * n
        return torch.tensor(weights[:n_channels], dtype=torch.float32)

    def settings(self) -> dict:
        return {"backend": self.name, "max_side": self.max_side}
