"""Volumes keep their geometry through every reader and writer; bad images are refused with a clear error."""

import numpy as np
import pytest
import SimpleITK as sitk

from FMOneShotLib.errors import FMOneShotError
from FMOneShotLib.image import Volume, intensity_window, label_volume, normalize, read_volume, write_volume


def oblique(deg=20.0):
    a, b = np.radians(deg), np.radians(deg / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def make_volume():
    rng = np.random.default_rng(0)
    return Volume(rng.integers(-1000, 1000, (5, 7, 9)).astype(np.int16), spacing=(0.7, 1.3, 2.5),
                  origin=(10.0, -20.0, 30.0), direction=oblique(), name="obl")


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".mha"])
def test_round_trip_anisotropic_oblique(tmp_path, ext):
    vol = make_volume()
    path = write_volume(vol, tmp_path / f"v{ext}")
    back = read_volume(path)
    assert np.array_equal(back.array, vol.array)
    assert np.allclose(back.spacing, vol.spacing, atol=1e-5)
    assert np.allclose(back.origin, vol.origin, atol=1e-4)
    assert np.allclose(back.direction, vol.direction, atol=1e-5)
    assert not back.is_2d


def test_index_to_physical_matches_simpleitk():
    vol = make_volume()
    img = vol.to_sitk()
    for idx in [(0, 0, 0), (1.5, 2.25, 3.0), (8, 6, 4)]:
        assert np.allclose(vol.index_to_physical(idx), img.TransformContinuousIndexToPhysicalPoint(idx))
        assert np.allclose(vol.physical_to_index(vol.index_to_physical(idx)), idx)


def test_label_volume_keeps_geometry(tmp_path):
    vol = make_volume()
    labels = label_volume(vol, (vol.array > 0).astype(np.uint8) * 3)
    back = read_volume(write_volume(labels, tmp_path / "l.nii.gz"))
    assert back.array.dtype == np.uint8 and np.array_equal(back.array, labels.array)
    assert np.allclose(back.direction, vol.direction, atol=1e-5) and np.allclose(back.spacing, vol.spacing)


@pytest.mark.parametrize("ext", [".png", ".nrrd"])
def test_2d_images_are_one_slice_volumes_and_written_back_2d(tmp_path, ext):
    arr = (np.arange(12 * 15).reshape(12, 15) % 251).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.2, 0.3))
    sitk.WriteImage(img, str(tmp_path / f"a{ext}"))
    vol = read_volume(tmp_path / f"a{ext}")
    assert vol.is_2d and vol.array.shape == (1, 12, 15)
    if ext == ".nrrd":
        assert np.allclose(vol.pixel_spacing, (0.2, 0.3))
    out = write_volume(label_volume(vol, vol.array > 100), tmp_path / f"m{ext}")
    back = sitk.ReadImage(str(out))
    assert back.GetDimension() == 2
    assert np.array_equal(sitk.GetArrayFromImage(back), (arr > 100).astype(np.uint8))


def write_dicom_series(folder, array, spacing, origin, direction, modality="CT"):
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.99"
    for z in range(array.shape[0]):
        sl = sitk.GetImageFromArray(array[z][None])
        sl.SetSpacing(spacing)
        pos = np.asarray(origin) + np.asarray(direction) @ np.array([0, 0, z * spacing[2]])
        sl.SetOrigin(tuple(pos))
        sl.SetDirection(tuple(np.asarray(direction).ravel()))
        tags = {"0008|0060": modality, "0020|000e": series, "0020|000d": series + ".0",
                "0020|0013": str(z + 1), "0020|0032": "\\".join(f"{p:.6f}" for p in pos),
                "0020|0037": "\\".join(f"{v:.6f}" for v in np.asarray(direction)[:, :2].T.ravel()),
                "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}", "0018|0050": f"{spacing[2]:.6f}",
                "0008|0018": f"{series}.{z + 1}"}
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_folder(tmp_path):
    arr = np.random.default_rng(1).integers(-1000, 1000, (4, 6, 8)).astype(np.int16)
    direction = oblique(10)
    write_dicom_series(tmp_path / "series", arr, (0.8, 0.9, 2.0), (5.0, 6.0, 7.0), direction)
    vol = read_volume(tmp_path / "series")
    assert vol.modality == "CT"
    assert np.array_equal(vol.array, arr)
    assert np.allclose(vol.spacing, (0.8, 0.9, 2.0), atol=1e-4)
    assert np.allclose(vol.origin, (5, 6, 7), atol=1e-4)
    assert np.allclose(vol.direction, direction, atol=1e-4)


def test_normalisation_by_modality():
    ct = np.array([-1000, -160, 40, 240, 1000], np.int16)
    assert np.allclose(normalize(ct, intensity_window(ct, "CT")), [0, 0, 0.5, 1, 1])
    mr = np.linspace(0, 1000, 1001)
    lo, hi = intensity_window(mr, "MR")
    assert lo == pytest.approx(5.0) and hi == pytest.approx(995.0)


def test_bad_images_are_refused_with_the_fix(tmp_path):
    four = sitk.Image([3, 4, 5, 2], sitk.sitkInt16)
    sitk.WriteImage(four, str(tmp_path / "4d.nrrd"))
    with pytest.raises(FMOneShotError, match="4D.*Fix: extract"):
        read_volume(tmp_path / "4d.nrrd")
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.png"))
    with pytest.raises(FMOneShotError, match="RGB.*greyscale"):
        read_volume(tmp_path / "rgb.png")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(FMOneShotError, match="Cannot read"):
        read_volume(tmp_path / "junk.nii.gz")
    with pytest.raises(FMOneShotError, match="No such file"):
        read_volume(tmp_path / "missing.nrrd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FMOneShotError, match="no DICOM series"):
        read_volume(tmp_path / "empty")


def test_existing_output_is_never_overwritten_without_force(tmp_path):
    vol = make_volume()
    target = tmp_path / "out.nrrd"
    target.write_bytes(b"precious")
    with pytest.raises(FMOneShotError, match="already exists"):
        write_volume(vol, target)
    assert target.read_bytes() == b"precious"
    write_volume(vol, target, force=True)
    assert np.array_equal(read_volume(target).array, vol.array)
    assert not list(tmp_path.glob(".*partial*"))


def test_atomic_paths_write_all_or_nothing(tmp_path):
    from FMOneShotLib.files import atomic_paths

    a, b = tmp_path / "a.json", tmp_path / "b.nii.gz"
    a.write_text("old a", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic_paths(a, b) as (ta, tb):
            assert tb.name.endswith(".nii.gz")  # writers that read the extension still see it
            ta.write_text("new a", encoding="utf-8")
            raise RuntimeError("disk full while writing b")
    assert a.read_text(encoding="utf-8") == "old a" and not b.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with atomic_paths(a, b) as (ta, tb):
        ta.write_text("new a", encoding="utf-8")
        tb.write_text("b", encoding="utf-8")
    assert a.read_text(encoding="utf-8") == "new a" and b.read_text(encoding="utf-8") == "b"
