"""Scores: Dice, IoU, prompt accuracy (paper A, Eq. 2), NED (Eq. 3) and localisation accuracy."""

from __future__ import annotations

import numpy as np


def dice(pred, ref) -> float:
    """2|A and B| / (|A| + |B|); 1.0 when both are empty (nothing to find, nothing found)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    total = pred.sum() + ref.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(pred, ref).sum() / total)


def iou(pred, ref) -> float:
    """|A and B| / |A or B|; 1.0 when both are empty."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    union = np.logical_or(pred, ref).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, ref).sum() / union)


def prompt_accuracy(points, mask, inside: bool = True) -> float:
    """Share of points (x, y) that fall inside ``mask`` (Acc+), or outside it with ``inside=False`` (Acc-).

    Points are rounded to the nearest pixel; points off the image count as outside. NaN for no points.
    """
    pts = np.asarray(points, float).reshape(-1, 2)
    if len(pts) == 0:
        return float("nan")
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    ij = np.round(pts).astype(int)
    ok = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
    hit = np.zeros(len(pts), bool)
    hit[ok] = mask[ij[ok, 1], ij[ok, 0]]
    return float(hit.mean() if inside else (~hit).mean())


def distances(pred, ref, spacing=None) -> np.ndarray:
    """Euclidean distances between matching points (N, 2); in mm when ``spacing`` (sx, sy) is given."""
    d = np.asarray(pred, float).reshape(-1, 2) - np.asarray(ref, float).reshape(-1, 2)
    if spacing is not None:
        d = d * np.asarray(spacing, float)[:2]
    return np.sqrt((d ** 2).sum(axis=1))


def ned(pred, ref, width: float) -> float:
    """Normalised Euclidean distance: mean pixel distance over the landmarks divided by the image width.

    Paper A's Eq. 3 writes a sum over landmarks; its tables report the mean per landmark, which this is.
    """
    return float(distances(pred, ref).mean() / float(width))


def within(pred, ref, radius: float, spacing=None) -> float:
    """Share of points within ``radius`` of their reference (pixels, or mm with ``spacing``)."""
    return float((distances(pred, ref, spacing) <= radius).mean())
