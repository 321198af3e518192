"""The evaluation harness: protocol and figures on tiny synthetic datasets in the case format, where every number
is known, then `fmoneshot eval` on each real dataset of ../shared/data."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FMOneShotLib.cli import main
from FMOneShotLib.evaluate import LANDMARK_KEYS, SEGMENTATION_KEYS, evaluate, write_report
from FMOneShotLib.errors import FMOneShotError
from FMOneShotLib.metrics import dice

from conftest import require_shared

SEG_LABEL_KEYS = {"dice", "dice_median", "iou", "acc_pos", "acc_neg", "targets", "empty_slice_accuracy"}
LANDMARK_ENTRY_KEYS = {"ned", "px", "mm", "within_10px"}


def _disc(cy, cx, r, shape=(64, 64)):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def make_segmentation_dataset(root: Path, n_cases: int = 2, n_slices: int = 6) -> Path:
    """A bright disc inside a grey body on slices 1..n-2 (radius 6 + z % 3: largest on slice 2), blank body on
    the first and last slice. A disc this distinct is segmented exactly, so the Dice is known."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    cases = []
    for c in range(n_cases):
        img = np.full((n_slices, 64, 64), 20, np.float32)
        lab = np.zeros((n_slices, 64, 64), np.uint8)
        for z in range(n_slices):
            img[z][_disc(32, 32, 28)] = 100
            if 1 <= z <= n_slices - 2:
                m = _disc(30 + c, 24 + 2 * c, 6 + z % 3)
                lab[z][m] = 1
                img[z][m] = 200
        im = sitk.GetImageFromArray(img)
        im.SetSpacing((1.5, 1.5, 3.0))
        sitk.WriteImage(im, str(root / f"images/c{c}.nrrd"))
        lm = sitk.GetImageFromArray(lab)
        lm.CopyInformation(im)
        sitk.WriteImage(lm, str(root / f"masks/c{c}.nrrd"))
        cases.append({"id": f"c{c}", "image": f"images/c{c}.nrrd", "mask": f"masks/c{c}.nrrd"})
    (root / "dataset.json").write_text(json.dumps({"name": "synthetic", "modality": "MR", "task": "segmentation",
                                                   "labels": {"1": "blob", "2": "absent"}, "cases": cases}),
                                       encoding="utf-8")
    return root


def make_landmark_dataset(root: Path) -> Path:
    """Three 2D images of a bar and a plate, translated; the last one is a PNG (no pixel size)."""
    (root / "images").mkdir(parents=True)
    (root / "points").mkdir()
    cases = []
    for c in range(3):
        img = np.full((80, 100), 30, np.uint8)
        dy, dx = 3 * c, 5 * c
        img[20 + dy:30 + dy, 20 + dx:26 + dx] = 220
        img[50 + dy:54 + dy, 60 + dx:70 + dx] = 140
        points = {"bar": [22 + dx, 21 + dy], "plate": [69 + dx, 53 + dy]}
        ext = "png" if c == 2 else "nrrd"
        im = sitk.GetImageFromArray(img)
        if ext == "nrrd":
            im.SetSpacing((0.5, 0.5))
        sitk.WriteImage(im, str(root / f"images/l{c}.{ext}"))
        (root / f"points/l{c}.json").write_text(json.dumps(points), encoding="utf-8")
        cases.append({"id": f"l{c}", "image": f"images/l{c}.{ext}", "points": f"points/l{c}.json"})
    (root / "dataset.json").write_text(json.dumps({"name": "synthetic-landmarks", "modality": "XR",
                                                   "task": "landmarks", "landmarks": ["bar", "plate"],
                                                   "cases": cases}), encoding="utf-8")
    return root


def test_segmentation_protocol_with_known_figures(tmp_path):
    root = make_segmentation_dataset(tmp_path / "seg")
    # In case c1, the reference of slice 3 covers only the left half of the disc: the chain still (rightly)
    # finds the whole disc, so that slice's Dice is known from the arrays.
    mask_file = root / "masks/c1.nrrd"
    img = sitk.ReadImage(str(mask_file))
    lab = sitk.GetArrayFromImage(img)
    whole = lab[3] == 1
    half = whole.copy()
    half[:, 24 + 2:] = False
    lab[3] = half
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(mask_file))
    summary, targets = evaluate(root, keep_pictures=True)
    assert tuple(summary) == SEGMENTATION_KEYS
    assert list(summary["labels"]) == ["blob"]  # "absent" is in no mask, so it is not evaluated
    assert summary["template"]["labels"]["blob"] == {"case": "c0", "slice": 2}  # largest disc
    r = summary["labels"]["blob"]
    assert set(r) == SEG_LABEL_KEYS
    assert r["targets"] == 4  # slices 1-4 of c1
    expected = (3 * 1.0 + dice(whole, half)) / 4
    assert r["dice"] == pytest.approx(expected, abs=1e-4)
    assert r["dice_median"] == pytest.approx(1.0)
    assert r["acc_pos"] == pytest.approx(1.0, abs=0.1) and r["acc_neg"] == pytest.approx(1.0)
    assert r["empty_slice_accuracy"] == 1.0  # slices 0 and 5 of c1 are left empty
    assert summary["mean_dice"] == r["dice"]
    assert sorted((t.case, t.slice) for t in targets) == [("c1", k) for k in (1, 2, 3, 4)]


def test_one_case_volume_targets_its_other_slices(tmp_path):
    root = make_segmentation_dataset(tmp_path / "one", n_cases=1)
    summary, _ = evaluate(root)
    r = summary["labels"]["blob"]
    assert summary["template"]["labels"]["blob"] == {"case": "c0", "slice": 2}
    assert r["targets"] == 3 and r["dice"] == pytest.approx(1.0)  # slices 1, 3, 4
    assert r["empty_slice_accuracy"] == 1.0
    limited, _ = evaluate(root, max_targets=2)
    assert limited["labels"]["blob"]["targets"] == 2 and limited["template"]["max_targets"] == 2


def test_landmark_protocol_with_known_figures(tmp_path):
    root = make_landmark_dataset(tmp_path / "lm")
    # Move the reference of the plate in case l1 by (9, 12) pixels: a known error of 15 px = 7.5 mm.
    pts = json.loads((root / "points/l1.json").read_text(encoding="utf-8"))
    pts["plate"] = [pts["plate"][0] + 9, pts["plate"][1] + 12]
    (root / "points/l1.json").write_text(json.dumps(pts), encoding="utf-8")
    # The protocol's arithmetic, on paper A's whole-slice search (exact here); the aligned chain within 1 px
    aligned, _ = evaluate(root)
    assert aligned["landmarks"]["bar"]["px"] <= 1.0 and aligned["align"]["registrations"] == 2
    summary, targets = evaluate(root, keep_pictures=True, chain_options={"align": "none"})
    assert summary["align"] == {"kind": "none", "seconds": 0.0, "registrations": 0, "nmi_before": None,
                                "nmi_after": None}
    assert tuple(summary) == LANDMARK_KEYS
    assert summary["template"]["case"] == "l0" and summary["template"]["targets"] == 2
    bar, plate = summary["landmarks"]["bar"], summary["landmarks"]["plate"]
    assert set(bar) == LANDMARK_ENTRY_KEYS
    assert bar == {"ned": 0.0, "px": 0.0, "mm": 0.0, "within_10px": 1.0}
    assert plate["px"] == pytest.approx(7.5)  # (15 + 0) / 2
    assert plate["ned"] == pytest.approx(7.5 / 100)
    assert plate["mm"] == pytest.approx(7.5)  # 15 px * 0.5 mm in l1; l2 is a PNG without a pixel size
    assert plate["within_10px"] == 0.5
    assert summary["mean_ned"] == pytest.approx(15 / 100 / 4)
    assert summary["within_10px"] == 0.75
    assert sorted(t.case for t in targets) == ["l1", "l2"]


def test_cli_eval_writes_json_and_report(tmp_path, capsys):
    root = make_segmentation_dataset(tmp_path / "seg")
    out, report = tmp_path / "r.json", tmp_path / "report"
    assert main(["eval", str(root), "--json", str(out), "--report", str(report), "--points", "3"]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert tuple(doc) == SEGMENTATION_KEYS and doc["template"]["points"] == 3
    assert doc["labels"]["blob"]["dice"] == pytest.approx(1.0)
    page = (report / "report.md").read_text(encoding="utf-8")
    assert "| blob | c0 slice 2 | 1.000 |" in page
    for kind in ("best", "median", "worst"):
        png = sitk.ReadImage(str(report / f"blob-{kind}.png"))
        assert png.GetNumberOfComponentsPerPixel() == 3 and png.GetSize() == (64, 64)
        assert f"blob-{kind}.png" in page
    # nothing is overwritten without --force
    before = out.read_text(encoding="utf-8")
    assert main(["eval", str(root), "--json", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text(encoding="utf-8") == before
    with pytest.raises(FMOneShotError, match="already exist"):
        write_report(doc, [], report)


@pytest.mark.parametrize("args, message", [
    (["--template", "nope"], "No case 'nope'"),
    (["--labels", "liver"], "Unknown label 'liver'"),
    (["--labels", "absent"], "contains"),
    (["--points", "0"], "at least 1"),
])
def test_cli_eval_bad_input(tmp_path, capsys, args, message):
    root = make_segmentation_dataset(tmp_path / "seg")
    assert main(["eval", str(root), *args]) == 2
    assert message in capsys.readouterr().err


def test_eval_sample_ct_from_the_command_line(tmp_path, sample):
    out = tmp_path / "ct.json"
    assert main(["eval", str(sample), "--labels", "liver", "spleen", "--json", str(out)]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["labels"]["liver"]["targets"] == 29  # one volume: its other slices
    assert doc["labels"]["liver"]["dice"] >= 0.78 and doc["labels"]["spleen"]["dice"] >= 0.70


# (dataset, targets, a floor under the mean Dice): a floor, not a quality claim (docs/results.md has those),
# set well under the figures measured on an AMD EPYC (chaos 0.534, hc18 0.096 with these few targets) since
# CPUs move one organ's Dice by up to 0.13 (test_quality.py): above it, the structure was found at least in part.
@pytest.mark.parametrize("name, max_targets, floor", [("chaos-mr-t2", 6, 0.3), ("hc18-us", 5, 0.02),
                                                      ("ceph-xray", 3, None)])
def test_eval_runs_on_each_shared_dataset(tmp_path, name, max_targets, floor):
    root = require_shared(name)
    out, report = tmp_path / "r.json", tmp_path / "report"
    assert main(["eval", str(root), "--max-targets", str(max_targets), "--json", str(out),
                 "--report", str(report)]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    spec = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    assert doc["dataset"] == spec["name"] and doc["task"] == spec["task"]
    if spec["task"] == "segmentation":
        assert tuple(doc) == SEGMENTATION_KEYS
        assert set(doc["labels"]) == set(spec["labels"].values())
        for r in doc["labels"].values():
            assert set(r) == SEG_LABEL_KEYS and r["targets"] == max_targets and 0 <= r["dice"] <= 1
        assert doc["mean_dice"] > floor
    else:
        assert tuple(doc) == LANDMARK_KEYS and set(doc["landmarks"]) == set(spec["landmarks"])
        assert doc["template"]["targets"] == max_targets and 0 < doc["mean_ned"] < 1
    assert (report / "report.md").is_file() and len(list(report.glob("*.png"))) >= 3
