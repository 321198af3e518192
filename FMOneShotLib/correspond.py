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


def match_patch(template: np.ndarray, template_xy, target: np.ndarray, start_xy, jacobian, half: int, radius: int,
                step: float = 1.0, penalty: float = DISTANCE_PENALTY) -> tuple:
    """Where the intensity patch around a template point lies in a target image: normalised cross-correlation
    (``skimage.feature.match_template``, Lewis 1995) of a template patch with the target resampled in the
    template's frame, searched within ``radius`` samples of a starting position.

    ``template`` and ``target`` are (H, W) float images (already smoothed for ``step``: the caller's pyramid
    level); ``template_xy`` and ``start_xy`` pixel (x, y) in each (x = column). ``jacobian`` (2, 2) maps template
    pixel offsets to target pixel offsets (the local linear part of the alignment), so that the target is
    sampled in the template's pose, scale and shear and the patches compare like with like. The patch has
    ``2 half + 1`` samples a side, ``step`` template pixels apart; candidates lie on the same lattice within
    the disc of ``radius`` samples around the start, and the one kept maximises
    ``NCC - penalty * (d / radius)^2`` (as :func:`correspond` does in its windows), refined to a fraction of a
    sample by a parabola through the NCC peak and its neighbours along each axis. Samples beyond an image's
    edge repeat its edge. Returns (xy (2,) target pixels, NCC there in [-1, 1]); a flat patch or region
    (nothing to correlate) returns the start with NCC 0.
    """
    from skimage.feature import match_template

    n = half + radius
    u = np.arange(-n, n + 1) * float(step)
    offsets = np.stack(np.meshgrid(u, u), -1)  # (2n + 1, 2n + 1, 2) template pixel offsets (x, y)
    start = np.asarray(start_xy, float)
    region = _sample(target, start + offsets @ np.asarray(jacobian, float).T)
    inner = offsets[radius:radius + 2 * half + 1, radius:radius + 2 * half + 1]
    patch = _sample(template, np.asarray(template_xy, float) + inner)
    if patch.std() < 1e-6 or region.std() < 1e-6:
        return start, 0.0
    ncc = match_template(region, patch)  # (2 radius + 1)^2: candidate offsets (dy, dx) + radius
    k = np.arange(-radius, radius + 1)
    d2 = (k[None, :] ** 2 + k[:, None] ** 2) / max(radius, 1) ** 2
    score = np.where(d2 <= 1, ncc - penalty * d2, -np.inf)
    i, j = np.unravel_index(int(np.argmax(score)), score.shape)
    offset = np.array([j - radius, i - radius], float)
    # sub-sample: the vertex of the parabola through the NCC peak and its neighbours along each axis
    if 0 < j < 2 * radius:
        offset[0] += float(_peak_offset(ncc[i, j - 1], ncc[i, j], ncc[i, j + 1]))
    if 0 < i < 2 * radius:
        offset[1] += float(_peak_offset(ncc[i - 1, j], ncc[i, j], ncc[i + 1, j]))
    offset *= step
    return start + np.asarray(jacobian, float) @ offset, float(ncc[i, j])


def _sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``image`` (H, W) at pixel positions ``xy`` (..., 2), edge pixels repeated beyond it."""
    from scipy import ndimage as ndi

    return ndi.map_coordinates(image, [xy[..., 1], xy[..., 0]], order=1, mode="nearest")
