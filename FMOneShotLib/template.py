"""The template: what a radiologist marked once, and the settings to reproduce the result.

A template holds labels (name, value, colour) and one or more template slices. Each slice keeps its pixels
as acquired, the intensity window of its volume, positive and negative points per label, optional painted
masks per label and named landmarks, all in pixel coordinates (x = column, y = row) of that slice.

On disk: ``NAME.json`` plus ``NAME.slice<k>.nrrd`` (pixels with spacing) and ``NAME.slice<k>.masks.nrrd``
(one uint8 layer per label). Never pickle; everything is validated on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .errors import FMOneShotError
from .files import atomic_paths, refuse_existing
from .image import ORIENTATIONS, Volume, intensity_window

FORMAT = "fmoneshot-template"
VERSION = 1
# Distinct colours for labels 1, 2, ... (Slicer's GenericAnatomyColors feel: tissue-like, distinguishable).
PALETTE = [(221, 130, 101), (157, 108, 162), (185, 102, 83), (216, 101, 79), (144, 238, 144),
           (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (230, 220, 70)]


def default_color(value: int) -> tuple:
    return PALETTE[(value - 1) % len(PALETTE)]


@dataclass
class Label:
    name: str
    value: int
    color: tuple = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise FMOneShotError("A label has no name.", "give every label a non-empty name, e.g. 'liver'.")
        if int(self.value) < 1 or int(self.value) > 65535:
            raise FMOneShotError(f"Label {self.name!r} has value {self.value}.", "use values 1 to 65535 (0 is background).")
        self.value = int(self.value)
        self.color = tuple(int(c) for c in (self.color or default_color(self.value)))


@dataclass
class TemplateSlice:
    image: np.ndarray  # (H, W), intensities as acquired
    index: int = 0  # slice number (z) in the source volume
    pixel_spacing: tuple = (1.0, 1.0)  # (x, y) mm
    window: tuple = (0.0, 1.0)  # intensities mapped to 0 and 1 (image.intensity_window of the source volume)
    positive: dict = field(default_factory=dict)  # label name -> [[x, y], ...]
    negative: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)  # label name -> (H, W) bool
    landmarks: dict = field(default_factory=dict)  # landmark name -> [x, y]
    source: str = ""

    def __post_init__(self):
        self.image = np.asarray(self.image, dtype=np.float32)
        if self.image.ndim != 2:
            raise FMOneShotError(f"A template slice must be 2D; got shape {self.image.shape}.", "pass one slice.")
        self.positive = {k: np.asarray(v, float).reshape(-1, 2) for k, v in self.positive.items()}
        self.negative = {k: np.asarray(v, float).reshape(-1, 2) for k, v in self.negative.items()}
        self.masks = {k: np.asarray(v).astype(bool) for k, v in self.masks.items()}
        self.landmarks = {k: np.asarray(v, float).reshape(2) for k, v in self.landmarks.items()}
        self.window = tuple(float(w) for w in self.window)
        self.pixel_spacing = tuple(float(s) for s in self.pixel_spacing)


@dataclass
class Template:
    labels: list = field(default_factory=list)
    slices: list = field(default_factory=list)
    modality: str | None = None
    settings: dict = field(default_factory=dict)
    # A trained adapter, saved with the template so it need not be trained again: ``{"description": {...},
    # "backend": the feature backend's settings it was trained on, "labels": [...]}`` and its named tensors.
    adapter: dict | None = None
    adapter_tensors: dict = field(default_factory=dict)
    # The plane of the template slices ("axial", "coronal", "sagittal"): target volumes are processed in
    # slices of the same plane. None: the volumes' own slices (the third index axis), whatever their plane.
    orientation: str | None = None
    # Per label, the first and last slice (indices of the template volume in the template's plane) where the
    # radiologist says the structure lies; aligned into each target, it bounds the slices searched (align.py).
    extent: dict = field(default_factory=dict)
    # The volume the template slices were taken from, when known (not saved: the template file keeps only its
    # slices). With it, targets are aligned to the template in 3D; without it, slice to slice in 2D.
    volume: Volume | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_volume(cls, volume: Volume, slice_index: int, positive: dict | None = None,
                    negative: dict | None = None, masks: dict | None = None, landmarks: dict | None = None,
                    labels: list | None = None, settings: dict | None = None,
                    orientation: str | None = None) -> "Template":
        """A template from one slice of ``volume``; labels default to the names used, numbered 1, 2, ...

        With an ``orientation`` ("axial", "coronal", "sagittal") the slice is ``slice_index`` of that plane
        (``Volume.resliced``) and points are pixels of it; without one, of the volume's own slices."""
        source, volume = volume, volume.resliced(volume.slice_axis(orientation))
        if not 0 <= int(slice_index) < volume.n_slices:
            raise FMOneShotError(f"Slice {slice_index} is outside the volume {volume.name!r} "
                                 f"(slices 0 to {volume.n_slices - 1}).", "choose a slice inside the volume.")
        positive, negative, masks = positive or {}, negative or {}, masks or {}
        if labels is None:
            names = list(dict.fromkeys([*positive, *masks, *negative]))
            labels = [Label(n, i + 1) for i, n in enumerate(names)]
        ts = TemplateSlice(volume.array[int(slice_index)], int(slice_index), volume.pixel_spacing,
                           intensity_window(volume), positive, negative, masks, landmarks or {}, volume.name)
        template = cls(list(labels), [ts], volume.modality, dict(settings or {}), orientation=orientation,
                       volume=source)
        template.validate()
        return template

    @property
    def label_names(self) -> list:
        return [label.name for label in self.labels]

    @property
    def landmark_names(self) -> list:
        return list(dict.fromkeys(n for s in self.slices for n in s.landmarks))

    @property
    def has_masks(self) -> bool:
        return any(s.masks for s in self.slices)

    def label(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        raise FMOneShotError(f"Unknown label {name!r}.", f"use one of: {', '.join(self.label_names) or '(none)'}.")

    # ------------------------------------------------------------------ checking
    def validate(self) -> "Template":
        """Raise FMOneShotError naming the first problem found, with its fix."""
        if not self.slices:
            raise FMOneShotError("The template has no slice.", "mark points on one slice of the template volume.")
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise FMOneShotError(f"Unknown template orientation {self.orientation!r}.",
                                 f"use one of: {', '.join(ORIENTATIONS)}, or none for the volumes' own slices.")
        names = self.label_names
        if len(set(names)) != len(names):
            raise FMOneShotError(f"Label names repeat: {names}.", "give every label its own name.")
        values = [label.value for label in self.labels]
        if len(set(values)) != len(values):
            raise FMOneShotError(f"Label values repeat: {values}.", "give every label its own value.")
        if not self.labels and not self.landmark_names:
            raise FMOneShotError("The template has neither labels nor landmarks.",
                                 "place positive points for a label, or name at least one landmark.")
        for k, s in enumerate(self.slices):
            H, W = s.image.shape
            where = f"template slice {s.index}" if len(self.slices) == 1 else f"template slice #{k} ({s.index})"
            for kind, table in (("positive", s.positive), ("negative", s.negative), ("mask", s.masks)):
                for name in table:
                    if name not in names:
                        raise FMOneShotError(
                            f"The {kind} {'mask' if kind == 'mask' else 'points'} on {where} belong to an unknown "
                            f"label {name!r}.", f"add the label first or use one of: {', '.join(names) or '(none)'}.")
            for kind, table in (("positive", s.positive), ("negative", s.negative)):
                for name, pts in table.items():
                    for x, y in pts:
                        if not (np.isfinite(x) and np.isfinite(y) and -0.5 <= x < W - 0.5 and -0.5 <= y < H - 0.5):
                            raise FMOneShotError(
                                f"The {kind} point ({x:g}, {y:g}) of label {name!r} lies outside {where}, whose "
                                f"pixels span x 0..{W - 1} and y 0..{H - 1}.", "place the point inside the image.")
            for name, (x, y) in s.landmarks.items():
                if not (-0.5 <= x < W - 0.5 and -0.5 <= y < H - 0.5):
                    raise FMOneShotError(f"Landmark {name!r} at ({x:g}, {y:g}) lies outside {where} "
                                         f"(x 0..{W - 1}, y 0..{H - 1}).", "place it inside the image.")
            for name, m in s.masks.items():
                if m.shape != (H, W):
                    raise FMOneShotError(f"The mask of {name!r} has shape {m.shape}, {where} has {(H, W)}.",
                                         "paint the mask on the template slice itself.")
        for name, ends in self.extent.items():
            if name not in names:
                raise FMOneShotError(f"The extent names an unknown label {name!r}.",
                                     f"give the extent of one of: {', '.join(names) or '(none)'}.")
            if len(ends) != 2 or int(ends[0]) > int(ends[1]) or int(ends[0]) < 0:
                raise FMOneShotError(f"The extent of {name!r} is {list(ends)}.",
                                     "give the first and last slice, first <= last, e.g. liver:40:75.")
        for name in names:
            n_pos = sum(len(s.positive.get(name, ())) for s in self.slices)
            n_mask = sum(int(s.masks[name].any()) for s in self.slices if name in s.masks)
            if n_pos == 0 and n_mask == 0:
                raise FMOneShotError(f"Label {name!r} has no positive point.",
                                     "place at least one positive point inside the structure (or paint its mask).")
        return self

    # ------------------------------------------------------------------ files
    def save(self, path, force: bool = False) -> Path:
        """Write ``path`` (.json) and its NRRD side files; refuse to overwrite unless ``force``."""
        path = Path(path)
        if path.suffix != ".json":
            raise FMOneShotError(f"A template file name must end with .json: {path}.", "e.g. liver-template.json")
        self.validate()
        side = {}
        for k, s in enumerate(self.slices):
            side[f"{path.stem}.slice{k}.nrrd"] = _image(s.image, s.pixel_spacing)
            if s.masks:
                stack = np.stack([s.masks.get(n, np.zeros(s.image.shape, bool)) for n in self.label_names])
                side[f"{path.stem}.slice{k}.masks.nrrd"] = _image(stack.astype(np.uint8), s.pixel_spacing)
        adapter_file = f"{path.stem}.adapter.safetensors"
        targets = [path.with_name(n) for n in side] + ([path.with_name(adapter_file)] if self.adapter else []) + [path]
        refuse_existing(targets, force, "choose another template name, or pass --force (force=True) to overwrite.")
        doc = {
            "format": FORMAT, "version": VERSION, "modality": self.modality, "settings": self.settings,
            "orientation": self.orientation,
            "extent": {n: [int(a), int(b)] for n, (a, b) in self.extent.items()},
            "labels": [{"name": lb.name, "value": lb.value, "color": list(lb.color)} for lb in self.labels],
            "slices": [{
                "image": f"{path.stem}.slice{k}.nrrd",
                "masks": f"{path.stem}.slice{k}.masks.nrrd" if s.masks else None,
                "mask_labels": [n for n in self.label_names] if s.masks else [],
                "painted": sorted(s.masks),
                "index": s.index, "pixel_spacing": list(s.pixel_spacing), "window": list(s.window),
                "source": s.source,
                "positive": {n: p.tolist() for n, p in s.positive.items()},
                "negative": {n: p.tolist() for n, p in s.negative.items()},
                "landmarks": {n: p.tolist() for n, p in s.landmarks.items()},
            } for k, s in enumerate(self.slices)],
        }
        if self.adapter:
            doc["adapter"] = {**self.adapter, "file": adapter_file}
        with atomic_paths(*targets) as temps:
            for tmp, img in zip(temps, side.values()):
                sitk.WriteImage(img, str(tmp), True)
            if self.adapter:
                from safetensors.torch import save_file

                save_file(self.adapter_tensors, str(temps[-2]))
            temps[-1].write_text(json.dumps(doc, indent=1))
        return path

    @classmethod
    def load(cls, path) -> "Template":
        path = Path(path)
        if not path.is_file():
            raise FMOneShotError(f"No template file at {path}.", "give the .json file written by 'save'.")
        try:
            doc = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FMOneShotError(f"{path} is not a valid template file ({exc}).",
                                 "give the .json file written by FMOneShot.") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise FMOneShotError(f"{path} is not an FMOneShot template.", "give the .json file written by FMOneShot.")
        if doc.get("version") != VERSION:
            raise FMOneShotError(f"{path} has template version {doc.get('version')}; this FMOneShot reads {VERSION}.",
                                 "update FMOneShot, or re-create the template.")
        try:
            labels = [Label(d["name"], d["value"], d.get("color")) for d in doc["labels"]]
            slices = []
            for d in doc["slices"]:
                image, spacing = _read(path.with_name(d["image"]))
                masks = {}
                if d.get("masks"):
                    stack, _ = _read(path.with_name(d["masks"]))
                    stack = stack.reshape((-1,) + image.shape)
                    masks = {n: stack[i].astype(bool) for i, n in enumerate(d["mask_labels"]) if n in d["painted"]}
                slices.append(TemplateSlice(image, d["index"], d.get("pixel_spacing", spacing), d["window"],
                                            d.get("positive", {}), d.get("negative", {}), masks,
                                            d.get("landmarks", {}), d.get("source", "")))
            template = cls(labels, slices, doc.get("modality"), doc.get("settings", {}),
                           orientation=doc.get("orientation"),
                           extent={n: (int(a), int(b)) for n, (a, b) in (doc.get("extent") or {}).items()})
            if doc.get("adapter"):
                template.adapter = {k: v for k, v in doc["adapter"].items() if k != "file"}
                template.adapter_tensors = _read_tensors(path.with_name(doc["adapter"]["file"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FMOneShotError):
                raise
            raise FMOneShotError(f"{path} is damaged or incomplete ({type(exc).__name__}: {exc}).",
                                 "re-create the template, or restore the file and its .nrrd side files.") from None
        return template.validate()


def _image(array: np.ndarray, pixel_spacing) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(pixel_spacing) + ((1.0,) if array.ndim == 3 else ()))
    return img


def _read_tensors(path: Path) -> dict:
    """A trained adapter's tensors: safetensors only, never a pickle."""
    if not path.is_file():
        raise FMOneShotError(f"The template's adapter file {path} is missing.",
                             "keep the .safetensors file next to the template .json, or re-create the template.")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise FMOneShotError(f"The adapter file {path} is damaged ({exc}).",
                             "restore it from a copy, or re-create the template.") from None


def _read(path: Path):
    if not path.is_file():
        raise FMOneShotError(f"The template side file {path} is missing.",
                             "keep the .nrrd files next to the template .json (copy them together).")
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(img.GetSpacing()[:2])


# ---------------------------------------------------------------------- prompts from a reference mask
def sample_prompts(mask: np.ndarray, n_positive: int = 5, n_negative: int = 5, seed: int = 0):
    """Points a radiologist would click, drawn from a reference mask: (positive (n, 2), negative (m, 2)).

    Positive points lie inside, away from the border (in the inner half by distance to the edge). Negative
    points lie outside: half in a band near the structure, half farther away inside the image.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise FMOneShotError("The reference mask is empty on this slice.", "choose a slice that contains the label.")
    rng = np.random.default_rng(seed)
    depth = ndi.distance_transform_edt(mask)
    inner = np.argwhere(depth >= max(1.0, 0.5 * depth.max()))
    pos = inner[rng.choice(len(inner), min(n_positive, len(inner)), replace=False)]
    dist_out = ndi.distance_transform_edt(~mask)
    scale = max(2.0, np.sqrt(mask.sum()) / 4)
    near = np.argwhere((dist_out >= 2) & (dist_out <= scale))
    far = np.argwhere(dist_out > scale)
    n_near = (n_negative + 1) // 2 if len(far) else n_negative
    pick_near = near[rng.choice(len(near), min(n_near, len(near)), replace=False)] if len(near) else near
    pick_far = far[rng.choice(len(far), min(n_negative - len(pick_near), len(far)), replace=False)] if len(far) else far
    neg = np.concatenate([pick_near, pick_far])
    return pos[:, ::-1].astype(float), neg[:, ::-1].astype(float)
