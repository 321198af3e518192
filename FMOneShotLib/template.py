"""The template: what a radiologist marked once, and the settings to reproduce the result.

A template holds labels (name, value, colour) and one or more template slices. Each slice keeps its pixels
as acquired, the intensity window of its volume, positive and negative points per label, optional painted
masks per label and named landmarks, all in pixel coordinates (x = column, y = row) of that slice.

On disk: ``NAME.json`` plus ``NAME.slice<k>.nrrd`` (pixels with spacing) and ``NAME.slice<k>.masks.nrrd``
(one uint8 layer per label). Never pickle; everything is validated on load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .errors import FMOneShotError
from .files import atomic_paths, check_folder, refuse_existing
from .image import BLANK_SPREAD, LABEL_EXTENSIONS, MODALITIES, ORIENTATIONS, Volume, intensity_window, normalize
from .terminology import PALETTE, Terminology, default_color, for_name, label_color  # noqa: F401 (re-exported)

FORMAT = "fmoneshot-template"
VERSION = 1

_NUMBER = {"type": "number"}
_POINT = {"type": "array", "items": _NUMBER, "minItems": 2, "maxItems": 2,
          "description": "pixel (x = column, y = row) of the template slice"}
_FILE = {"type": "string", "pattern": r"^[^/\\]+$", "description": "a file beside the template .json"}
# The structure of a template .json (JSON Schema draft 2020-12), checked on load before anything is read;
# the checks on meaning (points inside the slice, known labels, contrast) are in Template.validate.
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "FMOneShot template",
    "type": "object",
    "required": ["format", "version", "labels", "slices"],
    "properties": {
        "format": {"const": FORMAT},
        "version": {"const": VERSION},
        "modality": {"enum": [None, *MODALITIES]},
        "settings": {"type": "object"},
        "orientation": {"enum": [None, *ORIENTATIONS]},
        "labels": {"type": "array", "items": {
            "type": "object", "required": ["name", "value"],
            "properties": {"name": {"type": "string", "minLength": 1, "pattern": r"\S"},
                           "value": {"type": "integer", "minimum": 1, "maximum": 65535},
                           "color": {"type": ["array", "null"], "minItems": 3, "maxItems": 3,
                                     "items": {"type": "integer", "minimum": 0, "maximum": 255}},
                           "terminology": {"type": ["object", "null"]}}}},
        "slices": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["image", "index", "window"],
            "properties": {
                "image": _FILE,
                "masks": {"anyOf": [_FILE, {"type": "null"}]},
                "mask_labels": {"type": "array", "items": {"type": "string"}},
                "painted": {"type": "array", "items": {"type": "string"}},
                "index": {"type": "integer", "minimum": 0},
                "pixel_spacing": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0},
                                  "minItems": 2, "maxItems": 2},
                "window": {"type": "array", "items": _NUMBER, "minItems": 2, "maxItems": 2},
                "source": {"type": "string"},
                "positive": {"type": "object", "additionalProperties": {"type": "array", "items": _POINT}},
                "negative": {"type": "object", "additionalProperties": {"type": "array", "items": _POINT}},
                "landmarks": {"type": "object", "additionalProperties": _POINT},
            }}},
        "adapter": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["file", "description"],
                                                 "properties": {"file": _FILE, "description": {"type": "object"}}}]},
    },
}


def check_schema(doc, where) -> None:
    """Raise FMOneShotError naming the first field of ``doc`` that breaks :data:`SCHEMA` (``where``: the file,
    for the message), e.g. ``slices[0].pixel_spacing: [3.0] is too short``. Uses the jsonschema library."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(doc))
    if error is None:
        return
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    raise FMOneShotError(f"{where}: the field {field or '(top level)'} is wrong: {error.message}.",
                         "correct that field (the format is template.SCHEMA), or re-create the template.")


def color_table_path(labels_path) -> Path:
    """The colour table written beside a label volume: its name with the image extension replaced by
    ``.ctbl`` (``ct-labels.nii.gz`` -> ``ct-labels.ctbl``)."""
    labels_path = Path(labels_path)
    ext = next((e for e in LABEL_EXTENSIONS if labels_path.name.endswith(e)), labels_path.suffix)
    return labels_path.with_name(labels_path.name[:len(labels_path.name) - len(ext)] + ".ctbl")


def write_color_table(labels: list, path, force: bool = False) -> Path:
    """Write which value is which label (``labels``: :class:`Label` list) to ``path`` in Slicer's colour-table
    text format (``.ctbl``, read by vtkMRMLColorTableStorageNode, i.e. File > Add Data in Slicer): comment
    lines, then ``VALUE NAME R G B A`` per line, 0 Background first, colours 0-255. Slicer's convention for
    names applies: a space is written as ``_``, and an ``_`` is read back as a space (``kidney_right`` shows
    as "kidney right" in Slicer). Refuses to overwrite unless ``force``; never leaves half a file."""
    path = Path(path)
    refuse_existing([path], force)
    lines = ["# FMOneShot label values: VALUE NAME R G B A (a Slicer colour table)", "0 Background 0 0 0 0"]
    for lb in sorted(labels, key=lambda lb: lb.value):
        lines.append(f"{lb.value} {'_'.join(lb.name.split())} {' '.join(str(int(c)) for c in lb.color)} 255")
    with atomic_paths(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Label:
    """A structure to segment: its name, its value in label volumes (1-65535), its colour (R, G, B 0-255) and
    its standard terminology (:class:`terminology.Terminology`). Without a terminology, the codes are looked up
    by name (``terminology.for_name``: the generic "Tissue" code for an unknown name); without a colour, the
    terminology's conventional colour, else one of :data:`PALETTE` by value. A colour given is kept."""

    name: str
    value: int
    color: tuple = None
    terminology: Terminology = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise FMOneShotError("A label has no name.", "give every label a non-empty name, e.g. 'liver'.")
        if int(self.value) < 1 or int(self.value) > 65535:
            raise FMOneShotError(f"Label {self.name!r} has value {self.value}.", "use values 1 to 65535 (0 is background).")
        self.value = int(self.value)
        if isinstance(self.terminology, dict):
            self.terminology = Terminology.from_dict(self.terminology)
        self.terminology = self.terminology or for_name(self.name)
        self.color = tuple(int(c) for c in (self.color or label_color(self.value, self.terminology)))


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
                    orientation: str | None = None, extent: dict | None = None) -> "Template":
        """A template from one slice of ``volume``; labels default to the names used, numbered 1, 2, ...

        With an ``orientation`` ("axial", "coronal", "sagittal") the slice is ``slice_index`` of that plane
        (``Volume.resliced``) and points are pixels of it; without one, of the volume's own slices.
        ``extent``: {label: (first, last)} slice indices of that plane (:attr:`extent`)."""
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
                       extent={n: (int(a), int(b)) for n, (a, b) in (extent or {}).items()}, volume=source)
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
            lo, hi = s.window
            if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
                raise FMOneShotError(f"The intensity window {list(s.window)} of {where} is not a range (low < high).",
                                     "re-create the template, or give a window such as [-160, 240].")
            _check_contrast(s, where)
            for name, m in s.masks.items():
                if m.shape != (H, W):
                    raise FMOneShotError(f"The mask of {name!r} has shape {m.shape}, {where} has {(H, W)}.",
                                         "paint the mask on the template slice itself.")
        for name in names:
            n_pos = sum(len(s.positive.get(name, ())) for s in self.slices)
            n_mask = sum(int(s.masks[name].any()) for s in self.slices if name in s.masks)
            if n_pos == 0 and n_mask == 0:
                raise FMOneShotError(f"Label {name!r} has no positive point.",
                                     "place at least one positive point inside the structure (or paint its mask).")
        self._check_extent(names)
        return self

    def _check_extent(self, names: list) -> None:
        """Each label's :attr:`extent` names a label, is ``0 <= first <= last``, lies inside the template volume's
        slices in the template's plane (where :attr:`volume` is known: a template just made, not one read back),
        and contains a template slice on which the label is marked (positive points or painted mask; every
        label has one, checked before): an extent that does not would bound every target to slices without
        the structure, an empty result. Every template passes through here (:meth:`from_volume`, :meth:`load`,
        :meth:`save`, the command line's --extent, the Slicer panel's first and last slice via
        ``mrml.template_from_markups``, and ``pipeline.OneShot``)."""
        n_plane = plane = None
        if self.volume is not None:
            axis = self.volume.slice_axis(self.orientation)
            n_plane, plane = self.volume.resliced(axis).n_slices, self.volume.orientation_of(axis)
        for name, ends in self.extent.items():
            if name not in names:
                raise FMOneShotError(f"The extent names an unknown label {name!r}.",
                                     f"give the extent of one of: {', '.join(names) or '(none)'}.")
            marked = sorted({s.index for s in self.slices
                             if len(s.positive.get(name, ())) or (name in s.masks and s.masks[name].any())})
            on = f"slice {marked[0]}" if len(marked) == 1 else "slices " + ", ".join(map(str, marked))
            within = f"between 0 and {n_plane - 1}, " if n_plane is not None else ""
            fix = (f"give the first and last slice where the structure lies, {within}first <= last, including {on} "
                   "where it is marked; or leave its extent out.")
            volume = (f"; the template volume {self.volume.name!r} has {plane} slices 0 to {n_plane - 1}"
                      if n_plane is not None else "")
            if len(ends) != 2:
                raise FMOneShotError(f"The extent of label {name!r} is {list(ends)}, not a first and last slice.", fix)
            first, last = int(ends[0]), int(ends[1])
            if first > last or first < 0:
                raise FMOneShotError(f"The extent of label {name!r} is slices {first} to {last}, "
                                     + ("the first after the last" if first > last else "below slice 0")
                                     + f" (it is marked on template {on}{volume}).", fix)
            if n_plane is not None and last >= n_plane:
                raise FMOneShotError(f"The extent of label {name!r} is slices {first} to {last}, beyond the template "
                                     f"volume {self.volume.name!r}, which has {plane} slices 0 to {n_plane - 1} "
                                     f"(the label is marked on {on}).", fix)
            if not any(first <= k <= last for k in marked):
                raise FMOneShotError(f"The extent of label {name!r} is slices {first} to {last}, and the label is "
                                     f"marked on template {on}, outside it{volume}.", fix)

    def digest(self) -> str:
        """sha256 (64 hex digits) of everything in the template that decides a result: labels (names and
        values, not colours), plane, modality, settings, and per slice its pixels, spacing, window, points,
        painted masks and landmarks, and the trained adapter (description and tensors). The same template in
        memory and read back from its files gives the same digest; a batch records it to tell its own outputs
        from those of another template (``batch.run``)."""
        h = hashlib.sha256()
        doc = {"labels": [[lb.name, lb.value] for lb in self.labels], "modality": self.modality,
               "orientation": self.orientation, "settings": self.settings, "adapter": self.adapter,
               "tensors": {n: [str(t.dtype), list(t.shape)] for n, t in sorted(self.adapter_tensors.items())},
               "slices": [{"index": s.index, "shape": list(s.image.shape), "pixel_spacing": list(s.pixel_spacing),
                           "window": list(s.window), "painted": sorted(s.masks),
                           "positive": {n: p.tolist() for n, p in s.positive.items()},
                           "negative": {n: p.tolist() for n, p in s.negative.items()},
                           "landmarks": {n: p.tolist() for n, p in s.landmarks.items()}} for s in self.slices]}
        h.update(json.dumps(doc, sort_keys=True, default=str).encode())
        for s in self.slices:
            h.update(np.ascontiguousarray(s.image, np.float32).tobytes())
            for name in sorted(s.masks):
                h.update(np.packbits(s.masks[name]).tobytes())
        if self.adapter_tensors:
            import torch  # only a template with a trained adapter holds tensors

            for name, tensor in sorted(self.adapter_tensors.items()):
                h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ files
    def files(self, path, adapter: bool | None = None) -> list:
        """Every file :meth:`save` writes for ``path``: the side files, then ``path`` itself last.
        ``adapter``: whether the trained adapter's file is among them (default: whether one is held; True
        before a fit that will train one)."""
        path = Path(path)
        names = []
        for k, s in enumerate(self.slices):
            names.append(side_file(path, k))
            if s.masks:
                names.append(side_file(path, k, "masks"))
        if self.adapter if adapter is None else adapter:
            names.append(side_file(path, None, "adapter"))
        return [path.with_name(n) for n in names] + [path]

    def save(self, path, force: bool = False) -> Path:
        """Write ``path`` (.json) and its NRRD side files; refuse to overwrite unless ``force``."""
        path = Path(path)
        if path.suffix != ".json":
            raise FMOneShotError(f"A template file name must end with .json: {path}.", "e.g. liver-template.json")
        self.validate()
        side = {}
        for k, s in enumerate(self.slices):
            side[side_file(path, k)] = _image(s.image, s.pixel_spacing)
            if s.masks:
                stack = np.stack([s.masks.get(n, np.zeros(s.image.shape, bool)) for n in self.label_names])
                side[side_file(path, k, "masks")] = _image(stack.astype(np.uint8), s.pixel_spacing)
        adapter_file = side_file(path, None, "adapter")
        targets = self.files(path)
        for target in targets:
            check_folder(target)
        refuse_existing(targets, force, "choose another template name, or pass --force (force=True) to overwrite.")
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": FORMAT, "version": VERSION, "modality": self.modality, "settings": self.settings,
            "orientation": self.orientation,
            "extent": {n: [int(a), int(b)] for n, (a, b) in self.extent.items()},
            "labels": [{"name": lb.name, "value": lb.value, "color": list(lb.color),
                        "terminology": lb.terminology.to_dict()} for lb in self.labels],
            "slices": [{
                "image": side_file(path, k),
                "masks": side_file(path, k, "masks") if s.masks else None,
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
                from safetensors.torch import save

                # bytes written by Python: the permissions of every other file (safetensors' own writer
                # creates the file 0600)
                temps[-2].write_bytes(save(self.adapter_tensors))
            temps[-1].write_text(json.dumps(doc, indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> "Template":
        path = Path(path)
        if not path.is_file():
            raise FMOneShotError(f"No template file at {path}.", "give the .json file written by 'save'.")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FMOneShotError(f"{path} is not a valid template file ({exc}).",
                                 "give the .json file written by FMOneShot.") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise FMOneShotError(f"{path} is not an FMOneShot template.", "give the .json file written by FMOneShot.")
        if doc.get("version") != VERSION:
            raise FMOneShotError(f"{path} has template version {doc.get('version')}; this FMOneShot reads {VERSION}.",
                                 "update FMOneShot, or re-create the template.")
        check_schema(doc, path)
        try:
            # templates written before terminology was kept take the codes from the label's name
            labels = [Label(d["name"], d["value"], d.get("color"), d.get("terminology")) for d in doc["labels"]]
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


def _check_contrast(s: TemplateSlice, where: str) -> None:
    """Refuse a template slice without contrast: blank as a whole, or blank around one of its marks (within a
    quarter of the slice's longer side), where a mark would describe nothing."""
    image = normalize(s.image, s.window)
    if float(np.ptp(image)) <= BLANK_SPREAD:
        raise FMOneShotError(f"{where.capitalize()} has one grey value in the intensity window {list(s.window)} "
                             "(blank, constant, or all missing): there is nothing to mark on it.",
                             "choose a slice that shows the structures.")
    H, W = image.shape
    r = max(2, max(H, W) // 4)
    marks = [(f"positive point of {n!r}", p) for n, pts in s.positive.items() for p in pts]
    marks += [(f"negative point of {n!r}", p) for n, pts in s.negative.items() for p in pts]
    marks += [(f"landmark {n!r}", p) for n, p in s.landmarks.items()]
    for what, (x, y) in marks:
        x, y = int(round(x)), int(round(y))
        patch = image[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1]
        if patch.size and float(np.ptp(patch)) <= BLANK_SPREAD:
            raise FMOneShotError(f"The {what} at ({x}, {y}) on {where} lies in a region of one grey value "
                                 f"({2 * r + 1} pixels across): it describes nothing FMOneShot can find again.",
                                 "place it on the structure, where the image shows it.")


def side_file(path, k, kind: str = "image") -> str:
    """The name of a template's side file beside ``path`` (.json): slice ``k``'s pixels (``image``:
    NAME.slice<k>.nrrd) or painted masks (``masks``: NAME.slice<k>.masks.nrrd), or the trained ``adapter``
    (NAME.adapter.safetensors)."""
    stem = Path(path).stem
    return {"image": f"{stem}.slice{k}.nrrd", "masks": f"{stem}.slice{k}.masks.nrrd",
            "adapter": f"{stem}.adapter.safetensors"}[kind]


def template_files(path, n_slices: int = 1, adapter: bool = True) -> list:
    """The files :meth:`Template.save` writes for ``path`` (.json) with ``n_slices`` slices: each slice's
    ``.slice<k>.nrrd`` and ``.slice<k>.masks.nrrd``, the ``.adapter.safetensors`` (when ``adapter``), the
    .json last. For a template file that exists, also the side files its JSON names, so that a caller can
    keep every file of a template it reads from being written over. Raises FMOneShotError when ``path`` does
    not end with .json."""
    path = Path(path)
    if path.suffix != ".json":
        raise FMOneShotError(f"A template file name must end with .json: {path}.", "e.g. liver-template.json")
    names = [side_file(path, k, kind) for k in range(n_slices) for kind in ("image", "masks")]
    names += [side_file(path, None, "adapter")] if adapter else []
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            names += [str(d.get(k)) for d in doc.get("slices", []) for k in ("image", "masks") if d.get(k)]
            names += [str(doc["adapter"]["file"])] if isinstance(doc.get("adapter"), dict) and \
                doc["adapter"].get("file") else []
        except (ValueError, TypeError, AttributeError, KeyError, UnicodeDecodeError):
            pass  # a damaged file is refused when it is loaded
    return [path.parent / n for n in dict.fromkeys(names)] + [path]


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
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:
        raise FMOneShotError(f"The template side file {path} is damaged (not an image SimpleITK reads).",
                             "restore it from a copy, or re-create the template.") from None
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
