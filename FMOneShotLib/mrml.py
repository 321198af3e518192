"""The bridge between Slicer's MRML scene and the library: the one place where RAS (Slicer) meets LPS (files).

``slicer`` and ``vtk`` are imported only inside the functions, so the library imports without them. These
functions use MRML and VTK calls alone (no ``slicer.app``), so they run in the application and in tests with
the PyPI package slicer-core.
"""

from __future__ import annotations

import numpy as np

from .errors import FMOneShotError
from .image import Volume

# LPS <-> RAS: x and y change sign, z stays. The same matrix converts both ways.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def volume_from_node(node) -> Volume:
    """A scalar volume node -> Volume with the same voxels and geometry (LPS)."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise FMOneShotError("The selected node is not a scalar volume.", "select a (grey-value) volume node.")
    image = node.GetImageData()
    if image is None:
        raise FMOneShotError(f"The volume {node.GetName()!r} holds no image data.", "load the volume again.")
    from vtk.util.numpy_support import vtk_to_numpy

    if image.GetNumberOfScalarComponents() != 1:
        raise FMOneShotError(f"The volume {node.GetName()!r} has {image.GetNumberOfScalarComponents()} components.",
                             "convert it to a scalar (grey-value) volume first.")
    dims = image.GetDimensions()  # (x, y, z)
    array = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0]).copy()
    ras = np.zeros((3, 3))
    node.GetIJKToRASDirections(ras)
    direction = LPS_TO_RAS @ ras  # columns: index axes in LPS
    origin = LPS_TO_RAS @ np.asarray(node.GetOrigin(), float)
    return Volume(array, node.GetSpacing(), tuple(origin), direction, name=node.GetName())


def node_from_volume(scene, volume: Volume, name: str | None = None, node=None):
    """Volume -> a new scalar volume node in ``scene`` (or ``node`` updated) with the same voxels and geometry."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or volume.name or "volume")
    array = np.ascontiguousarray(volume.array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_to_vtk(array.reshape(-1), deep=True))
    node.SetAndObserveImageData(image)
    node.SetSpacing(*volume.spacing)
    node.SetOrigin(*(LPS_TO_RAS @ np.asarray(volume.origin)).tolist())
    ras = LPS_TO_RAS @ volume.direction
    node.SetIJKToRASDirections(ras)
    return node
