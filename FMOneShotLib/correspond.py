"""Correspondences of template points on target slices (paper A, Eq. 1), with a confidence.

``Corr(t, I) = argmax_(p, q) cos(T_feat[t], I_feat[p, q])``: the similarity map is computed at the feature
grid and upsampled bilinearly to pixels (never the features), so the answer has pixel resolution at the cost
of one small map per point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class FeatureStandardizer:
    """Per-channel centring and scaling fitted on the template's features, and the similarity weights.

    Cosine similarity of raw features is dominated by what all pixels share; centring on the template's
    mean makes it compare what distinguishes a pixel. The same transform is applied to every target.
    Adapters learn from the standardised features; similarity uses them multiplied by ``weights``
    (:meth:`for_similarity`), so that no group of channels dominates by its number of channels alone.
    """

    mean: torch.Tensor
    std: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def fit(cls, features: list, weights: torch.Tensor | None = None) -> "FeatureStandardizer":
        """``features``: (C, h, w) grids (the template slices)."""
        flat = torch.cat([f.reshape(f.shape[0], -1) for f in features], dim=1)
        mean = flat.mean(dim=1)
        std = flat.std(dim=1).clamp_min(1e-6)
        if weights is None:
            weights = torch.ones_like(mean)
        return cls(mean, std, weights.to(mean.dtype))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """(..., C, h, w) -> standardised, same shape."""
        shape = (-1, 1, 1)
        return (features - self.mean.view(shape)) / self.std.view(shape)

    def for_similarity(self, standardised: torch.Tensor) -> torch.Tensor:
        """Standardised (..., C, h, w) features weighted for cosine similarity."""
        return standardised * self.weights.view(-1, 1, 1)

    def state(self) -> dict:
        return {"mean": self.mean, "std": self.std, "weights": self.weights}

    @classmethod
    def from_state(cls, state: dict) -> "FeatureStandardizer":
        return cls(state["mean"], state["std"], state["weights"])


def unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    return F.normalize(x, dim=dim, eps=1e-8)


def similarity_maps(queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each query (N, C) with every cell of a (C, h, w) grid -> (N, h, w)."""
    C, h, w = features.shape
    return (unit(queries, 1) @ unit(features.reshape(C, -1), 0)).reshape(-1, h, w)


def upsample(maps: torch.Tensor, shape) -> torch.Tensor:
    """(N, h, w) maps -> (N, H, W), bilinear, consistent with the grid convention of features.base."""
    if tuple(maps.shape[-2:]) == tuple(shape):
        return maps
    return F.interpolate(maps[None], size=tuple(shape), mode="bilinear", align_corners=False)[0]


@dataclass
class Correspondence:
    """Where template points land on one target slice: pixel (x, y) and the confidence there (the cosine
    similarity; in a window, the similarity less :data:`DISTANCE_PENALTY` times the squared distance from the
    window's centre in units of its radius)."""

    xy: np.ndarray  # (N, 2) float, x = column, y = row
    score: np.ndarray  # (N,)


# In a window, a candidate at the window's edge must be this much more similar (cosine) than one at its centre.
DISTANCE_PENALTY = 0.1


def correspond(queries: torch.Tensor, features: torch.Tensor, image_shape, chunk: int = 8, centres=None,
               radius=None, bias: torch.Tensor | None = None, subpixel: bool = False) -> Correspondence:
    """Paper A, Eq. 1 for every query: the pixel of highest cosine similarity and that similarity.

    ``queries`` (N, C), ``features`` (C, h, w) at the grid of an (H, W) image. With ``centres`` (N, 2) pixel
    (x, y), one per query, and ``radius`` (pixels: one number, or (rx, ry) for anisotropic pixels), each
    query is searched only within the ellipse of that radius around its centre (the aligned template
    position: :mod:`align`), and the answer maximises ``similarity - DISTANCE_PENALTY * (d / radius)^2``,
    which is also its confidence; a centre outside the image searches the part of the window inside it
    (the image pixel nearest the centre when none is). ``bias`` (N, H, W), optional, is added to the
    similarity maps first (another scale's similarity, say).

    ``xy`` is in pixels (x = column, y = row): the argmax of the map upsampled to pixels, which lies at a
    feature cell's centre. ``subpixel`` (whole-slice search only: no ``centres``, no ``bias``): the continuous
    argmax instead, a parabola through the grid maximum and its two neighbours along each axis (the standard
    sub-pixel peak estimate, e.g. Lowe 2004 / OpenCV's phase-correlation peak refinement), for landmarks that
    must not snap to cells; along an axis where the grid has the image's resolution, the grid argmax itself.
    """
    H, W = image_shape
    if subpixel and centres is None and bias is None:
        return _subpixel_correspond(queries, features, image_shape)
    xy = np.zeros((len(queries), 2))
    score = np.zeros(len(queries))
    windowed = centres is not None
    if windowed:
        centres = np.asarray(centres, dtype=float).reshape(-1, 2)
        if len(centres) != len(queries):
            raise ValueError(f"{len(centres)} window centres for {len(queries)} queries")
        rx, ry = (float(radius), float(radius)) if np.ndim(radius) == 0 else (float(radius[0]), float(radius[1]))
        yy = torch.arange(H, dtype=torch.float32)[:, None]
        xx = torch.arange(W, dtype=torch.float32)[None, :]
    for start in range(0, len(queries), chunk):
        maps = upsample(similarity_maps(queries[start:start + chunk], features), (H, W))
        if bias is not None:
            maps = maps + bias[start:start + chunk]
        if windowed:
            maps = maps.clone()
            for k, (cx, cy) in enumerate(centres[start:start + chunk]):
                d2 = ((xx - float(cx)) / rx) ** 2 + ((yy - float(cy)) / ry) ** 2
                if not bool((d2 <= 1).any()):  # the window lies outside the image: its nearest pixel
                    d2 = d2 - d2.min()
                    outside = d2 > 0
                else:
                    outside = d2 > 1
                maps[k] = (maps[k] - DISTANCE_PENALTY * d2).masked_fill(outside, -torch.inf)
        flat = maps.reshape(maps.shape[0], -1)
        best, idx = flat.max(dim=1)
        idx = idx.numpy()
        xy[start:start + chunk, 0] = idx % W
        xy[start:start + chunk, 1] = idx // W
        score[start:start + chunk] = best.numpy()
    return Correspondence(xy, score)


def _peak_offset(left: np.ndarray, centre: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Vertex of the parabola through (-1, left), (0, centre), (1, right), in [-0.5, 0.5]; 0 where flat."""
    curvature = left - 2 * centre + right
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0)
    return np.clip(np.nan_to_num(offset), -0.5, 0.5)


def _subpixel_correspond(queries: torch.Tensor, features: torch.Tensor, image_shape) -> Correspondence:
    """:func:`correspond` with ``subpixel``: argmax at the feature grid, refined by a parabola per axis, and
    mapped to pixels with the grid convention of features.base (cell centres at (j + 0.5) W / w - 0.5)."""
    H, W = image_shape
    maps = similarity_maps(queries, features).float().numpy()  # (N, h, w)
    N, h, w = maps.shape
    flat = maps.reshape(N, -1)
    idx = flat.argmax(axis=1)
    i, j = idx // w, idx % w
    n = np.arange(N)
    centre = maps[n, i, j]
    # refined along an axis only where a cell spans more than a pixel: at pixel resolution the argmax is exact
    dx = np.where((j > 0) & (j < w - 1) & (W > w), _peak_offset(maps[n, i, np.maximum(j - 1, 0)], centre,
                                                       maps[n, i, np.minimum(j + 1, w - 1)]), 0.0)
    dy = np.where((i > 0) & (i < h - 1) & (H > h), _peak_offset(maps[n, np.maximum(i - 1, 0), j], centre,
                                                       maps[n, np.minimum(i + 1, h - 1), j]), 0.0)
    x = (j + dx + 0.5) * W / w - 0.5
    y = (i + dy + 0.5) * H / h - 0.5
    xy = np.stack([np.clip(x, 0, W - 1), np.clip(y, 0, H - 1)], axis=1)
    return Correspondence(xy, centre.astype(float))
