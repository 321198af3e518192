"""Standard terminology for labels: what a label *is*, in codes that Slicer, PACS and other tools understand.

A label named like a known structure (``liver``, ``kidney_left``, ``Left kidney``, ``urinary bladder``, ...)
gets the DICOM Segmented Property Category, Type and Type Modifier codes (SNOMED CT), the Anatomic Region
where the type alone does not place it, and a conventional display colour. An unknown name gets the generic
code "Tissue" (SNOMED CT 85756007, the code Slicer gives a segment it knows nothing about) and no colour.

The codes come from one maintained table, TotalSegmentator's name -> SNOMED CT mapping
(``resources/totalsegmentator_snomed_mapping.csv``, Apache-2.0, vendored unchanged: resources/README.md); no
code is written by hand here. The codes travel with each :class:`template.Label`, into the template file, the
segments of a Slicer segmentation node (``mrml.set_segment_terminology``), ``.seg.nrrd`` files and DICOM SEG
(``dicomseg``). Names are matched after folding case and separators, and with the side first or last
("Left kidney", "kidney-left" and "kidney_left" are the same); the code meaning of a type also matches
("Small intestine" finds ``small_bowel``). A name is never matched partially ("liver tumour" is not "liver").
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import FMOneShotError

TABLE = Path(__file__).resolve().parent / "resources" / "totalsegmentator_snomed_mapping.csv"
SIDES = ("left", "right")
# Distinct colours for labels 1, 2, ... (Slicer's GenericAnatomyColors feel: tissue-like, distinguishable), for
# structures the table gives no colour.
PALETTE = [(221, 130, 101), (157, 108, 162), (185, 102, 83), (216, 101, 79), (144, 238, 144),
           (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (230, 220, 70)]


@dataclass(frozen=True)
class Code:
    """One coded concept as DICOM writes it (Code Sequence macro, DICOM PS3.3 Table 8.8-1): the coding scheme
    designator (``"SCT"``: SNOMED CT), the code value and its human-readable meaning."""

    scheme: str
    value: str
    meaning: str

    def __post_init__(self):
        for field_name in ("scheme", "value", "meaning"):
            if not isinstance(getattr(self, field_name), str) or not getattr(self, field_name).strip():
                raise FMOneShotError(f"A terminology code has no {field_name} ({self.scheme!r}, {self.value!r}, "
                                     f"{self.meaning!r}).",
                                     "give scheme, value and meaning, e.g. SCT, 10200004, Liver.")

    def to_list(self) -> list:
        return [self.scheme, self.value, self.meaning]

    @classmethod
    def from_list(cls, item) -> "Code":
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise FMOneShotError(f"A terminology code must be [scheme, value, meaning]; got {item!r}.",
                                 "write codes as three strings, e.g. [\"SCT\", \"10200004\", \"Liver\"].")
        return cls(*(str(x) for x in item))


# The codes of an unknown structure: category and type "Tissue", as Slicer's default terminology entry.
TISSUE = Code("SCT", "85756007", "Tissue")
CODE_FIELDS = ("category", "type", "type_modifier", "region", "region_modifier")


@dataclass(frozen=True)
class Terminology:
    """What a segment is, in the terms of DICOM SEG's Segment Description (PS3.3 C.8.20.2):
    ``category`` (Segmented Property Category, e.g. Anatomical Structure), ``type`` (Segmented Property Type,
    e.g. Kidney), ``type_modifier`` (e.g. Left), ``region`` and ``region_modifier`` (Anatomic Region, for
    types such as Cyst that need a place). ``color``: the conventional display colour (R, G, B 0-255) or None.
    ``name``: the table entry that matched (e.g. ``kidney_left``), "" for the generic code."""

    category: Code
    type: Code
    type_modifier: Code | None = None
    region: Code | None = None
    region_modifier: Code | None = None
    color: tuple | None = None
    name: str = ""

    @property
    def is_generic(self) -> bool:
        return self.type == TISSUE and self.category == TISSUE and self.type_modifier is None

    def to_dict(self) -> dict:
        """For the template JSON: each code as [scheme, value, meaning], absent ones left out."""
        doc = {f: getattr(self, f).to_list() for f in CODE_FIELDS if getattr(self, f) is not None}
        if self.color is not None:
            doc["color"] = list(self.color)
        if self.name:
            doc["name"] = self.name
        return doc

    @classmethod
    def from_dict(cls, doc) -> "Terminology":
        """The inverse of :meth:`to_dict`; FMOneShotError when ``doc`` lacks category or type or is malformed."""
        if not isinstance(doc, dict) or "category" not in doc or "type" not in doc:
            raise FMOneShotError(f"A label's terminology must hold a category and a type; got {doc!r}.",
                                 "write it as {\"category\": [scheme, value, meaning], \"type\": [...]}, or "
                                 "leave it out to take the codes from the label's name.")
        unknown = sorted(set(doc) - set(CODE_FIELDS) - {"color", "name"})
        if unknown:
            raise FMOneShotError(f"Unknown terminology fields {unknown}.",
                                 f"use {', '.join(CODE_FIELDS)}, color, name.")
        codes = {f: Code.from_list(doc[f]) for f in CODE_FIELDS if doc.get(f) is not None}
        color = doc.get("color")
        return cls(**codes, color=_color(color) if color is not None else None, name=str(doc.get("name", "")))


GENERIC = Terminology(TISSUE, TISSUE)


def _color(value) -> tuple:
    try:
        rgb = tuple(int(c) for c in value)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise FMOneShotError(f"A colour must be three values 0-255; got {value!r}.", "e.g. [221, 130, 101].")
    return rgb


def normalize_name(name: str) -> str:
    """'Kidney - Left ' -> 'kidney_left': lower case, runs of anything but letters and digits -> '_'."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_")


@functools.lru_cache(maxsize=None)
def table() -> dict:
    """The vendored mapping as {normalised structure name: Terminology}, read once."""
    def code(row, prefix):
        parts = [row[f"{prefix}.{k}"].strip() for k in ("CodingSchemeDesignator", "CodeValue", "CodeMeaning")]
        return Code(*parts) if all(parts) else None

    out = {}
    with open(TABLE, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            name = normalize_name(row["Structure"])
            color = row.get("DicomRGBColor", "").strip()
            out[name] = Terminology(
                code(row, "SegmentedPropertyCategoryCodeSequence"), code(row, "SegmentedPropertyTypeCodeSequence"),
                code(row, "SegmentedPropertyTypeModifierCodeSequence"), code(row, "AnatomicRegionSequence"),
                code(row, "AnatomicRegionModifierSequence"), _color(color.split(",")) if color else None,
                row["Structure"].strip())
    return out


@functools.lru_cache(maxsize=None)
def _by_meaning() -> dict:
    """{normalised type meaning (+ side): Terminology} for entries whose type and side say it all."""
    out = {}
    for entry in table().values():
        if entry.region is not None:
            continue
        key = normalize_name(entry.type.meaning)
        if entry.type_modifier is not None:
            side = normalize_name(entry.type_modifier.meaning)
            if side not in SIDES:
                continue
            key = f"{key}_{side}"
        out.setdefault(key, entry)
    return out


def lookup(name: str) -> Terminology | None:
    """The standard terminology of a structure named ``name``, or None when the table does not know it.

    Tried in order, after :func:`normalize_name`: the table's structure name; the same with the side moved
    to the end ("left kidney" -> "kidney_left"); the code meaning of the type, with its side ("Urinary
    bladder", "Right kidney")."""
    key = normalize_name(name)
    if not key:
        return None
    words = key.split("_")
    keys = [key]
    if len(words) > 1 and words[0] in SIDES:
        keys.append("_".join(words[1:] + words[:1]))
    for k in keys:
        if k in table():
            return table()[k]
    for k in keys:
        if k in _by_meaning():
            return _by_meaning()[k]
    return None


def for_name(name: str) -> Terminology:
    """:func:`lookup`, or the generic "Tissue" code for a name the table does not know."""
    return lookup(name) or GENERIC


def default_color(value: int) -> tuple:
    """The :data:`PALETTE` colour (R, G, B 0-255) of label value ``value`` (1, 2, ...; cycles)."""
    return PALETTE[(value - 1) % len(PALETTE)]


def label_color(value: int, terminology: Terminology) -> tuple:
    """The colour (R, G, B 0-255) of a label whose user chose none: its terminology's conventional colour (the
    vendored table's ``DicomRGBColor``), else :func:`default_color` of its value. The one place of this rule:
    ``template.Label`` and ``mrml.add_label`` (the Slicer panel's "Add label") both use it."""
    return tuple(int(c) for c in (terminology.color or default_color(value)))
