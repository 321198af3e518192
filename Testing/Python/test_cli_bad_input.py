"""Bad input never gives a traceback: malformed templates, images and arguments, each built here, end with
exit code 2 and one line on stderr that names the problem and the fix, and nothing is written (issue 16)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from FMOneShotLib.cli import main
from FMOneShotLib.image import read_volume
from FMOneShotLib.template import Template

from conftest import REPO

CT = REPO / "Testing/Data/totalseg-ct-small/images/ct-small.nii.gz"
DATA = REPO / "Testing/Data/totalseg-ct-small"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid template (points and a painted mask) saved once; each case edits a copy."""
    folder = tmp_path_factory.mktemp("good")
    ct = read_volume(CT)
    mask = np.zeros(ct.slice_shape, bool)
    mask[40:60, 80:95] = True
    Template.from_volume(ct, 24, {"liver": [[86, 49], [88, 37]]}, {"liver": [[30, 60]]}, {"liver": mask}).save(
        folder / "t.json")
    return folder


def edited(tmp_path, good, change):
    """A copy of the good template with ``change(doc, folder)`` applied to its JSON (and side files)."""
    for f in good.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    doc = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    new = change(doc, tmp_path)
    text = new if isinstance(new, str) else json.dumps(doc if new is None else new)
    (tmp_path / "t.json").write_text(text, encoding="utf-8")
    return tmp_path / "t.json"


def first_slice(key, value):
    def change(doc, folder):
        doc["slices"][0][key] = value
    return change


TEMPLATES = {
    "pixel spacing of one number": (first_slice("pixel_spacing", [3.0]), "slices[0].pixel_spacing"),
    "zero pixel spacing": (first_slice("pixel_spacing", [0, 1]), "slices[0].pixel_spacing[0]"),
    "a window of width 0": (first_slice("window", [40, 40]), "window [40.0, 40.0]"),
    "a point with 4 numbers": (first_slice("positive", {"liver": [[86, 49, 88, 37]]}), "slices[0].positive.liver[0]"),
    "a fractional label value": (lambda d, f: d["labels"][0].update(value=5.9), "labels[0].value"),
    "a label without a name": (lambda d, f: d["labels"][0].pop("name") and None, "labels[0]"),
    "no labels at all": (lambda d, f: d.pop("labels") and None, "'labels' is a required property"),
    "a side file outside the folder": (first_slice("image", "../t.slice0.nrrd"), "slices[0].image"),
    "a NaN point": (lambda d, f: "", None),  # replaced below: JSON text with NaN
    "a missing side file": (lambda d, f: (f / "t.slice0.nrrd").unlink(), "side file"),
    "a damaged side file": (lambda d, f: (f / "t.slice0.nrrd").write_bytes(b"junk") and None, "is damaged"),
    "not JSON": (lambda d, f: "{not json", "not a valid template file"),
    "a JSON list": (lambda d, f: [1, 2], "not an FMOneShot template"),
    "an unknown orientation": (lambda d, f: d.update(orientation="oblique"), "orientation"),
    "an unknown mask label": (first_slice("painted", ["spleen"]), None),
}


def nan_point(doc, folder):
    doc["slices"][0]["positive"]["liver"][0] = [float("nan"), 3.0]
    return json.dumps(doc)  # Python writes NaN, as a hand edit might


TEMPLATES["a NaN point"] = (nan_point, "lies outside")
# a saved template does not know its volume's slice count, but knows the slice it is marked on
TEMPLATES["an extent without the marked slice"] = (
    lambda d, f: d.update(extent={"liver": [0, 10]}),
    "The extent of label 'liver' is slices 0 to 10, and the label is marked on template slice 24, outside it.")
del TEMPLATES["an unknown mask label"]  # painted names that are not mask layers are ignored by design


def one_line_error(code, err, message):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fmoneshot: error:") and "Fix:" in lines[0], err
    assert "Traceback" not in err
    if message:
        assert message in lines[0], err


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_malformed_templates(tmp_path, capsys, good, case):
    change, message = TEMPLATES[case]
    path = edited(tmp_path, good, change)
    out = tmp_path / "out.nrrd"
    code = main(["segment", str(CT), "--template", str(path), "--output", str(out)])
    one_line_error(code, capsys.readouterr().err, message)
    assert not out.exists()


def grey_alpha(tmp_path):
    """A grey + alpha PNG (colour type 4), written by SimpleITK from a 2-component image."""
    path = tmp_path / "ga.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 2), np.uint8), isVector=True), str(path))
    assert path.read_bytes()[25] == 4
    return path


def empty_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    return tmp_path / "empty.nii.gz"


def text_as_png(tmp_path):
    (tmp_path / "notes.png").write_text("not an image", encoding="utf-8")
    return tmp_path / "notes.png"


def folder_without_dicom(tmp_path):
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "readme.txt").write_text("x", encoding="utf-8")
    return tmp_path / "series"


@pytest.mark.parametrize("make, message", [
    (grey_alpha, "grey and alpha"),
    (empty_file, "Cannot read"),
    (text_as_png, "Cannot read"),
    (folder_without_dicom, "holds no DICOM series"),
])
@pytest.mark.parametrize("role", ["template", "target"])
def test_malformed_images(tmp_path, capsys, make, message, role):
    bad = make(tmp_path)
    out = tmp_path / "out.nrrd"
    image, target = (bad, CT) if role == "template" else (CT, bad)
    code = main(["segment", str(target), "--template-image", str(image), "--positive", "liver:3,3",
                 "--output", str(out)])
    one_line_error(code, capsys.readouterr().err, message)
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["segment", CT, "--template-image", CT, "--slice", 99, "--positive", "liver:86,49"], "outside the volume"),
    (["segment", CT, "--template-image", CT, "--positive", "liver:86,49,3"], "Cannot read the positive point"),
    (["segment", CT, "--template-image", CT, "--positive", ":86,49"], "has no name"),
    (["segment", CT, "--template-image", CT, "--positive", "liver:86,49", "--mask", "liver"], "Cannot read --mask"),
    (["segment", CT, "--template-image", CT, "--positive", "liver:86,49", "--mask", "liver:nofile.nrrd"],
     "No such file"),
    (["segment", CT, "--template-image", CT, "--positive", "liver:86,49", "--threshold", "0.4"], "basic adapter"),
    (["segment", CT, "--template-image", CT, "--positive", "liver:86,49", "--backend", "offline", "--stride", 4],
     "offline backend"),
    (["segment", CT, "--template", "t.json", "--mask", "liver:m.nrrd"], "Both --template and inline points or masks"),
    (["segment", "missing.nii.gz", "--template-image", CT, "--positive", "liver:86,49"], "Target not found"),
    (["segment", CT, "--template-image", CT, "--positive", "liver:86,49", "--save-template", "t.txt"], ".json"),
    (["localize", CT, "--template-image", CT, "--landmark", "a:1,1", "--output", "lm.txt"], ".json or .csv"),
    (["eval", DATA, "--points", 0], "--points must be at least 1"),
    (["eval", DATA, "--labels", "livr"], "Unknown label 'livr'"),
    (["eval", "no-such-dataset"], "No dataset.json"),
    (["weights", "import", "nofile.pth", "--name", "sam_vit_b"], "is not a file"),
    (["weights", "verify", "d9z99"], "No checkpoint is called"),
])
def test_malformed_arguments(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "segment":
        argv = [*argv, "--output", "out.nrrd"]
    code = main([str(a) for a in argv])
    one_line_error(code, capsys.readouterr().err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("extent, message", [
    ("liver:40:75", "The extent of label 'liver' is slices 40 to 75, beyond the template volume 'ct-small', which "
                    "has axial slices 0 to 29 (the label is marked on slice 24)."),
    ("liver:0:10", "The extent of label 'liver' is slices 0 to 10, and the label is marked on template slice 24, "
                   "outside it; the template volume 'ct-small' has axial slices 0 to 29."),
])
def test_an_extent_beyond_the_volume_or_without_the_marked_slice_is_refused_before_any_work(
        tmp_path, capsys, monkeypatch, extent, message):
    """Such an extent bounded every target to slices without the structure: exit 0 and an empty label file.
    Now refused before any model is built, naming the volume's slices, the marked slice and the fix."""
    import FMOneShotLib.pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(FMOneShotLib.pipeline, "OneShot", lambda *a, **k: pytest.fail("the work started"))
    code = main(["segment", str(CT), "--template-image", str(CT), "--slice", "24", "--positive", "liver:86,49",
                 "--extent", extent, "--output", "out.nrrd", "--save-template", "t.json"])
    err = capsys.readouterr().err
    one_line_error(code, err, message)
    assert "Fix: give the first and last slice where the structure lies, between 0 and 29, first <= last, " \
           "including slice 24 where it is marked; or leave its extent out." in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
