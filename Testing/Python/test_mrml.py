"""The MRML bridge with the real MRML scene (slicer-core): geometry survives the RAS/LPS crossing."""

import numpy as np
import pytest

from FMOneShotLib.errors import FMOneShotError
from FMOneShotLib.image import Volume, read_volume, write_volume

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra")
from FMOneShotLib import mrml  # noqa: E402


def oblique():
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    b = np.deg2rad(10)
    tilt = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rot @ tilt


def test_volume_node_round_trip_keeps_voxels_and_geometry(tmp_path):
    rng = np.random.default_rng(0)
    vol = Volume(rng.integers(-1000, 1000, (7, 9, 11)).astype(np.int16), (0.7, 0.9, 3.0), (10.0, -20.0, 35.5),
                 oblique(), name="oblique")
    scene = slicer.vtkMRMLScene()
    node = mrml.node_from_volume(scene, vol)
    assert node.GetName() == "oblique" and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    back = mrml.volume_from_node(node)
    assert np.array_equal(back.array, vol.array) and back.array.dtype == vol.array.dtype
    assert np.allclose(back.spacing, vol.spacing) and np.allclose(back.origin, vol.origin)
    assert np.allclose(back.direction, vol.direction)
    # Slicer's RAS of a voxel is the file's LPS with x and y negated
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    ras = np.array(ijk_to_ras.MultiplyPoint((3, 4, 5, 1))[:3])
    lps = vol.index_to_physical([3, 4, 5])
    assert np.allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-6)
    # and the same voxel read through SimpleITK from a file agrees
    path = write_volume(vol, tmp_path / "v.nrrd")
    assert np.allclose(read_volume(path).index_to_physical([3, 4, 5]), lps, atol=1e-4)


def test_volume_from_node_refuses_what_is_not_a_scalar_volume():
    scene = slicer.vtkMRMLScene()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(FMOneShotError, match="not a scalar volume"):
        mrml.volume_from_node(seg)
    with pytest.raises(FMOneShotError, match="holds no image data"):
        mrml.volume_from_node(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))
