"""PNG pictures of results: slices with labels and points overlaid, and montages of every slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

# One meaning per colour in every picture (montages, segmentation and landmark reports): the reference is
# white (outlines, landmarks); what FMOneShot found is tinted in the label's colour (regions) or yellow
# (landmarks); corresponding positive points are green and negative points red.
REFERENCE_COLOR = (255, 255, 255)
FOUND_LANDMARK_COLOR = (255, 220, 0)
POSITIVE_COLOR = (0, 255, 0)
NEGATIVE_COLOR = (255, 0, 0)
COLOR_KEY = {"segmentation": "prediction tinted in the label's colour, reference outlined in white, corresponding "
                             "positive points green, negative points red",
             "landmarks": "reference landmarks white, found landmarks yellow"}


def overlay(image01: np.ndarray, labels: np.ndarray, colors: dict, reference: np.ndarray | None = None,
            alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 (H, W, 3): the image in grey, each label value tinted with ``colors[value]``; the outline
    of a reference label map, when given, in white (:data:`REFERENCE_COLOR`)."""
    grey = (np.clip(image01, 0, 1) * 255).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value, color in colors.items():
        m = labels == value
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(color, np.float32)
    if reference is not None:
        edge = (reference > 0) & ~ndi.binary_erosion(reference > 0)
        rgb[edge] = REFERENCE_COLOR
    return rgb.astype(np.uint8)


def mark_points(rgb: np.ndarray, points, color, radius: int = 4) -> np.ndarray:
    """Draw a plus sign of ``radius`` pixels at each (x, y) of ``points`` on an RGB picture, in place."""
    h, w = rgb.shape[:2]
    for x, y in np.round(np.asarray(points, float).reshape(-1, 2)).astype(int):
        for dx, dy in [(d, 0) for d in range(-radius, radius + 1)] + [(0, d) for d in range(-radius, radius + 1)]:
            if 0 <= x + dx < w and 0 <= y + dy < h:
                rgb[y + dy, x + dx] = color
    return rgb


def radiological(picture: np.ndarray, direction: np.ndarray | None) -> np.ndarray:
    """Flip an axial picture (y, x, ...) as radiologists read it: anterior at the top, the patient's left on
    the right (LPS: +x to the right, +y downwards), given the volume's direction matrix."""
    if direction is None:
        return picture
    step_y = -1 if direction[1, 1] < 0 else 1
    step_x = -1 if direction[0, 0] < 0 else 1
    return picture[::step_y, ::step_x]


def write_png(rgb: np.ndarray, path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True), str(path))
    return Path(path)


def montage(images01: np.ndarray, labels: np.ndarray, colors: dict, path, reference: np.ndarray | None = None,
            columns: int = 6, direction: np.ndarray | None = None) -> Path:
    """Write a PNG grid of all slices (z, y, x) with labels overlaid; returns the path.

    With the volume's ``direction``, axial slices are shown as radiologists read them: anterior at the top
    and the patient's left on the right of the picture (LPS: +x to the right, +y downwards).
    """
    tiles = [overlay(images01[z], labels[z], colors, None if reference is None else reference[z])
             for z in range(images01.shape[0])]
    tiles = [radiological(t, direction) for t in tiles]
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    canvas = np.zeros((rows * (h + 2), columns * (w + 2), 3), np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = tile
    return write_png(canvas, path)
