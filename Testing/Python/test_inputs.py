"""No input is silently misread and nothing a user has is lost (issue 16; issue 20 items 3 and 4).

Every input here is built by the test: masks with other geometries than their image, multi-label masks,
output names that collide with inputs or with each other, reports that exist already.
"""

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FMOneShotLib.cli import _output_paths, _template_from_args, build_parser, main
from FMOneShotLib.datasets import load_dataset
from FMOneShotLib.errors import FMOneShotError, FMOneShotWarning
from FMOneShotLib.image import Volume, image_stem, labels_on_grid, read_volume
from FMOneShotLib.metrics import dice

from conftest import REPO

CT = REPO / "Testing/Data/totalseg-ct-small/images/ct-small.nii.gz"
MASK = REPO / "Testing/Data/totalseg-ct-small/masks/ct-small.nii.gz"
LIVER = 5


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def template_of(*argv):
    """The template the CLI builds from these arguments (nothing is fitted)."""
    args = build_parser().parse_args(["segment", str(CT), "--template-image", str(CT), "--output", "unused",
                                      *map(str, argv)])
    return _template_from_args(args)


@pytest.fixture(scope="module")
def ct():
    return read_volume(CT)


@pytest.fixture(scope="module")
def liver(ct):
    return read_volume(MASK).array == LIVER


# ------------------------------------------------------------------------------------------ mask geometry
def test_a_mask_in_reversed_slice_order_is_matched_by_position(tmp_path, ct, liver):
    """The same mask stored with its slices reversed (last slice first, z direction flipped, origin at the
    other end): the template gets the liver of its own slice, not of the mirrored one (issue 16.1)."""
    z = 24
    flipped = Volume(liver[::-1].astype(np.uint8), ct.spacing,
                     ct.index_to_physical([0, 0, ct.n_slices - 1]), ct.direction @ np.diag([1, 1, -1]))
    path = tmp_path / "reversed.nrrd"
    sitk.WriteImage(flipped.to_sitk(), str(path))
    assert not np.array_equal(liver[z], liver[::-1][z])  # read by array position, it would be another slice
    with pytest.warns(FMOneShotWarning, match="resampled onto the image's grid"):
        template = template_of("--slice", z, "--positive", "liver:86,49", "--mask", f"liver:{path}")
    assert dice(template.slices[0].masks["liver"], liver[z]) == 1.0


def test_a_partial_mask_supplies_its_own_slices_only(tmp_path, ct, liver):
    """A 10-slice mask (slices 15..24 of the volume, placed there by its origin) gives slice 24 its own
    mask, and for slice 5, which it does not cover, the run is refused instead of taking its first slice."""
    part = Volume(liver[15:25].astype(np.uint8), ct.spacing, ct.index_to_physical([0, 0, 15]), ct.direction)
    path = tmp_path / "part.nii.gz"
    sitk.WriteImage(part.to_sitk(), str(path))
    with pytest.warns(FMOneShotWarning, match="covers 33% of the image"):
        template = template_of("--slice", 24, "--positive", "liver:86,49", "--mask", f"liver:{path}")
    assert dice(template.slices[0].masks["liver"], liver[24]) == 1.0
    with pytest.raises(FMOneShotError, match="empty on the template slice 5"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FMOneShotWarning)
        template_of("--slice", 5, "--positive", "liver:86,49", "--mask", f"liver:{path}")


def test_masks_off_their_image_are_resampled_or_refused():
    """An eval-style mask 30 mm off its image (10 voxels of 3 mm) is shifted back by 10 voxels with a
    warning; one that does not overlap is refused; labels that are not whole numbers are refused."""
    image = Volume(np.zeros((4, 20, 40), np.int16), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0))
    labels = np.zeros((4, 20, 40), np.uint8)
    labels[:, 5:10, 20:30] = 2
    shifted = Volume(labels, (3.0, 3.0, 3.0), (30.0, 0.0, 0.0))
    with pytest.warns(FMOneShotWarning, match="10.0 voxels off"):
        on_grid = labels_on_grid(shifted, image)
    assert np.array_equal(on_grid[:, :, 30:40], labels[:, :, 20:30]) and on_grid[:, :, :30].sum() == 0
    assert on_grid.dtype == labels.dtype
    # within half a voxel: taken as it is, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert labels_on_grid(Volume(labels, (3.0, 3.0, 3.0), (1.4, 0.0, 0.0)), image) is not None
    with pytest.raises(FMOneShotError, match="does not overlap"):
        labels_on_grid(Volume(labels, (3.0, 3.0, 3.0), (500.0, 0.0, 0.0)), image)
    with pytest.raises(FMOneShotError, match="not whole numbers"):
        labels_on_grid(Volume(labels * 0.4, (3.0, 3.0, 3.0)), image)


def test_eval_reads_a_case_mask_by_position(tmp_path, ct, liver):
    """A dataset whose mask is stored 30 mm off (origin moved, array moved with it) scores the same slices
    as the right one: the case's reference comes back on the image grid, equal to the true mask."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    sitk.WriteImage(ct.to_sitk(), str(root / "images" / "a.nii.gz"))
    pad = np.zeros((ct.n_slices, ct.slice_shape[0], ct.slice_shape[1] + 10), np.uint8)
    pad[:, :, :-10] = liver
    # 10 more columns, origin 30 mm further along -x index direction: the same anatomy, another grid
    moved = Volume(pad, ct.spacing, ct.index_to_physical([0, 0, 0]), ct.direction)
    sitk.WriteImage(moved.to_sitk(), str(root / "masks" / "a.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "name": "moved", "modality": "CT", "task": "segmentation", "labels": {"1": "liver"},
        "cases": [{"id": "a", "image": "images/a.nii.gz", "mask": "masks/a.nii.gz"}]}), encoding="utf-8")
    case = load_dataset(root).cases[0]
    with pytest.warns(FMOneShotWarning, match="differs from the image's"):
        reference = case.read_mask()
    assert np.array_equal(reference == 1, liver)


# ------------------------------------------------------------------------------------------ --mask values
def test_a_multi_label_mask_needs_the_value_of_its_label(ct):
    """The dataset's 117-label mask as --mask liver:FILE is refused with the fix; FILE:5 takes the liver;
    a value the file does not hold is refused (issue 20.4)."""
    with pytest.raises(FMOneShotError, match=r"holds \d+ label values.*liver:.*:VALUE"):
        template_of("--slice", 24, "--positive", "liver:86,49", "--mask", f"liver:{MASK}")
    template = template_of("--slice", 24, "--positive", "liver:86,49", "--mask", f"liver:{MASK}:5")
    assert np.array_equal(template.slices[0].masks["liver"], read_volume(MASK).array[24] == LIVER)
    with pytest.raises(FMOneShotError, match="holds no value 200"):
        template_of("--slice", 24, "--positive", "liver:86,49", "--mask", f"liver:{MASK}:200")


def test_a_misspelt_mask_label_is_the_unknown_label_error(tmp_path, capsys, liver, ct):
    path = tmp_path / "liver.nrrd"
    sitk.WriteImage(ct.to_sitk(liver.astype(np.uint8)), str(path))
    out = tmp_path / "out.nrrd"
    code, _, err = run(capsys, "segment", CT, "--template-image", CT, "--slice", 24, "--positive", "liver:86,49",
                       "--mask", f"livr:{path}", "--output", out)
    assert code == 2 and "Unknown label 'livr'" in err and "Fix:" in err and not out.exists()


# ------------------------------------------------------------------------------------------ outputs
def test_output_names_keep_everything_but_the_image_extension(tmp_path):
    targets = [tmp_path / "p.001.nii.gz", tmp_path / "p.002.nii.gz", tmp_path / "series.v2"]
    paths = _output_paths(targets, tmp_path / "out", "-labels", ".nrrd", force=False)
    assert [p.name for p in paths] == ["p.001-labels.nrrd", "p.002-labels.nrrd", "series.v2-labels.nrrd"]
    assert _output_paths(targets[:1], f"{tmp_path}/results.v2/", "-labels", ".nrrd", False)[0] == \
        tmp_path / "results.v2" / "p.001-labels.nrrd"  # a trailing / says: a folder
    assert image_stem("A.NII.GZ") == "A" and image_stem("ct.mhd") == "ct" and image_stem("dicom") == "dicom"
    with pytest.raises(FMOneShotError, match="Several targets are called p"):
        _output_paths([tmp_path / "a" / "p.nii.gz", tmp_path / "b" / "p.nrrd"], tmp_path / "out", "-labels",
                      ".nrrd", force=True)


@pytest.mark.parametrize("name, message", [
    ("result.txt", "is not one FMOneShot writes"),
    ("X.NII.GZ", "is not one FMOneShot writes"),
    ("result.png", "PNG holds one 2D image"),
])
def test_a_file_name_output_is_honoured_or_refused(tmp_path, capsys, name, message):
    out = tmp_path / name
    code, _, err = run(capsys, "segment", CT, "--template-image", CT, "--positive", "liver:86,49", "--output", out)
    assert code == 2 and message in err and "Fix:" in err
    assert list(tmp_path.iterdir()) == []  # no folder made of a file name, nothing written


def test_outputs_never_replace_inputs_even_with_force(tmp_path, capsys, ct):
    """-o the input --force, a --save-template whose side file is the input, a landmarks file over its
    target: each refused, and the input's bytes unchanged (issue 16.4)."""
    target = tmp_path / "t.slice0.nrrd"
    sitk.WriteImage(ct.to_sitk(), str(target))
    before = sha(target)
    for extra in (["--output", target], ["--output", tmp_path / "l.nrrd", "--save-template", tmp_path / "t.json"]):
        code, _, err = run(capsys, "segment", target, "--template-image", target, "--positive", "liver:86,49",
                           *extra, "--force")
        assert code == 2 and "never writes over its inputs" in err, err
    lm = tmp_path / "lm.json"
    lm.write_text("{}", encoding="utf-8")
    code, _, err = run(capsys, "localize", target, "--template", lm, "--output", lm, "--force")
    assert code == 2 and "never writes over its inputs" in err
    assert sha(target) == before and lm.read_text(encoding="utf-8") == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.json", "t.slice0.nrrd"]


def test_save_template_is_checked_before_the_work_and_makes_its_folder(tmp_path, capsys):
    """An existing side file of --save-template refuses the run before anything is computed or written;
    a missing folder is made, as the labels' folder is (issue 20.3)."""
    (tmp_path / "t.slice0.nrrd").write_bytes(b"mine")
    out = tmp_path / "l.nrrd"
    code, _, err = run(capsys, "segment", CT, "--template-image", CT, "--positive", "liver:86,49",
                       "--output", out, "--save-template", tmp_path / "t.json")
    assert code == 2 and "t.slice0.nrrd already exists" in err
    assert not out.exists() and (tmp_path / "t.slice0.nrrd").read_bytes() == b"mine"
    code, _, err = run(capsys, "segment", CT, "--template-image", CT, "--positive", "liver:86,49", "--slice", 24,
                       "--output", out, "--save-template", tmp_path / "new" / "deeper" / "t.json")
    assert code == 0, err
    assert read_volume(out).array.shape == (30, 101, 122)
    saved = json.loads((tmp_path / "new" / "deeper" / "t.json").read_text(encoding="utf-8"))
    assert saved["labels"][0]["name"] == "liver"


def test_eval_refuses_an_existing_report_before_evaluating(tmp_path, capsys):
    """--report onto an existing report.md: refused at once, so the --json written after the evaluation is
    not there (issue 20.3); a --json that is the dataset's own file is refused even with --force."""
    report = tmp_path / "rep"
    report.mkdir()
    (report / "report.md").write_text("mine", encoding="utf-8")
    data = REPO / "Testing/Data/totalseg-ct-small"
    code, _, err = run(capsys, "eval", data, "--labels", "liver", "--report", report, "--json", tmp_path / "r.json")
    assert code == 2 and "report.md already exists" in err
    assert not (tmp_path / "r.json").exists() and (report / "report.md").read_text(encoding="utf-8") == "mine"
    code, _, err = run(capsys, "eval", data, "--labels", "liver", "--json", data / "dataset.json", "--force")
    assert code == 2 and "never writes over its inputs" in err


# ------------------------------------------------------------------------------------------ non-finite values
def test_nan_and_inf_are_missing_values(tmp_path, capsys, ct, liver):
    """A NaN slice, a 20x20 NaN patch and an inf voxel in an NRRD CT: a warning with their number, CT still
    recognised, the window and the segmentation of the other slices as without them (issue 16.2)."""
    from FMOneShotLib.image import intensity_window, normalize

    clean = ct.array.astype(np.float32)
    broken = clean.copy()
    broken[5] = np.nan
    broken[20, 10:30, 10:30] = np.nan
    broken[12, 0, 0] = np.inf
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(ct.to_sitk(broken), str(path))
    clean_path = tmp_path / "clean.nrrd"
    sitk.WriteImage(ct.to_sitk(clean), str(clean_path))
    n = 101 * 122 + 400 + 1
    with pytest.warns(FMOneShotWarning, match=f"{n} of {broken.size} voxels are NaN or infinite"):
        vol = read_volume(path)
    assert vol.modality == "CT"
    mr = Volume(broken, modality="MR")
    assert intensity_window(mr) == pytest.approx(intensity_window(clean[np.isfinite(broken)], "MR"))
    assert np.all(np.isfinite(normalize(broken, intensity_window(mr))))
    assert normalize(broken, (0, 1))[5].max() == 0.0  # missing -> background
    runs = {}
    for name, src in (("clean", clean_path), ("nan", path)):
        out = tmp_path / f"{name}-labels.nrrd"
        code, stdout, err = run(capsys, "segment", src, "--template-image", clean_path, "--slice", 24,
                                "--positive", "liver:86,49", "--positive", "liver:88,37", "--output", out)
        assert code == 0, err
        runs[name] = read_volume(out).array == 1
    assert "voxels are NaN or infinite" in err  # the CLI's one-line warning
    found = [z for z in range(30) if z not in (5, 20) and runs["clean"][z].any()]
    assert len(found) >= 10
    assert np.mean([dice(runs["nan"][z], runs["clean"][z]) for z in found]) >= 0.9
    assert not runs["nan"][5].any()  # a slice with no value has nothing on it
    # a template slice with the NaN patch: its window is finite, and the liver is found as from a clean one
    out = tmp_path / "from-nan-template.nrrd"
    code, stdout, err = run(capsys, "segment", clean_path, "--template-image", path, "--slice", 20,
                            "--positive", "liver:86,49", "--positive", "liver:88,37", "--output", out)
    assert code == 0, err
    assert (read_volume(out).array == 1).any(axis=(1, 2)).sum() >= 10


# ------------------------------------------------------------------------------------------ content-free input
def test_content_free_input_gets_no_answer(tmp_path, capsys, ct):
    """A constant target volume: no label on any slice and landmarks with confidence 0; a blank template
    slice, and a point in a blank region of a template, are refused (issue 16.7)."""
    from FMOneShotLib.pipeline import OneShot
    from FMOneShotLib.template import Template

    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(ct.to_sitk(np.full(ct.array.shape, 40, np.int16)), str(flat))
    out = tmp_path / "l.nrrd"
    code, stdout, err = run(capsys, "segment", flat, "--template-image", CT, "--slice", 24,
                            "--positive", "liver:86,49", "--output", out)
    assert code == 0, err
    assert "liver on 0 of 30 axial slices" in stdout and not read_volume(out).array.any()
    template = Template.from_volume(ct, 12, landmarks={"vertebra": [61, 75]})
    result = OneShot(template).apply(Volume(np.full(ct.array.shape, 40, np.int16), modality="CT"))
    assert max(lm.confidence for lm in result.landmarks["vertebra"]) == 0.0
    code, _, err = run(capsys, "segment", CT, "--template-image", flat, "--positive", "liver:86,49", "--output", out,
                       "--force")
    assert code == 2 and "one grey value" in err and "Fix:" in err
    padded = ct.array.copy()
    padded[:, :, :61] = -1024  # the left half is air only
    with pytest.raises(FMOneShotError, match=r"positive point of 'liver' at \(5, 50\).*one grey value"):
        Template.from_volume(ct.like(padded), 24, positive={"liver": [[5, 50]]})


# ------------------------------------------------------------------------------------------ DICOM geometry
def write_series(folder, array, positions, spacing=(0.8, 0.9), cosines=(1, 0, 0, 0, 1, 0)):
    """One DICOM file per slice of ``array`` at the given ImagePositionPatient (mm), with SimpleITK."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.77"
    for k, (sl, pos) in enumerate(zip(array, positions)):
        img = sitk.GetImageFromArray(sl[None])
        img.SetSpacing((*spacing, 1.0))
        tags = {"0008|0060": "CT", "0020|000e": series, "0020|000d": series + ".0", "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{p:.6f}" for p in pos), "0020|0037": "\\".join(f"{c:.6f}" for c in cosines),
                "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}", "0008|0018": f"{series}.{k + 1}"}
        for key, value in tags.items():
            img.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(img)


def test_a_dicom_series_with_missing_slices_keeps_every_slice_at_its_position(tmp_path):
    """30 slices 2 mm apart with 3 missing: the volume is on a 2 mm grid of 30 slices (not 27 at an
    averaged 2.23 mm), each acquired slice at its own position with its own pixels (issue 16.3)."""
    rng = np.random.default_rng(4)
    full = rng.integers(-1000, 1000, (30, 6, 8)).astype(np.int16)
    kept = [z for z in range(30) if z not in (10, 11, 20)]
    z0 = 40.0
    write_series(tmp_path / "gaps", full[kept], [(5.0, 6.0, z0 + 2.0 * z) for z in kept])
    with pytest.warns(FMOneShotWarning, match="2 gaps"):
        vol = read_volume(tmp_path / "gaps")
    assert vol.n_slices == 30 and vol.spacing[2] == pytest.approx(2.0)
    for z in kept:
        assert np.array_equal(vol.array[z], full[z])
        assert vol.index_to_physical([0, 0, z]) == pytest.approx([5.0, 6.0, z0 + 2.0 * z], abs=1e-3)
    assert np.allclose(vol.array[20], (full[19].astype(float) + full[21]) / 2, atol=0.51)  # filled between
    write_series(tmp_path / "even", full, [(5.0, 6.0, z0 + 2.0 * z) for z in range(30)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FMOneShotWarning)
        assert np.array_equal(read_volume(tmp_path / "even").array, full)  # a regular series is as it was


def test_a_gantry_tilted_series_is_refused(tmp_path):
    rng = np.random.default_rng(5)
    arr = rng.integers(-1000, 1000, (6, 6, 8)).astype(np.int16)
    shift = np.tan(np.radians(15)) * 2.0  # 15 degrees: each slice 0.54 mm further along y
    write_series(tmp_path / "tilt", arr, [(5.0, 6.0 + shift * z, 40.0 + 2.0 * z) for z in range(6)])
    with pytest.raises(FMOneShotError, match="gantry tilt of about 15.0 degrees"):
        read_volume(tmp_path / "tilt")


def test_the_library_never_writes_labels_over_the_image_they_came_from(tmp_path):
    """write_volume(..., force=True) onto the file the image was read from is refused: the label volume keeps
    its image's source (issue 16.4, in the library as well as the CLI)."""
    from FMOneShotLib.image import label_volume, write_volume

    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)), str(path))
    before = sha(path)
    image = read_volume(path)
    labels = label_volume(image, image.array > 10)
    with pytest.raises(FMOneShotError, match="is the input"):
        write_volume(labels, path, force=True)
    assert sha(path) == before
    assert read_volume(write_volume(labels, tmp_path / "ct-labels.nrrd")).array.sum() == 13


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_a_cut_short_nifti_is_refused_not_filled_in(tmp_path, capsys, ext):
    """SimpleITK reads half a NIfTI file without complaint and invents the other half; FMOneShot refuses it
    (CLI: exit 2, one line, nothing written), and reads the whole file as before."""
    array = np.random.default_rng(0).integers(-500, 500, (12, 32, 32)).astype(np.int16)
    whole, cut = tmp_path / f"whole{ext}", tmp_path / f"cut{ext}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(whole))
    data = whole.read_bytes()
    cut.write_bytes(data[:len(data) * 2 // 3])
    assert np.array_equal(read_volume(whole).array, array)
    with pytest.raises(FMOneShotError, match="cut short"):
        read_volume(cut)
    code, out, err = run(capsys, "segment", cut, "--template-image", whole, "--slice", 6,
                         "--positive", "a:16,16", "--output", tmp_path / "out/")
    assert code == 2 and "cut short" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
