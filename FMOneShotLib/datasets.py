"""Datasets in the case format (see docs/data-format.md): a dataset.json with cases of images and masks or points."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FMOneShotError
from .image import MODALITIES, Volume, labels_on_grid, read_volume


@dataclass
class Case:
    id: str
    image: Path
    mask: Path | None = None
    points: Path | None = None
    modality: str | None = None

    def read_image(self) -> Volume:
        return read_volume(self.image, self.modality)

    def read_mask(self, image: Volume | None = None) -> np.ndarray:
        """Integer labels (z, y, x) on the grid of the case's image (``image``: that image, already read),
        matched by physical position (:func:`image.labels_on_grid`: resampled with a warning when the mask's
        geometry differs by more than half a voxel, refused when the two do not overlap)."""
        if self.mask is None:
            raise FMOneShotError(f"Case {self.id} has no mask.", "add a 'mask' to the case in dataset.json.")
        image = self.read_image() if image is None else image
        mask = labels_on_grid(read_volume(self.mask), image, f"The mask of case {self.id} ({self.mask})")
        return mask.astype(np.int32) if mask.dtype.kind in "fi" and mask.dtype.itemsize > 4 else mask

    def read_points(self) -> dict:
        """{landmark name: (x, y)} in pixels of the 2D image."""
        if self.points is None:
            raise FMOneShotError(f"Case {self.id} has no points.", "add 'points' to the case in dataset.json.")
        return {k: tuple(float(c) for c in v) for k, v in json.loads(self.points.read_text(encoding="utf-8")).items()}


@dataclass
class Dataset:
    root: Path
    name: str
    modality: str | None
    task: str
    labels: dict  # value (int) -> name
    landmarks: list
    cases: list

    def label_value(self, name: str) -> int:
        for value, label in self.labels.items():
            if label == name:
                return value
        raise FMOneShotError(f"Unknown label {name!r} in dataset {self.name}.",
                             f"use one of: {', '.join(self.labels.values())}.")


def load_dataset(root) -> Dataset:
    root = Path(root)
    spec = root / "dataset.json"
    if not spec.is_file():
        raise FMOneShotError(f"No dataset.json in {root}.", "point to a dataset folder in the case format.")
    try:
        doc = json.loads(spec.read_text(encoding="utf-8"))
        task = doc["task"]
        if task not in ("segmentation", "landmarks"):
            raise FMOneShotError(f"{spec}: unknown task {task!r}.", "use 'segmentation' or 'landmarks'.")
        modality = doc.get("modality")
        if modality not in MODALITIES:
            modality = None
        cases = []
        for c in doc["cases"]:
            cases.append(Case(str(c["id"]), root / c["image"], root / c["mask"] if c.get("mask") else None,
                              root / c["points"] if c.get("points") else None, modality))
        labels = {int(k): v for k, v in doc.get("labels", {}).items()}
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        if isinstance(exc, FMOneShotError):
            raise
        raise FMOneShotError(f"{spec} does not follow the case format ({type(exc).__name__}: {exc}).",
                             "see docs/data-format.md.") from None
    return Dataset(root, doc.get("name", root.name), modality, task, labels, list(doc.get("landmarks", [])), cases)
