"""Clean-up of localised regions and masks: connected components, holes, tiny specks."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def components(mask: np.ndarray):
    """(labels, sizes) of the connected components of a 2D or 3D mask, diagonal neighbours included (8- or
    26-connected; labels 1..n, sizes[i] of label i+1)."""
    lab, n = ndi.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:] if n else np.zeros(0, int)
    return lab, sizes


def keep_components(mask: np.ndarray, seeds=None, weights: np.ndarray | None = None,
                    min_area: float = 0.0) -> np.ndarray:
    """The components of ``mask`` that hold a seed point (x, y); without seeds inside, the heaviest one.

    ``weights`` (H, W), e.g. a probability map, ranks components by their summed weight instead of their
    area. Components smaller than ``min_area`` pixels are dropped; holes are filled.
    """
    mask = np.asarray(mask, bool)
    lab, sizes = components(mask)
    if len(sizes) == 0:
        return mask
    keep = np.zeros(len(sizes) + 1, bool)
    if seeds is not None and len(seeds):
        pts = np.round(np.asarray(seeds, float)).astype(int)
        h, w = mask.shape
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
        hit = lab[pts[inside, 1], pts[inside, 0]]
        keep[hit[hit > 0]] = True
    if not keep.any():
        score = sizes if weights is None else ndi.sum_labels(weights, lab, np.arange(1, len(sizes) + 1))
        keep[int(np.argmax(score)) + 1] = True
    keep[1:] &= sizes >= min_area
    keep[0] = False
    return ndi.binary_fill_holes(keep[lab])


def drop_minor_components(mask: np.ndarray, fraction: float, confidence=None, ratio: float = 0.0) -> np.ndarray:
    """``mask`` without its minor components (26-connected in 3D: a structure found on neighbouring slices is one
    component, a stray detection elsewhere another). ``mask`` (n, H, W) or (H, W) bool; same shape back.

    A component is minor when it is smaller than ``fraction`` of the largest one (``fraction`` 0 keeps all).
    With ``confidence`` (n,), one value per index along axis 0 (e.g. per slice, the mean probability behind
    each slice's detection), components are judged by how confident they are too: a component's confidence
    is the mean of its slices' values weighted by its voxels on each; the *main* component is the most
    confident one that is not minor; every other component is minor as well when its confidence is under
    ``ratio`` times the main one's (``ratio`` 0: size alone). Across subjects the false detections one
    template slice gives are the neighbouring organ of the same brightness, often as large as the organ but
    less confident (CHAOS: 0.61-0.77 beside the spleen's 0.84-0.88; docs/results.md)."""
    mask = np.asarray(mask, bool)
    if fraction <= 0 or not mask.any():
        return mask
    lab, sizes = components(mask)
    keep = sizes >= fraction * sizes.max()
    if confidence is not None and ratio > 0 and len(sizes) > 1:
        weights = np.broadcast_to(np.asarray(confidence, float).reshape((-1,) + (1,) * (mask.ndim - 1)), mask.shape)
        mean = ndi.mean(weights, lab, np.arange(1, len(sizes) + 1))
        main = int(np.argmax(np.where(keep, mean, -np.inf)))
        keep &= mean >= ratio * mean[main]
        keep[main] = True
    return np.concatenate([[False], keep])[lab]


def smooth(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary opening then closing with a disc of ``radius`` pixels: removes specks and notches."""
    if radius <= 0 or not mask.any():
        return mask
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disc = xx * xx + yy * yy <= radius * radius
    out = ndi.binary_opening(mask, disc)
    out = ndi.binary_closing(out, disc, border_value=0)
    return ndi.binary_fill_holes(out) if out.any() else out
