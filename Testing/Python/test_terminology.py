"""Standard terminology: label names -> SNOMED CT codes and colours, kept in templates, segments and .seg.nrrd."""

import json

import numpy as np
import pytest

from FMOneShotLib import terminology
from FMOneShotLib.errors import FMOneShotError
from FMOneShotLib.image import Volume
from FMOneShotLib.template import PALETTE, Label, Template

# SNOMED CT concept ids (the DICOM standard's CID 7151 / 244), fixed by the standard, not by our table
LIVER, SPLEEN, KIDNEY, GALLBLADDER, BLADDER, SMALL_INTESTINE = \
    "10200004", "78961009", "64033007", "28231008", "89837001", "30315005"
ANATOMICAL_STRUCTURE, TISSUE, LEFT, RIGHT = "123037004", "85756007", "7771000", "24028007"


def codes(t):
    return (t.category.value, t.type.value, t.type_modifier.value if t.type_modifier else None)


@pytest.mark.parametrize("name, expected", [
    ("liver", (ANATOMICAL_STRUCTURE, LIVER, None)), ("Spleen", (ANATOMICAL_STRUCTURE, SPLEEN, None)),
    ("kidney_left", (ANATOMICAL_STRUCTURE, KIDNEY, LEFT)), ("Left kidney", (ANATOMICAL_STRUCTURE, KIDNEY, LEFT)),
    ("kidney-right", (ANATOMICAL_STRUCTURE, KIDNEY, RIGHT)), ("RIGHT KIDNEY", (ANATOMICAL_STRUCTURE, KIDNEY, RIGHT)),
    ("kidney", (ANATOMICAL_STRUCTURE, KIDNEY, None)), ("gallbladder", (ANATOMICAL_STRUCTURE, GALLBLADDER, None)),
    ("urinary bladder", (ANATOMICAL_STRUCTURE, BLADDER, None)),
    ("Small intestine", (ANATOMICAL_STRUCTURE, SMALL_INTESTINE, None)),  # the code meaning of small_bowel
])
def test_known_names_get_their_snomed_codes(name, expected):
    t = terminology.lookup(name)
    assert t is not None and codes(t) == expected
    assert {t.category.scheme, t.type.scheme} == {"SCT"} and t.color is not None


@pytest.mark.parametrize("name", ["fetal_head", "liver tumour", "tumour", "bladder", "left", "", "  "])
def test_unknown_names_keep_the_generic_code(name):
    assert terminology.lookup(name) is None
    assert codes(terminology.for_name(name)) == (TISSUE, TISSUE, None) and terminology.for_name(name).is_generic


def test_the_vendored_table_is_the_maintained_file():
    import hashlib

    digest = hashlib.sha256(terminology.TABLE.read_bytes()).hexdigest()
    readme = (terminology.TABLE.parent / "README.md").read_text(encoding="utf-8")
    assert digest in readme  # the file is unchanged since it was copied, as its README says
    licence = (terminology.TABLE.parent / "TotalSegmentator-LICENSE").read_text(encoding="utf-8")
    assert licence.lstrip().startswith("Apache License")
    assert len(terminology.table()) >= 150


def test_labels_take_codes_and_colour_from_the_name_unless_given():
    liver = Label("liver", 1)
    assert codes(liver.terminology)[1] == LIVER and liver.color == liver.terminology.color
    assert Label("liver", 1, (1, 2, 3)).color == (1, 2, 3)  # the user's colour wins
    unknown = Label("fetal head", 3)
    assert unknown.terminology.is_generic and unknown.color == PALETTE[2]
    custom = terminology.Terminology(terminology.Code("SCT", ANATOMICAL_STRUCTURE, "Anatomical Structure"),
                                     terminology.Code("SCT", "69536005", "Head"))
    assert Label("fetal head", 3, terminology=custom).terminology == custom


def test_template_file_keeps_the_codes(tmp_path):
    vol = Volume(np.random.default_rng(0).normal(size=(3, 20, 24)).astype(np.float32))
    custom = terminology.Terminology(terminology.Code("SCT", ANATOMICAL_STRUCTURE, "Anatomical Structure"),
                                     terminology.Code("SCT", "69536005", "Head"), color=(5, 6, 7))
    labels = [Label("kidney_left", 1), Label("fetal head", 2, terminology=custom)]
    tpl = Template.from_volume(vol, 1, {"kidney_left": [[5, 5]], "fetal head": [[10, 10]]}, labels=labels)
    path = tpl.save(tmp_path / "t.json")
    back = Template.load(path)
    assert [lb.terminology for lb in back.labels] == [lb.terminology for lb in labels]
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["labels"][0]["terminology"]["type_modifier"] == ["SCT", LEFT, "Left"]
    # a template written before terminology was kept: the codes come from the names
    for d in doc["labels"]:
        del d["terminology"]
    path.write_text(json.dumps(doc), encoding="utf-8")
    old = Template.load(path)
    assert codes(old.labels[0].terminology) == (ANATOMICAL_STRUCTURE, KIDNEY, LEFT)
    assert old.labels[1].terminology.is_generic
    # a damaged terminology is refused with the fix, not guessed
    doc["labels"][0]["terminology"] = {"type": ["SCT", LIVER, "Liver"]}
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(FMOneShotError, match="must hold a category and a type"):
        Template.load(path)
    doc["labels"][0]["terminology"] = {"category": ["SCT", "1"], "type": ["SCT", LIVER, "Liver"]}
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(FMOneShotError, match=r"must be \[scheme, value, meaning\]"):
        Template.load(path)


# ---------------------------------------------------------------------------------------------------- Slicer
def test_segments_and_seg_nrrd_carry_the_codes(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra")
    slicerio = pytest.importorskip("slicerio", reason="slicerio is part of the [test] extra")
    from FMOneShotLib import mrml

    vol = Volume(np.zeros((4, 6, 8), np.int16), (0.8, 0.8, 2.0), name="ct")
    scene = slicer.vtkMRMLScene()
    node = mrml.node_from_volume(scene, vol)
    labels = np.zeros(vol.array.shape, np.uint8)
    labels[1, 1:3, 1:4], labels[2, 3:5, 4:7] = 1, 2
    template_labels = [Label("liver", 1), Label("kidney_left", 2), Label("fetal head", 3)]
    seg = mrml.segmentation_from_labels(scene, vol.like(labels), template_labels, node, "ct segmentation")
    segmentation = seg.GetSegmentation()
    for lb in template_labels:  # in the scene: the codes as Slicer's terminology selector sets them
        assert mrml.segment_terminology(segmentation.GetSegment(lb.name)) == \
            terminology.Terminology(lb.terminology.category, lb.terminology.type, lb.terminology.type_modifier)
        assert np.allclose(segmentation.GetSegment(lb.name).GetColor(), np.array(lb.color) / 255)
    (path,) = mrml.export_segmentations([seg], tmp_path, ".seg.nrrd")
    read = slicerio.read_segmentation(str(path))
    by_name = {s["name"]: s for s in read["segments"]}
    assert set(by_name) == {"liver", "kidney_left", "fetal head"}
    liver, kidney, head = (by_name[n]["terminology"] for n in ("liver", "kidney_left", "fetal head"))
    assert liver["category"] == ["SCT", ANATOMICAL_STRUCTURE, "Anatomical Structure"]
    assert liver["type"] == ["SCT", LIVER, "Liver"] and "typeModifier" not in liver
    assert kidney["type"] == ["SCT", KIDNEY, "Kidney"] and kidney["typeModifier"] == ["SCT", LEFT, "Left"]
    assert head["category"] == head["type"] == ["SCT", TISSUE, "Tissue"]
    assert np.allclose(by_name["liver"]["color"], np.array(template_labels[0].color) / 255, atol=1e-4)
    # the voxels travel with them: slicerio's mask of each segment is the label volume's
    for lb in template_labels[:2]:
        mask = slicerio.extract_segments(read, [(lb.name, 1)])["voxels"]
        assert mask.sum() == (labels == lb.value).sum() > 0
