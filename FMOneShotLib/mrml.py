"""The bridge between Slicer's MRML scene and the library: the one place where RAS (Slicer) meets LPS (files).

- volume node <-> :class:`Volume` (exact geometry);
- the template's labels as tagged point lists in the scene, markups (and painted segments) -> :class:`Template`
  (the template slice and its plane are found from the points);
- results -> a segmentation node per volume (one segment per label), fiducials, a per-slice confidence table;
- each segment's standard terminology (:func:`set_segment_terminology`, as Slicer's Terminologies module);
- export: labelmaps through the Segmentations logic, ``.seg.nrrd``, and DICOM SEG for volumes loaded from DICOM;
- :func:`apply_to_nodes`: a batch that adds nodes only after the last volume, so Cancel changes nothing.

``slicer`` and ``vtk`` are imported only inside the functions, so the library imports without them; the label
functions the panel calls when it opens (:func:`label_prompts`, :func:`add_label` with a colour,
:func:`remove_label`, :func:`set_label_extent`, :func:`landmarks_node`, :func:`volume_targets`) need only numpy and SimpleITK, which
Slicer ships, so they work before the other dependencies are installed. These
functions use MRML and VTK calls alone (no ``slicer.app``), so they run in the application and in tests with
the PyPI package slicer-core. The Slicer module (FMOneShot/FMOneShot.py) only adds the panel around them.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .align import DEFAULT_KIND
from .dicomseg import algorithm_parameters
from .errors import FMOneShotError
from .files import atomic_paths, refuse_existing, refuse_inputs
from .image import IN_PLANE, MODALITIES, Volume, guess_modality, write_volume

if TYPE_CHECKING:  # .template imports scipy, which Slicer does not ship: the panel opens before it is installed
    from .template import Template
from .terminology import CODE_FIELDS, Code, Terminology, for_name, label_color

# LPS <-> RAS: x and y change sign, z stays. The same matrix converts both ways.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _check_volume_node(node):
    """The node's image data, or FMOneShotError when the node is not a scalar volume with one component."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise FMOneShotError("The selected node is not a scalar volume.", "select a (grey-value) volume node.")
    image = node.GetImageData()
    if image is None:
        raise FMOneShotError(f"The volume {node.GetName()!r} holds no image data.", "load the volume again.")
    if image.GetNumberOfScalarComponents() != 1:
        raise FMOneShotError(f"The volume {node.GetName()!r} has {image.GetNumberOfScalarComponents()} components.",
                             "convert it to a scalar (grey-value) volume first.")
    return image


def volume_from_node(node) -> Volume:
    """A scalar volume node -> Volume with the same voxels and geometry (LPS)."""
    image = _check_volume_node(node)
    from vtk.util.numpy_support import vtk_to_numpy

    dims = image.GetDimensions()  # (x, y, z)
    array = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0]).copy()
    ras = np.zeros((3, 3))
    node.GetIJKToRASDirections(ras)
    direction = LPS_TO_RAS @ ras  # columns: index axes in LPS
    origin = LPS_TO_RAS @ np.asarray(node.GetOrigin(), float)
    # the modality as a file read gives it: the DICOM tag Slicer keeps, else CT when values look like HU
    modality = dicom_modality(node)
    if modality not in MODALITIES:
        modality = guess_modality(array)
    return Volume(array, node.GetSpacing(), tuple(origin), direction, name=node.GetName(), modality=modality)


def dicom_modality(node) -> str | None:
    """The DICOM Modality (0008,0060) of the series a volume node was loaded from, upper case, or None.

    Slicer's DICOM plugins keep it on the node's subject hierarchy item, not on the node: DICOMLib's
    ``DICOMPlugin.addSeriesInSubjectHierarchy`` sets the item attribute
    ``vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()`` ("DICOM.Modality"). A node
    attribute of that name (some extensions and scripts set one) is read when the item has none. The subject
    hierarchy node is looked up, never created."""
    value = ""
    scene = node.GetScene()
    for hierarchy in _nodes_by_class(scene, "vtkMRMLSubjectHierarchyNode")[:1] if scene is not None else []:
        item = hierarchy.GetItemByDataNode(node)
        if item:
            value = hierarchy.GetItemAttribute(item, DICOM_MODALITY_ATTRIBUTE) or ""
    value = value or node.GetAttribute(DICOM_MODALITY_ATTRIBUTE) or ""
    return value.strip().upper() or None


# vtkMRMLSubjectHierarchyConstants::GetDICOMSeriesModalityAttributeName() (Libs/MRML/Core)
DICOM_MODALITY_ATTRIBUTE = "DICOM.Modality"


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


# ---------------------------------------------------------------------------------------------------- prompts
@dataclass
class LabelPrompt:
    """One label as the user marked it in Slicer: its name and colour (0-255), a markups node of positive
    points, one of negative points, optionally a painted segment (``segmentation`` node + ``segment_id``), and
    optionally its extent: (first, last) slice indices of the template volume in the template's plane where
    the structure lies (:attr:`template.Template.extent`)."""

    name: str
    color: tuple | None = None
    positive: object = None
    negative: object = None
    segmentation: object = None
    segment_id: str | None = None
    extent: tuple | None = None


def control_points(node) -> list:
    """[(label, RAS (3,))] of the placed control points of a markups node (None: no points)."""
    if node is None:
        return []
    if not node.IsA("vtkMRMLMarkupsNode"):
        raise FMOneShotError(f"{node.GetName()!r} is not a markups node.", "pick a point list (markups) node.")
    out = []
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(i) != node.PositionDefined:
            continue  # a point still being placed
        ras = np.zeros(3)
        node.GetNthControlPointPositionWorld(i, ras)
        out.append((node.GetNthControlPointLabel(i) or f"#{i + 1}", ras))
    return out


def ras_to_index(volume: Volume, ras) -> np.ndarray:
    """RAS (Slicer world) -> continuous (x, y, z) index of ``volume``; accepts (3,) or (N, 3)."""
    return volume.physical_to_index(np.asarray(ras, float) @ LPS_TO_RAS)


def index_to_ras(volume: Volume, index) -> np.ndarray:
    return volume.index_to_physical(index) @ LPS_TO_RAS


def _painted(volume_node, prompt: LabelPrompt) -> np.ndarray:
    """The painted segment of ``prompt`` on the volume's grid, (z, y, x) bool (Segmentations logic)."""
    seg = prompt.segmentation
    if seg is None or not seg.IsA("vtkMRMLSegmentationNode"):
        raise FMOneShotError(f"The painted mask of label {prompt.name!r} is not a segmentation node.",
                             "choose a segmentation node and one of its segments.")
    if prompt.segment_id is None or seg.GetSegmentation().GetSegment(prompt.segment_id) is None:
        raise FMOneShotError(f"The segmentation {seg.GetName()!r} has no segment {prompt.segment_id!r} "
                             f"for label {prompt.name!r}.", "choose one of its segments.")
    from .template import Label

    return _export_labelmap(seg, [prompt.segment_id], volume_node, [Label(prompt.name, 1)]).array > 0


def template_from_markups(volume_node, labels: list, landmarks=None, orientation: str | None = None,
                          settings: dict | None = None) -> Template:
    """A Template from what was marked in Slicer on ``volume_node``.

    ``labels``: :class:`LabelPrompt` per label (values 1, 2, ... in this order); ``landmarks``: a markups
    node whose control point labels name the landmarks. The template slice is the one all points lie on:
    in ``orientation`` ("axial", "coronal", "sagittal") when given, else whichever plane of the volume they
    share (the volume's own slices first). Without points, the slice where the painted masks are largest.
    Points outside the volume, points on different slices, repeated names and a label with neither a
    positive point nor a painted mask are refused with the fix, before anything runs.
    """
    from .template import Label, Template

    if volume_node is not None and volume_node.GetParentTransformNode() is not None:
        raise FMOneShotError(f"The template volume {volume_node.GetName()!r} is under a transform.",
                             "harden the transform (Data module: right-click > Harden transform) first.")
    volume = volume_from_node(volume_node)
    names = [p.name for p in labels]
    if len(set(names)) != len(names):
        raise FMOneShotError(f"Label names repeat: {names}.", "give every label its own name.")
    points = []  # (kind, owner, point label, continuous index)
    for p in labels:
        for kind, node in (("positive", p.positive), ("negative", p.negative)):
            points += [(kind, p.name, lab, ras_to_index(volume, ras)) for lab, ras in control_points(node)]
    lm_points = control_points(landmarks)
    lm_names = [lab for lab, _ in lm_points]
    if len(set(lm_names)) != len(lm_names):
        raise FMOneShotError(f"Landmark names repeat: {lm_names}.", "rename the control points so each is unique.")
    points += [("landmark", lab, lab, ras_to_index(volume, ras)) for lab, ras in lm_points]
    size = np.array(volume.array.shape[::-1])
    for kind, owner, lab, ijk in points:
        if np.any(ijk < -0.5) or np.any(ijk >= size - 0.5):
            what = f"landmark {owner!r}" if kind == "landmark" else f"{kind} point {lab!r} of label {owner!r}"
            raise FMOneShotError(f"The {what} lies outside the volume {volume.name!r}.",
                                 "place it on the template volume, or delete it.")
    painted = {p.name: _painted(volume_node, p) for p in labels if p.segmentation is not None}
    extent = {p.name: (int(p.extent[0]), int(p.extent[1])) for p in labels if p.extent is not None}

    axes = [volume.slice_axis(orientation)] if orientation else [2, 0, 1]
    if points:
        idx = np.round(np.array([ijk for *_, ijk in points])).astype(int)
        shared = [a for a in axes if len(set(idx[:, a])) == 1]
        if not shared:
            a = axes[0]
            where = ", ".join(f"{kind} {lab!r} of {owner!r}: slice {int(round(ijk[a]))}"
                              if kind != "landmark" else f"landmark {owner!r}: slice {int(round(ijk[a]))}"
                              for kind, owner, lab, ijk in points)
            plane = orientation or "any one plane"
            raise FMOneShotError(f"The points lie on different slices ({volume.orientation_of(a)} slices: {where}).",
                                 f"place all points of the template on one slice ({plane}), or move the stray ones.")
        axis = shared[0]
        k = int(idx[0, axis])
    elif painted:
        axis = axes[0]
        areas = sum(volume.like(m).resliced(axis).array.sum(axis=(1, 2)) for m in painted.values())
        k = int(np.argmax(areas))
    else:
        raise FMOneShotError("Nothing is marked on the template volume.",
                             "place positive points for a label (or paint it), or place named landmarks.")
    cols, rows = IN_PLANE[axis]

    def pixels(kind, owner):
        return [[ijk[cols], ijk[rows]] for kd, ow, _, ijk in points if kd == kind and ow == owner]

    positive = {n: pixels("positive", n) for n in names if pixels("positive", n)}
    negative = {n: pixels("negative", n) for n in names if pixels("negative", n)}
    marks = {lab: pixels("landmark", lab)[0] for lab in lm_names}
    masks = {}
    for n, m in painted.items():
        plane = volume.like(m).resliced(axis).array[k]
        if not plane.any():
            raise FMOneShotError(f"The painted segment of label {n!r} is empty on the template slice "
                                 f"({volume.orientation_of(axis)} slice {k}).",
                                 "paint it on the slice where the points are.")
        masks[n] = plane
    label_list = [Label(p.name, i + 1, p.color) for i, p in enumerate(labels)]
    return Template.from_volume(volume, k, positive, negative, masks, marks, labels=label_list,
                                settings=settings, orientation=volume.orientation_of(axis), extent=extent)


# ---------------------------------------------------------------------------------------------------- results
def _segmentations_logic():
    """The Segmentations logic class, whose import and export methods are static: no logic object is created
    (a new one would register the representation converters again on every call). Every node given to
    them must be in the scene: Slicer 5.6 and 5.8 dereference a null colour node for a colour table outside
    it (fixed upstream in 2025), which crashes the application."""
    import slicer

    return slicer.vtkSlicerSegmentationsModuleLogic


def _remove(scene, node) -> None:
    if node is not None and node.GetScene() is scene:
        for i in range(node.GetNumberOfDisplayNodes()):
            if node.GetNthDisplayNode(i) is not None:
                scene.RemoveNode(node.GetNthDisplayNode(i))
        scene.RemoveNode(node)


def _nodes_by_class(scene, class_name: str) -> list:
    """The nodes of ``class_name`` (subclasses included) in ``scene``, in scene order.

    ``vtkMRMLScene::GetNodesByClass`` returns a collection the caller must delete, and the Python wrapping does
    not: without ``UnRegister`` the collection leaks and keeps every node in it alive, a removed volume's
    voxels included (slicer.util.getNodesByClass unregisters it too; it is not used here because it reads
    ``slicer.mrmlScene`` whatever scene is given). A wrapping that already owns the new collection (a reference
    count of 1) is left alone."""
    collection = scene.GetNodesByClass(class_name)
    if collection.GetReferenceCount() > 1:
        collection.UnRegister(None)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


@contextlib.contextmanager
def _scratch(scene):
    """Nodes added to ``scene`` inside the block (temporary labelmaps, the colour tables Slicer adds for
    them) are removed when it ends, so the user's scene only gains the nodes meant for it."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before and not node.GetSingletonTag():
                scene.RemoveNode(node)


def _labelmap_node(scene, volume: Volume, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    return node_from_volume(scene, volume, node=node)


def segmentation_from_labels(scene, labels: Volume, template_labels: list, reference_node, name: str):
    """A new segmentation node ``name`` with one segment per template label (ID and name the label's name,
    its colour), the voxels of ``labels`` (a label volume on ``reference_node``'s grid), and
    ``reference_node`` as its geometry. Labels absent from the volume get an empty segment, so that every
    result of one template has the same segments."""
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        seg_node.CreateDefaultDisplayNodes()
        seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
        segmentation = seg_node.GetSegmentation()
        with _scratch(scene):
            staging = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "FMOneShot staging (temporary)")
            labelmap = _labelmap_node(scene, labels, "FMOneShot labels (temporary)")
            if labels.array.any() and not _segmentations_logic().ImportLabelmapToSegmentationNode(labelmap, staging):
                raise FMOneShotError(f"Slicer could not import the labels of {name!r}.", "report this as a bug.")
            staged = staging.GetSegmentation()
            by_value = {staged.GetNthSegment(i).GetLabelValue(): staged.GetNthSegmentID(i)
                        for i in range(staged.GetNumberOfSegments())}
            for lb in template_labels:
                color = tuple(c / 255.0 for c in lb.color)
                if lb.value in by_value:  # the staged segment, renamed and moved under the label's name
                    segment = staged.GetSegment(by_value[lb.value])
                    segment.SetName(lb.name)
                    segment.SetColor(*color)
                    segmentation.AddSegment(segment, lb.name)
                else:
                    segmentation.AddEmptySegment(lb.name, lb.name, color)
                segmentation.GetSegment(lb.name).SetTag(VALUE_TAG, str(lb.value))
                set_segment_terminology(segmentation.GetSegment(lb.name), lb.terminology)
    except Exception:
        _remove(scene, seg_node)
        raise
    return seg_node


# Slicer's terminology contexts for codes from the DICOM standard's lists (Terminologies module).
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def set_segment_terminology(segment, terminology: Terminology) -> None:
    """Give a segment (``vtkSegment``) the codes of ``terminology``, as Slicer's Terminologies module does:
    the segment tag ``vtkSegment.GetTerminologyEntryTagName()`` holding the entry serialized by
    ``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry`` (context~category~type~modifier~region
    context~region~region modifier, each code ``scheme^value^meaning``). Both calls exist in Slicer 5.8 and
    later; the newer ``vtkSegment.SetTerminology`` is a shortcut that writes the same tag, absent from older
    versions. ``.seg.nrrd`` files keep the tag (``SegmentN_Tags``)."""
    import slicer

    def parts(code):
        return [code.value, code.scheme, code.meaning] if code is not None else ["", "", ""]

    t = terminology
    entry = slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT, *parts(t.category), *parts(t.type), *parts(t.type_modifier),
        ANATOMIC_CONTEXT if t.region is not None else "", *parts(t.region), *parts(t.region_modifier))
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)


def segment_terminology(segment) -> Terminology | None:
    """The terminology a segment carries (set by Slicer's terminology selector or
    :func:`set_segment_terminology`), or None when it has none or it lacks a category or type."""
    import slicer
    import vtk

    entry = vtk.reference("")
    if not segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry):
        return None
    fields = str(entry).split("~")  # context~category~type~modifier~region context~region~region modifier
    if len(fields) != 7:
        return None
    codes = {}
    for name, text in zip(CODE_FIELDS, fields[1:4] + fields[5:7]):
        scheme, value, meaning = (text.split("^") + ["", "", ""])[:3]
        if scheme and value and meaning:
            codes[name] = Code(scheme, value, meaning)
    if "category" not in codes or "type" not in codes:
        return None
    return Terminology(**codes)


def _color_table(scene, labels: list):
    """A colour table added to ``scene`` mapping each label's name to its value, for labelmap export (add it
    inside :func:`_scratch`, which removes it again)."""
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "FMOneShot colours (temporary)")
    table.SetTypeToUser()
    table.SetNumberOfColors(max(lb.value for lb in labels) + 1)
    table.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for lb in labels:
        table.SetColor(lb.value, lb.name, *(c / 255.0 for c in lb.color), 1.0)
    return table


def labels_from_segmentation(seg_node, template_labels: list, reference_node) -> Volume:
    """The label volume of a segmentation node on ``reference_node``'s grid: the segment named after each
    template label is written with that label's value (through the Segmentations logic)."""
    segmentation = seg_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    volume = _export_labelmap(seg_node, ids, reference_node, template_labels)
    volume.name = reference_node.GetName()
    return volume


def _export_labelmap(seg_node, segment_ids: list, reference_node, labels: list) -> Volume:
    """Segments -> a label volume on ``reference_node``'s grid, values from ``labels`` by segment name."""
    import slicer
    import vtk

    scene = seg_node.GetScene() or reference_node.GetScene()
    with _scratch(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "FMOneShot export (temporary)")
        ids = vtk.vtkStringArray()
        for segment_id in segment_ids:
            ids.InsertNextValue(segment_id)
        ok = _segmentations_logic().ExportSegmentsToLabelmapNode(
            seg_node, ids, labelmap, reference_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
            _color_table(scene, labels))
        if not ok:
            raise FMOneShotError(f"Slicer could not turn {seg_node.GetName()!r} into a labelmap on "
                                 f"{reference_node.GetName()!r}.", "check the segmentation's reference volume.")
        return volume_from_node(labelmap)


def fiducials_from_landmarks(scene, result, name: str, per_slice: bool = False):
    """A markups fiducial node ``name`` with the landmarks of a pipeline Result: one control point per
    landmark on the slice where it is found with the highest confidence (label: the landmark's name;
    description: slice and confidence), or with ``per_slice`` one per landmark and slice (``name@slice``)."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    best = result.best_landmarks()
    try:
        node.CreateDefaultDisplayNodes()
        for lm_name, per in result.landmarks.items():
            for lm in (per if per_slice else [best[lm_name]]):
                ras = np.asarray(lm.physical, float) @ LPS_TO_RAS
                i = node.AddControlPoint(*ras.tolist(), f"{lm_name}@{lm.slice}" if per_slice else lm_name)
                node.SetNthControlPointDescription(i, f"slice {lm.slice}, confidence {lm.confidence:.3f}")
                node.SetNthControlPointLocked(i, False)
    except Exception:
        _remove(scene, node)
        raise
    return node


def confidence_table(scene, result, name: str):
    """A table node ``name``: per slice of the result, whether each label was found and with what confidence."""
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    col = vtk.vtkIntArray()
    col.SetName("slice")
    table.AddColumn(col)
    for j, label in enumerate(result.label_names):
        for suffix, kind in (("found", vtk.vtkIntArray), ("confidence", vtk.vtkDoubleArray)):
            c = kind()
            c.SetName(f"{label} {suffix}")
            table.AddColumn(c)
    n = result.confidence.shape[0]
    table.SetNumberOfRows(n)
    for z in range(n):
        table.SetValue(z, 0, vtk.vtkVariant(z))
        for j in range(len(result.label_names)):
            table.SetValue(z, 1 + 2 * j, vtk.vtkVariant(int(result.present[z, j])))
            table.SetValue(z, 2 + 2 * j, vtk.vtkVariant(float(result.confidence[z, j])))
    node.SetAttribute("FMOneShot.orientation", result.orientation)
    node.Modified()
    return node


# ---------------------------------------------------------------------------------------------------- export
VALUE_TAG = "FMOneShot.Value"  # segment tag: the template label's value, for labelmap export
RESULT_ATTRIBUTE = "FMOneShot.Result"  # on the segmentation nodes Apply made: the volume's name
# DICOM SEG (dicomseg.py), for volumes loaded from DICOM: export_segmentations(..., dicom_database=...)
DICOM_SEG_EXPORT = ".seg.dcm"
# export format -> the suffix of the file written after the volume's name (the panel's choices, in this order)
EXPORT_FORMATS = {".nrrd": "-labels.nrrd", ".nii.gz": "-labels.nii.gz", ".seg.nrrd": ".seg.nrrd",
                  DICOM_SEG_EXPORT: DICOM_SEG_EXPORT}
ALGORITHM_ATTRIBUTE = "FMOneShot.Algorithm"  # on result segmentations: JSON of dicomseg.algorithm_parameters


def _file_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._ -]+", "_", name).strip(" .") or "volume"
    return stem


def export_paths(seg_nodes: list, folder, fmt: str = ".nrrd") -> list:
    """Where :func:`export_segmentations` would write each node (checked: format, folder, nodes, clashes)."""
    return [path for *_, path in _export_jobs(seg_nodes, folder, fmt)]


def _export_jobs(seg_nodes: list, folder, fmt: str) -> list:
    if fmt not in EXPORT_FORMATS:
        raise FMOneShotError(f"Unknown export format {fmt!r}.", f"use one of: {', '.join(EXPORT_FORMATS)}.")
    if not seg_nodes:
        raise FMOneShotError("There is no segmentation to export.", "apply the template to a volume first.")
    folder = Path(folder)
    if not folder.is_dir():
        raise FMOneShotError(f"The export folder {folder} does not exist.", "choose an existing folder.")
    jobs = []
    for seg in seg_nodes:
        if seg is None or not seg.IsA("vtkMRMLSegmentationNode"):
            raise FMOneShotError("One of the nodes to export is not a segmentation.", "export segmentation nodes.")
        ref = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
        if ref is None:
            raise FMOneShotError(f"The segmentation {seg.GetName()!r} has no reference volume.",
                                 "set its reference geometry to the volume it belongs to (Segmentations module).")
        if fmt == DICOM_SEG_EXPORT:
            dicom_instance_uids(ref)  # a volume not loaded from DICOM: refused before anything else
        jobs.append((seg, ref, folder / (_file_stem(ref.GetName()) + EXPORT_FORMATS[fmt])))
    paths = [p for *_, p in jobs]
    clash = sorted({str(p) for p in paths if paths.count(p) > 1})
    if clash:
        raise FMOneShotError(f"Several segmentations would be written to {', '.join(clash)}.",
                             "give the volumes different names, or export them separately.")
    # the files the volumes were loaded from are never written over, even when overwriting is confirmed
    storage = [ref.GetStorageNode() for _, ref, _ in jobs]
    refuse_inputs(paths, [s.GetFileName() for s in storage if s is not None and s.GetFileName()], "the export")
    return jobs


def export_segmentations(seg_nodes: list, folder, fmt: str = ".nrrd", overwrite: bool = False,
                         labels: list | None = None, dicom_database=None) -> list:
    """Write each segmentation node to ``folder``: a labelmap on its reference volume's grid
    (``VOLUME-labels.nrrd`` or ``VOLUME-labels.nii.gz``, segment k of the node -> value k, or the value of the
    template label of the same name when ``labels`` are given), Slicer's segmentation file
    (``VOLUME.seg.nrrd``, each segment with its terminology), or with ``fmt`` ".seg.dcm" a DICOM SEG
    (``VOLUME.seg.dcm``, :func:`dicomseg.write_dicom_seg`) referencing the DICOM images the reference volume
    was loaded from, found in ``dicom_database`` (``slicer.dicomDatabase``; :func:`dicom_source_files`).
    Every node is checked, and existing files are refused unless ``overwrite``, before anything is written.
    Returns the paths written."""
    import slicer

    jobs = _export_jobs(seg_nodes, folder, fmt)
    paths = [p for *_, p in jobs]
    sources = [dicom_source_files(ref, dicom_database) for _, ref, _ in jobs] if fmt == DICOM_SEG_EXPORT else []
    refuse_existing(paths, overwrite, "choose another folder, or confirm overwriting (overwrite=True).")
    for k, (seg, ref, path) in enumerate(jobs):
        if fmt == DICOM_SEG_EXPORT:
            from .dicomseg import write_dicom_seg

            seg_labels = labels or _segment_labels(seg)
            algorithm = json.loads(seg.GetAttribute(ALGORITHM_ATTRIBUTE) or "{}")
            write_dicom_seg(labels_from_segmentation(seg, seg_labels, ref), seg_labels, sources[k], path,
                            algorithm, force=True)
        elif fmt == ".seg.nrrd":
            storage = slicer.vtkMRMLSegmentationStorageNode()
            with atomic_paths(path) as tmp:
                storage.SetFileName(str(tmp))
                if not storage.WriteData(seg):
                    raise FMOneShotError(f"Could not write {path}.", "check that the folder is writable.")
        else:
            seg_labels = labels or _segment_labels(seg)
            volume = labels_from_segmentation(seg, seg_labels, ref)
            top = int(volume.array.max()) if volume.array.size else 0
            volume.array = volume.array.astype(np.uint8 if top < 256 else np.uint16)
            write_volume(volume, path, force=True)
    return paths


def dicom_instance_uids(volume_node) -> list:
    """The SOP Instance UIDs of the DICOM images ``volume_node`` was loaded from, as Slicer's DICOM plugins
    record them in its attribute ``DICOM.instanceUIDs`` (space-separated; DICOMScalarVolumePlugin).
    FMOneShotError, naming the fix, for a volume not loaded through the DICOM module (no such attribute)."""
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        others = ", ".join(f for f in EXPORT_FORMATS if f != DICOM_SEG_EXPORT)
        raise FMOneShotError(f"The volume {volume_node.GetName()!r} was not loaded from DICOM, so there are no "
                             "images for a DICOM SEG to reference.",
                             f"load the series with the DICOM module, or export as {others}.")
    return uids


def dicom_source_files(volume_node, dicom_database) -> list:
    """The DICOM files ``volume_node`` was loaded from: its SOP instance UIDs (:func:`dicom_instance_uids`),
    each found with ``dicom_database.fileForInstance(uid)`` (``slicer.dicomDatabase``, a ctkDICOMDatabase,
    which answers "" for an unknown UID). FMOneShotError, naming the fix, when the volume was not loaded from
    DICOM, there is no database, or a file is no longer in the database."""
    name = volume_node.GetName()
    uids = dicom_instance_uids(volume_node)
    if dicom_database is None:
        raise FMOneShotError("DICOM SEG export needs Slicer's DICOM database, and there is none.",
                             "open the DICOM module once (Slicer opens its database there), or from Python pass "
                             "dicom_database=slicer.dicomDatabase.")
    files = [dicom_database.fileForInstance(uid) for uid in uids]
    missing = [uid for uid, f in zip(uids, files) if not f or not Path(f).is_file()]
    if missing:
        raise FMOneShotError(f"{len(missing)} of the {len(uids)} DICOM images of {name!r} are not in the DICOM "
                             f"database or their files are gone (first: {missing[0]}).",
                             "import the series into the DICOM database again, then export.")
    return [Path(f) for f in files]


def _segment_labels(seg_node) -> list:
    """The labels of a segmentation's segments: the template's value kept on FMOneShot's segments, else
    k for the k-th segment (after the largest kept value); the segment's terminology, or where it has none or
    only Slicer's default "Tissue", the codes of its name (``terminology.for_name``)."""
    import vtk

    from .template import Label

    segmentation = seg_node.GetSegmentation()
    segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]

    kept = []
    for segment in segments:
        value = vtk.reference("")
        kept.append(int(str(value)) if segment.GetTag(VALUE_TAG, value) and str(value).isdigit() else None)
    if len({v for v in kept if v}) != len([v for v in kept if v]):
        kept = [None] * len(kept)  # repeated values (segments copied between nodes): number them afresh
    nxt = max([v for v in kept if v] or [0])
    out = []
    for i, (segment, value) in enumerate(zip(segments, kept)):
        if value is None:
            nxt += 1
            value = nxt
        color = tuple(int(round(255 * c)) for c in segment.GetColor())
        out.append(Label(segment.GetName() or segmentation.GetNthSegmentID(i), value, color,
                         _specific(segment_terminology(segment))))
    return out


def _specific(terminology: Terminology | None) -> Terminology | None:
    """None for no terminology or the generic one (Slicer gives every new segment "Tissue")."""
    return None if terminology is None or terminology.is_generic else terminology


def result_segmentations(scene) -> list:
    """The segmentation nodes FMOneShot made in ``scene`` (also after the scene was saved and loaded)."""
    return [n for n in _nodes_by_class(scene, "vtkMRMLSegmentationNode") if n.GetAttribute(RESULT_ATTRIBUTE)]


# ---------------------------------------------------------------------------------------------------- batch
@dataclass
class NodeResult:
    """What one target volume node got: the library's Result and the nodes made from it."""

    volume: object
    result: object
    segmentation: object = None
    landmarks: object = None
    confidence: object = None

    def summary(self) -> str:
        """'CT: liver on 12 slices, spleen on 0 slices, 2 landmarks' for the panel's status line."""
        r = self.result
        found = [f"{name} on {int(r.present[:, i].sum())} slices" for i, name in enumerate(r.label_names)]
        found += [f"{len(r.landmarks)} landmark(s)"] if r.landmarks else []
        return f"{self.volume.GetName()}: {', '.join(found)}"


def volume_targets(scene) -> tuple:
    """``(targets, skipped)`` for "Apply to all loaded volumes": the grey-value volume nodes of ``scene`` in
    scene order, and ``[(name, why)]`` for the volume nodes that cannot be targets (labelmaps, vector/RGB,
    diffusion and tensor volumes, which are all vtkMRMLScalarVolumeNode subclasses, and volumes with no
    image or more than one component), so that one such volume does not stop the whole batch."""
    targets, skipped = [], []
    kinds = (("vtkMRMLLabelMapVolumeNode", "a labelmap"), ("vtkMRMLDiffusionWeightedVolumeNode", "a DWI volume"),
             ("vtkMRMLDiffusionImageVolumeNode", "a diffusion/tensor volume"),
             ("vtkMRMLVectorVolumeNode", "a vector (RGB) volume"))
    for node in _nodes_by_class(scene, "vtkMRMLScalarVolumeNode"):
        why = next((what for cls, what in kinds if node.IsA(cls)), None)
        if why is None:
            try:  # no image data, or more than one component in a plain scalar volume node
                _check_volume_node(node)
            except FMOneShotError as exc:
                why = exc.problem
        if why is None:
            targets.append(node)
        else:
            skipped.append((node.GetName(), why))
    return targets, skipped


DEVICES = ("auto", "cpu", "cuda")  # "auto": the GPU when there is one


def run_options(backend: str = "auto", adapter: str = "auto", segmenter: str = "auto", device: str = "auto",
                augment: bool = False, align: str = DEFAULT_KIND) -> dict:
    """The panel's choices as :class:`pipeline.OneShot` keyword arguments (device goes to the models;
    ``align``: one of :data:`align.KINDS`, the template registered to each target first)."""
    from .align import check_kind

    check_kind(align)
    if device not in DEVICES:
        raise FMOneShotError(f"Unknown device {device!r}.", f"choose {', '.join(DEVICES)}.")
    if augment and adapter == "none":
        raise FMOneShotError("'Augment the template' trains an adapter, and the adapter is none.",
                             "choose an adapter, or untick 'Augment the template'.")
    return {"backend": backend, "adapter": adapter, "segmenter": segmenter, "align": align,
            "adapter_options": {"augment": True} if augment else {},
            "backend_options": {} if backend == "offline" else {"device": device},
            "segmenter_options": {"device": device} if segmenter in ("auto", "sam", "sam2") else {}}


def check_extras(backend: str, segmenter: str, python: tuple | None = None) -> None:
    """FMOneShotError, before any work, when the chosen ``backend`` or ``segmenter`` needs an optional package
    (:data:`requirements.EXTRAS`: the sd backend diffusers and transformers, the sam2 segmenter the sam2
    package) that this Python lacks, or cannot run on this Python (``python``: ``sys.version_info``; sam2
    needs 3.10, so not Slicer 5.8). The panel does not install these itself (sam2 is an sdist that pip would
    build against a second PyTorch unless told otherwise): the fix names the command for Slicer's Python
    console. "auto" never needs them (it picks SAM 2 only where the sam2 package is installed)."""
    import sys

    from . import requirements

    python = tuple(python or sys.version_info)[:2]
    for name in [n for n in dict.fromkeys((backend, segmenter)) if n in requirements.EXTRAS]:
        what = f"the segmenter {name}" if name == segmenter else f"the backend {name}"
        oldest = requirements.EXTRA_PYTHON.get(name)
        if oldest is not None and python < oldest:
            raise FMOneShotError(f"{what[0].upper()}{what[1:]} needs Python {'.'.join(map(str, oldest))} or later, "
                                 f"and this Slicer runs Python {'.'.join(map(str, python))}.",
                                 "use Slicer 5.10 or later for it, or choose another (auto, or sam).")
        unmet = requirements.unmet(requirements.EXTRAS[name])
        if unmet:
            command = requirements.slicer_command(name)
            raise FMOneShotError(f"{what[0].upper()}{what[1:]} needs "
                                 + ", ".join(f"{r} (installed: {h})" if h else r for r, h in unmet) + ".",
                                 f"install it in Slicer's Python console ({command}) and restart Slicer, or "
                                 "choose another.")


def check_targets(volume_nodes: list) -> list:
    """The target volume nodes (None dropped), each checked to be a grey-value volume with image data, before
    any work starts: FMOneShotError naming the first that is not, or when there is none."""
    nodes = [n for n in volume_nodes if n is not None]
    if not nodes:
        raise FMOneShotError("No target volume is selected.", "choose a target volume, or apply to all volumes.")
    for node in nodes:  # every target is checked before the first is processed; converted one at a time
        _check_volume_node(node)
    return nodes


def _check_still_in_scene(scene, nodes: list) -> None:
    """FMOneShotError when one of ``nodes`` is no longer in ``scene``: the panel processes Qt events while it
    works (progress, Cancel), so the user can remove a volume or close the scene meanwhile."""
    gone = [node.GetName() for node in nodes if scene is None or node.GetScene() is not scene]
    if gone:
        raise FMOneShotError(f"{', '.join(repr(n) for n in gone)} left the scene (removed, or the scene was closed) "
                             "while FMOneShot was working on it; nothing was added.",
                             "load the volume again and apply again.")


def apply_to_nodes(template: Template, volume_nodes: list, progress=None, cancel=None,
                   per_slice_landmarks: bool = False, oneshot=None, run=None, **options) -> list:
    """Apply ``template`` to every volume node; then, and only then, add the results to the scene.

    Per volume: a segmentation node "VOLUME segmentation" (one segment per label, with its name and colour),
    a fiducial node "VOLUME landmarks" when the template has landmarks, and a table node
    "VOLUME FMOneShot confidence" with the per-slice decisions. ``progress(volume_index, n_volumes,
    slices_done, n_slices, volume_name)``; ``cancel()`` returning True raises ``pipeline.Cancelled`` within
    one slice, and since nodes are added only after the last volume, a cancelled (or failed) run leaves the
    scene as it was. ``options`` go to :class:`pipeline.OneShot` (or pass a fitted ``oneshot``).

    ``run(work)``, when given, runs ``work()`` (one volume's computation: its alignment and every slice, which
    touches no MRML node, the volume having been converted before) and returns its value; the panel passes one
    that runs it in a worker thread while the main thread keeps Slicer responsive (``progress`` and ``cancel``
    are then called from that thread, ``cancel`` also once from the calling thread before the first volume).
    The nodes are read and made in the calling thread."""
    from .pipeline import OneShot

    nodes = check_targets(volume_nodes)
    scene = nodes[0].GetScene()
    oneshot = oneshot or OneShot(template, **options)
    if oneshot.extractor is None:
        oneshot.fit()  # models, template features, adapter training: Cancel is honoured once it is done
    if cancel is not None and cancel():
        from .pipeline import Cancelled

        raise Cancelled("cancelled before the first slice")
    out = []
    for v, node in enumerate(nodes):
        _check_still_in_scene(scene, nodes[v:])

        def step(done, total, v=v, name=node.GetName()):
            if progress is not None:
                progress(v, len(nodes), done, total, name)

        def work(volume=volume_from_node(node), step=step):
            return oneshot.apply(volume, progress=step, cancel=cancel)
        out.append(NodeResult(node, run(work) if run is not None else work()))
    _check_still_in_scene(scene, nodes)
    made = []
    try:
        for item in out:
            name = item.volume.GetName()
            if template.labels:
                item.segmentation = segmentation_from_labels(
                    scene, item.result.labels, template.labels, item.volume,
                    scene.GenerateUniqueName(f"{name} segmentation"))
                item.segmentation.SetAttribute(RESULT_ATTRIBUTE, name)
                item.segmentation.SetAttribute(ALGORITHM_ATTRIBUTE, json.dumps(algorithm_parameters(oneshot)))
                made.append(item.segmentation)
            if item.result.landmarks:
                item.landmarks = fiducials_from_landmarks(scene, item.result,
                                                          scene.GenerateUniqueName(f"{name} landmarks"),
                                                          per_slice_landmarks)
                made.append(item.landmarks)
            item.confidence = confidence_table(scene, item.result,
                                               scene.GenerateUniqueName(f"{name} FMOneShot confidence"))
            made.append(item.confidence)
            # results are in the volume's own coordinates: under a transform, they go under it too
            for node in (item.segmentation, item.landmarks):
                if node is not None:
                    node.SetAndObserveTransformNodeID(item.volume.GetTransformNodeID())
    except Exception:
        for node in made:
            _remove(scene, node)
        raise
    return out


# ---------------------------------------------------------------------------------------------------- labels
# The labels of the template live in the scene, so they are saved with it: per label, a markups point list
# of positive points and one of negative points, tagged with these attributes; landmarks in one more list.
LABEL_ATTRIBUTE = "FMOneShot.Label"
ROLE_ATTRIBUTE = "FMOneShot.Role"  # positive | negative | landmarks
COLOR_ATTRIBUTE = "FMOneShot.Color"  # "r,g,b" 0-255
EXTENT_ATTRIBUTE = "FMOneShot.Extent"  # "first,last": template slice indices in the template's plane (optional)
NEGATIVE_COLOR = (0.25, 0.45, 1.0)  # negative points: blue crosses, whatever the label's colour


def _tagged(scene, role: str) -> list:
    return [n for n in _nodes_by_class(scene, "vtkMRMLMarkupsFiducialNode") if n.GetAttribute(ROLE_ATTRIBUTE) == role]


def add_label(scene, name: str, color=None) -> tuple:
    """A new label: its positive (label colour, spheres) and negative (blue crosses) point lists, tagged with
    the label's name and colour (R, G, B 0-255). ``color`` None: the colour of the label's standard terminology
    when the name is a known structure ("liver": the table's conventional colour), else the palette's colour of
    the next label value (``terminology.label_color``). Imports nothing Slicer does not ship (the panel adds
    labels before FMOneShot's packages are installed)."""
    name = (name or "").strip()
    if not name:
        raise FMOneShotError("The label has no name.", "type a name such as 'liver'.")
    if name in [p.name for p in label_prompts(scene)]:
        raise FMOneShotError(f"There is already a label {name!r}.", "choose another name, or use that label.")
    if color is None:
        color = new_label_color(scene, name)
    color = tuple(int(c) for c in color)
    nodes = []
    for role, suffix in (("positive", "+"), ("negative", "-")):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{name} {suffix}")
        node.SetAttribute(LABEL_ATTRIBUTE, name)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetAttribute(COLOR_ATTRIBUTE, ",".join(map(str, color)))
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        rgb = tuple(c / 255.0 for c in color) if role == "positive" else NEGATIVE_COLOR
        display.SetSelectedColor(*rgb)
        display.SetColor(*rgb)
        display.SetGlyphType(display.Sphere3D if role == "positive" else display.Cross2D)
        node.SetControlPointLabelFormat(f"{name}{suffix}%d")
        nodes.append(node)
    return tuple(nodes)


def new_label_color(scene, name: str) -> tuple:
    """The colour (R, G, B 0-255) :func:`add_label` gives a label ``name`` added now without a colour: its
    structure's conventional colour, else the palette's colour of the next label value
    (``terminology.label_color``)."""
    return label_color(len(label_prompts(scene)) + 1, for_name((name or "").strip()))


def remove_label(scene, name: str) -> None:
    for role in ("positive", "negative"):
        for node in _tagged(scene, role):
            if node.GetAttribute(LABEL_ATTRIBUTE) == name:
                _remove(scene, node)


def set_label_extent(scene, name: str, extent=None) -> None:
    """Stores label ``name``'s extent, ``(first, last)`` slice indices of the template volume in the template's
    plane (:attr:`template.Template.extent`), on both of its point lists (so it is saved with the scene);
    ``None`` clears it. FMOneShotError for an unknown label or ends that are not ``0 <= first <= last`` (the
    upper bound and the marked slice are checked by :meth:`template.Template.validate` when
    :func:`template_from_markups` makes the template). Imports nothing Slicer does
    not ship."""
    nodes = [node for role in ("positive", "negative") for node in _tagged(scene, role)
             if node.GetAttribute(LABEL_ATTRIBUTE) == name]
    if not nodes:
        raise FMOneShotError(f"There is no label {name!r}.", "add the label first, or choose one of: "
                             + (", ".join(p.name for p in label_prompts(scene)) or "(none)") + ".")
    value = None
    if extent is not None:
        first, last = (int(e) for e in extent)
        if not 0 <= first <= last:
            raise FMOneShotError(f"The extent of label {name!r} is slices {first} to {last}.",
                                 "give the first and last slice, 0 <= first <= last.")
        value = f"{first},{last}"
    for node in nodes:
        if value is None:
            node.RemoveAttribute(EXTENT_ATTRIBUTE)
        else:
            node.SetAttribute(EXTENT_ATTRIBUTE, value)


def _extent(node) -> tuple | None:
    text = node.GetAttribute(EXTENT_ATTRIBUTE)
    if not text:
        return None
    try:
        first, last = (int(e) for e in text.split(","))
    except ValueError:
        raise FMOneShotError(f"The point list {node.GetName()!r} has the unreadable extent {text!r}.",
                             "set the label's first and last slice again in the FMOneShot panel.") from None
    return first, last


def label_prompts(scene, painted=None) -> list:
    """The labels in the scene, in the order they were added, as :class:`LabelPrompt`; with a segmentation
    node ``painted``, the segment named like a label is that label's painted mask."""
    prompts = {}
    for role in ("positive", "negative"):
        for node in _tagged(scene, role):
            name = node.GetAttribute(LABEL_ATTRIBUTE)
            color = tuple(int(c) for c in (node.GetAttribute(COLOR_ATTRIBUTE) or "").split(",") if c) or None
            prompt = prompts.setdefault(name, LabelPrompt(name, color))
            setattr(prompt, role, node)
            prompt.extent = prompt.extent or _extent(node)
    out = sorted(prompts.values(), key=lambda p: scene.GetNodes().IsItemPresent(p.positive or p.negative))
    if painted is not None:
        segmentation = painted.GetSegmentation()
        for p in out:
            segment_id = segmentation.GetSegmentIdBySegmentName(p.name)
            if segment_id:
                p.segmentation, p.segment_id = painted, segment_id
    return out


def landmarks_node(scene, create: bool = False):
    """The template's landmark list ("FMOneShot landmarks"; control point labels name the landmarks)."""
    found = _tagged(scene, "landmarks")
    if found or not create:
        return found[0] if found else None
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "FMOneShot landmarks")
    node.SetAttribute(ROLE_ATTRIBUTE, "landmarks")
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetSelectedColor(1.0, 0.85, 0.1)
    node.GetDisplayNode().SetGlyphType(node.GetDisplayNode().Diamond2D)
    node.SetControlPointLabelFormat("L%d")
    return node


def template_from_scene(volume_node, painted=None, orientation: str | None = None,
                        settings: dict | None = None) -> Template:
    """The template marked in the scene: every label's points (and painted segment), and the landmarks."""
    scene = volume_node.GetScene() if volume_node is not None else None
    if scene is None:
        raise FMOneShotError("No template volume is selected.", "choose the volume you marked as the template.")
    return template_from_markups(volume_node, label_prompts(scene, painted), landmarks_node(scene), orientation,
                                 settings)


def preview_template(volume_node, template: Template, oneshot=None, name: str | None = None, **options):
    """The template masks FMOneShot will learn from, as a new segmentation node on the template volume: the
    painted masks, and for labels given by clicks alone the segmenter's mask from those clicks. Its segments
    are named like the labels, so after correcting them (Segment Editor) the node can be chosen as the
    painted masks of the next template (where two labels' masks overlap, the first label keeps the pixel).
    ``options`` go to :class:`pipeline.OneShot` (or pass a fitted one)."""
    from .pipeline import OneShot

    if not template.labels:
        raise FMOneShotError("The template has no labels to preview.", "add a label and place its points.")
    if volume_node is None:
        raise FMOneShotError("No template volume is selected.", "choose the volume you marked as the template.")
    scene = volume_node.GetScene()
    oneshot = oneshot or OneShot(template, **options)
    if oneshot.extractor is None:
        oneshot.fit()
    _check_still_in_scene(scene, [volume_node])
    volume = volume_from_node(volume_node)
    axis = volume.slice_axis(template.orientation)
    plane = volume.resliced(axis)
    labels = np.zeros(plane.array.shape, np.uint16)
    for s, masks in zip(template.slices, oneshot.template_masks):
        if s.image.shape != plane.slice_shape or not 0 <= s.index < plane.n_slices:
            raise FMOneShotError(f"The template's slice {s.index} does not belong to {volume_node.GetName()!r}.",
                                 "preview on the volume the template was marked on.")
        for lb, m in zip(template.labels, masks):
            labels[s.index][m & (labels[s.index] == 0)] = lb.value
    return segmentation_from_labels(scene, volume.like(Volume.unslice(labels, axis)), template.labels, volume_node,
                                    scene.GenerateUniqueName(name or f"{volume_node.GetName()} FMOneShot template"))
