"""The command line: real runs, and bad input ending with a clear message, exit code 2 and nothing written."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from FMOneShotLib.cli import main
from FMOneShotLib.image import read_volume
from FMOneShotLib.template import sample_prompts

CT = "Testing/Data/totalseg-ct-small/images/ct-small.nii.gz"


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    from conftest import REPO
    monkeypatch.chdir(REPO)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_segment_with_inline_points_and_reuse_of_the_saved_template(tmp_path, capsys):
    out = tmp_path / "ct-labels.nrrd"
    code, stdout, err = run(capsys, "segment", CT, "--template-image", CT, "--slice", 24,
                            "--positive", "liver:86,49", "--positive", "liver:88,37", "--negative", "liver:30,60",
                            "--output", out, "--save-template", tmp_path / "t.json")
    assert code == 0, err
    labels = read_volume(out)
    ref = sitk.GetArrayFromImage(sitk.ReadImage("Testing/Data/totalseg-ct-small/masks/ct-small.nii.gz"))
    overlap = (labels.array[24] == 1) & (ref[24] == 5)
    assert overlap.sum() > 0.3 * (ref[24] == 5).sum()  # clicks alone find a good part of the liver
    code, _, err = run(capsys, "segment", CT, "--template", tmp_path / "t.json", "--output", tmp_path / "again.nrrd")
    assert code == 0, err
    assert np.array_equal(read_volume(tmp_path / "again.nrrd").array, labels.array)


def test_localize_writes_pixels_and_mm(tmp_path, capsys):
    out = tmp_path / "lm.json"
    code, _, err = run(capsys, "localize", CT, "--template-image", CT, "--slice", 12,
                       "--landmark", "vertebra:61,75", "--output", out)
    assert code == 0, err
    rows = json.loads(out.read_text(encoding="utf-8"))["landmarks"]
    assert rows[0]["landmark"] == "vertebra"
    # the template volume itself: the best slice is the template slice and the point is where it was put
    assert rows[0]["slice"] == 12 and abs(rows[0]["x"] - 61) <= 1 and abs(rows[0]["y"] - 75) <= 1
    vol = read_volume(CT)
    assert np.allclose([rows[0][k] for k in ("physical_x", "physical_y", "physical_z")],
                       vol.index_to_physical([rows[0]["x"], rows[0]["y"], 12]), atol=1e-2)


def rgb_file(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 3), np.uint8), isVector=True), str(tmp_path / "rgb.png"))
    return tmp_path / "rgb.png"


def four_d_file(tmp_path):
    sitk.WriteImage(sitk.Image([4, 4, 4, 2], sitk.sitkInt16), str(tmp_path / "4d.nrrd"))
    return tmp_path / "4d.nrrd"


@pytest.mark.parametrize("make_args, message", [
    (lambda t: ["--template-image", CT, "--positive", "liver:500,10"], "lies outside"),
    (lambda t: ["--template-image", CT, "--negative", "liver:5,10"], "no positive point"),
    (lambda t: ["--template-image", CT, "--positive", "liver:x,10"], "Cannot read the positive point"),
    (lambda t: ["--template-image", rgb_file(t), "--positive", "a:1,1"], "RGB"),
    (lambda t: ["--template-image", four_d_file(t), "--positive", "a:1,1"], "4D"),
    (lambda t: ["--template-image", CT], "neither labels nor landmarks"),
    (lambda t: ["--template", t / "none.json"], "No template file"),
])
def test_segment_bad_input(tmp_path, capsys, make_args, message):
    out = tmp_path / "out.nii.gz"
    code, _, err = run(capsys, "segment", CT, *make_args(tmp_path), "--output", out)
    assert code == 2
    assert message in err and "Fix:" in err
    assert not out.exists()


def test_unreadable_target_and_existing_output(tmp_path, capsys):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"garbage")
    out = tmp_path / "out.nii.gz"
    code, _, err = run(capsys, "segment", junk, "--template-image", CT, "--positive", "liver:30,60", "--output", out)
    assert code == 2 and "Cannot read" in err and not out.exists()
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "segment", CT, "--template-image", CT, "--positive", "liver:30,60", "--output", out)
    assert code == 2 and "already exists" in err and "--force" in err
    assert out.read_bytes() == b"keep me"


def test_demo_refuses_unknown_label_and_existing_results(tmp_path, capsys):
    code, _, err = run(capsys, "demo", "--labels", "liverr", "--output", tmp_path / "d")
    assert code == 2 and "Unknown label 'liverr'" in err and not (tmp_path / "d").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "montage.png").write_bytes(b"old")
    code, _, err = run(capsys, "demo", "--output", tmp_path / "d")
    assert code == 2 and "already exist" in err
    assert (tmp_path / "d" / "montage.png").read_bytes() == b"old"


def test_demo_names_the_case_and_dataset_it_used(tmp_path, capsys):
    """`demo --data` on another dataset (here the bundled CT and mask under another dataset's name, case id and
    modality) says which case it marked, not "the sample CT"."""
    from conftest import SAMPLE

    data = tmp_path / "cohort"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
        (data / folder / "patient-7.nii.gz").write_bytes((SAMPLE / folder / "ct-small.nii.gz").read_bytes())
    (data / "dataset.json").write_text(json.dumps({
        "name": "my-cohort", "modality": "MR", "task": "segmentation", "labels": {"5": "liver", "1": "spleen"},
        "cases": [{"id": "patient-7", "image": "images/patient-7.nii.gz", "mask": "masks/patient-7.nii.gz"}]}),
        encoding="utf-8")
    code, out, err = run(capsys, "demo", "--data", data, "--labels", "spleen", "--output", tmp_path / "d")
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("FMOneShot demo: spleen marked on slice ") and "sample CT" not in out
    assert " of case patient-7 (MR) of my-cohort (backend offline, " in first
    assert (tmp_path / "d" / "patient-7-labels.nii.gz").is_file()


def test_segment_on_a_sagittal_template_slice(tmp_path, capsys):
    """--plane sagittal: the slice and the points are of the sagittal plane, the labels come back on the
    volume's own grid, and the template's own plane is found again."""
    from FMOneShotLib.metrics import dice

    vol = read_volume(CT)
    ref = sitk.GetArrayFromImage(sitk.ReadImage("Testing/Data/totalseg-ct-small/masks/ct-small.nii.gz")) == 5
    k = 92  # the sagittal plane (x = 92) where the liver is largest
    plane = vol.like(ref).resliced(0).array[k]
    pos, neg = sample_prompts(plane, 5, 5, 0)
    mask = tmp_path / "liver-mask.nrrd"
    sitk.WriteImage(vol.to_sitk(ref.astype(np.uint8)), str(mask))  # with the CT's geometry
    points = [a for x, y in pos for a in ("--positive", f"liver:{x:g},{y:g}")]
    points += [a for x, y in neg for a in ("--negative", f"liver:{x:g},{y:g}")]
    out = tmp_path / "labels.nrrd"
    code, stdout, err = run(capsys, "segment", CT, "--template-image", CT, "--plane", "sagittal", "--slice", k,
                            *points, "--mask", f"liver:{mask}", "--output", out, "--save-template", tmp_path / "t.json")
    assert code == 0, err
    assert " of 122 sagittal slices" in stdout  # counted in the plane processed (122 columns), not 30 axial
    labels = read_volume(out).array
    assert labels.shape == vol.array.shape
    assert dice(labels[:, :, k] == 1, plane) >= 0.8
    assert json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["orientation"] == "sagittal"


def test_cuda_without_a_gpu_and_repeated_landmarks_are_refused(tmp_path, capsys, monkeypatch):
    """--device cuda where PyTorch sees no GPU is an error, not a silent CPU run; a landmark given twice is an
    error, not a silently dropped point; unknown options are named with the command's help. Nothing written."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    code, _, err = run(capsys, "segment", CT, "--template-image", CT, "--slice", 24, "--positive", "liver:86,49",
                       "--device", "cuda", "--output", out / "")
    assert code == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "localize", CT, "--template-image", CT, "--slice", 12, "--landmark", "l1:57,34",
                       "--landmark", "l1:60,40", "--output", out / "lm.json")
    assert code == 2 and "more than once" in err
    code, _, err = run(capsys, "localize", CT, "--template-image", CT, "--positive", "l1:57,34",
                       "--output", out / "lm.json")
    assert code == 2 and "fmoneshot localize --help" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
