"""The MRML bridge with the real MRML scene (slicer-core): geometry survives the RAS/LPS crossing."""

from pathlib import Path

import numpy as np
import pytest

from FMOneShotLib import terminology
from FMOneShotLib.errors import FMOneShotError
from FMOneShotLib.image import Volume, read_volume, write_volume
from FMOneShotLib.template import Label

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra")
from FMOneShotLib import mrml  # noqa: E402


def textured(shape):
    """A volume's pixels with contrast everywhere (a blank template slice is refused)."""
    return np.random.default_rng(0).integers(-100, 100, shape).astype(np.int16)


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


def test_the_modality_of_a_volume_loaded_from_dicom_is_read_where_slicer_keeps_it():
    """Slicer's DICOM plugins put the series' Modality on the volume's subject hierarchy item
    (DICOMPlugin.addSeriesInSubjectHierarchy), not on the node: a CT without air (no value below -500) is CT
    from there, as the command line reads it from the files; without the item, the values decide."""
    soft_tissue = Volume(np.full((4, 6, 6), 40, np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    scene = slicer.vtkMRMLScene()
    node = mrml.node_from_volume(scene, soft_tissue)
    assert mrml.volume_from_node(node).modality is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLSubjectHierarchyNode") == 0  # looked up, never created
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    hierarchy.SetItemAttribute(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName(),
                               "CT")
    assert mrml.volume_from_node(node).modality == "CT"
    other = mrml.node_from_volume(scene, soft_tissue)
    other.SetAttribute(mrml.DICOM_MODALITY_ATTRIBUTE, "mr")  # a node attribute (set by some scripts)
    assert mrml.volume_from_node(other).modality == "MR"


def test_volume_from_node_refuses_what_is_not_a_scalar_volume():
    scene = slicer.vtkMRMLScene()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(FMOneShotError, match="not a scalar volume"):
        mrml.volume_from_node(seg)
    with pytest.raises(FMOneShotError, match="holds no image data"):
        mrml.volume_from_node(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))


# ---------------------------------------------------------------------------------------------------- helpers
def scene_with(volume):
    scene = slicer.vtkMRMLScene()
    return scene, mrml.node_from_volume(scene, volume)


def points_node(scene, volume, name, indices, labels=None):
    """A markups point list with control points at the RAS of the given (x, y, z) voxel indices."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for k, ijk in enumerate(indices):
        ras = mrml.index_to_ras(volume, ijk)
        node.AddControlPoint(*ras.tolist(), labels[k] if labels else f"{name}-{k + 1}")
    return node


def node_names(scene):
    return sorted((scene.GetNthNode(i).GetClassName(), scene.GetNthNode(i).GetName())
                  for i in range(scene.GetNumberOfNodes()))


def test_points_on_an_axial_slice_become_its_pixels():
    vol = Volume(textured((12, 20, 16)), (0.7, 0.9, 3.0), (10.0, -20.0, 35.5), oblique(), name="ct")
    scene, node = scene_with(vol)
    pos = points_node(scene, vol, "liver +", [(3, 4, 5), (7.2, 8.4, 5.3)])
    neg = points_node(scene, vol, "liver -", [(12, 15, 5)])
    marks = points_node(scene, vol, "landmarks", [(1, 2, 5)], ["apex"])
    tpl = mrml.template_from_markups(node, [mrml.LabelPrompt("liver", (200, 10, 10), pos, neg)], marks)
    s = tpl.slices[0]
    assert tpl.orientation == "axial" and s.index == 5 and s.image.shape == (20, 16)
    assert np.allclose(s.positive["liver"], [[3, 4], [7.2, 8.4]], atol=1e-6)
    assert np.allclose(s.negative["liver"], [[12, 15]], atol=1e-6)
    assert np.allclose(s.landmarks["apex"], [1, 2], atol=1e-6)
    assert tpl.labels[0].color == (200, 10, 10) and tpl.labels[0].value == 1


def test_points_on_a_sagittal_slice_become_its_pixels():
    rng = np.random.default_rng(1)
    vol = Volume(rng.integers(0, 100, (12, 20, 16)).astype(np.int16), (0.7, 0.9, 3.0), (0, 0, 0), oblique(),
                 name="ct")
    scene, node = scene_with(vol)
    # all on the plane x = 6: a sagittal slice of this volume; its pixels are (column y, row z)
    pos = points_node(scene, vol, "p", [(6, 4, 2), (6, 10, 7)])
    tpl = mrml.template_from_markups(node, [mrml.LabelPrompt("kidney", None, pos)])
    s = tpl.slices[0]
    assert tpl.orientation == "sagittal" and s.index == 6 and s.image.shape == (12, 20)
    assert np.allclose(s.positive["kidney"], [[4, 2], [10, 7]], atol=1e-6)
    assert np.array_equal(s.image, vol.array[:, :, 6])
    assert s.pixel_spacing == (0.9, 3.0)
    # an explicit orientation that the points do not share is refused with the slices named
    with pytest.raises(FMOneShotError, match=r"different slices \(axial slices: positive 'p-1' of 'kidney': slice 2"):
        mrml.template_from_markups(node, [mrml.LabelPrompt("kidney", None, pos)], orientation="axial")


def test_bad_marks_are_refused_before_anything_runs():
    vol = Volume(textured((6, 10, 10)), (1.0, 1.0, 2.0), name="ct")
    scene, node = scene_with(vol)
    stray = points_node(scene, vol, "stray", [(2, 2, 1), (5, 5, 3)])  # differ in x, y and z
    with pytest.raises(FMOneShotError, match="different slices"):
        mrml.template_from_markups(node, [mrml.LabelPrompt("liver", None, stray)])
    outside = points_node(scene, vol, "out", [(2, 2, 1), (2, 12, 1)])
    with pytest.raises(FMOneShotError, match="positive point 'out-2' of label 'liver' lies outside the volume 'ct'"):
        mrml.template_from_markups(node, [mrml.LabelPrompt("liver", None, outside)])
    pos = points_node(scene, vol, "pos", [(2, 2, 1)])
    neg_only = points_node(scene, vol, "neg", [(4, 4, 1)])
    with pytest.raises(FMOneShotError, match="Label 'spleen' has no positive point"):
        mrml.template_from_markups(node, [mrml.LabelPrompt("liver", None, pos),
                                          mrml.LabelPrompt("spleen", None, None, neg_only)])
    with pytest.raises(FMOneShotError, match="Nothing is marked"):
        mrml.template_from_markups(node, [mrml.LabelPrompt("liver")])
    with pytest.raises(FMOneShotError, match="Label names repeat"):
        mrml.template_from_markups(node, [mrml.LabelPrompt("liver", None, pos), mrml.LabelPrompt("liver", None, pos)])


def test_a_painted_segment_is_the_template_mask():
    vol = Volume(textured((6, 10, 12)), (1.0, 1.0, 2.0), (5.0, 5.0, 5.0), name="ct")
    scene, node = scene_with(vol)
    painted = np.zeros(vol.array.shape, np.uint8)
    painted[4, 2:6, 3:9] = 1  # largest on slice 4
    painted[3, 3:4, 3:4] = 1
    seg = mrml.segmentation_from_labels(scene, vol.like(painted), [Label("liver", 1)], node, "painted")
    before = node_names(scene)
    tpl = mrml.template_from_markups(node, [mrml.LabelPrompt("liver", None, None, None, seg, "liver")])
    assert node_names(scene) == before  # the temporary labelmap is gone
    s = tpl.slices[0]
    assert s.index == 4 and np.array_equal(s.masks["liver"], painted[4] > 0)
    with pytest.raises(FMOneShotError, match="has no segment 'spleen'"):
        mrml.template_from_markups(node, [mrml.LabelPrompt("liver", None, None, None, seg, "spleen")])
    pos = points_node(scene, vol, "pos", [(4, 4, 1)])  # points on slice 1, where nothing is painted
    with pytest.raises(FMOneShotError, match="painted segment of label 'liver' is empty on the template slice"):
        mrml.template_from_markups(node, [mrml.LabelPrompt("liver", None, pos, None, seg, "liver")])


# ---------------------------------------------------------------------------------------------------- results
LABELS = [Label("liver", 1, (221, 130, 101)), Label("spleen", 2, (157, 108, 162)), Label("kidney", 5, (10, 20, 30))]


def test_segmentation_node_equals_the_label_volume_voxel_for_voxel():
    rng = np.random.default_rng(2)
    vol = Volume(np.zeros((5, 7, 9), np.int16), (0.7, 0.9, 3.0), (10.0, -20.0, 35.5), oblique(), name="ct")
    scene, node = scene_with(vol)
    labels = rng.choice([0, 1, 2], size=vol.array.shape, p=[0.6, 0.3, 0.1]).astype(np.uint16)  # no kidney
    seg = mrml.segmentation_from_labels(scene, vol.like(labels), LABELS, node, "ct segmentation")
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(3)] == ["liver", "spleen", "kidney"]
    assert segmentation.GetSegment("kidney").GetName() == "kidney"
    assert np.allclose(segmentation.GetSegment("spleen").GetColor(), np.array((157, 108, 162)) / 255)
    back = mrml.labels_from_segmentation(seg, LABELS, node)
    assert np.array_equal(back.array, labels)
    assert np.allclose(back.origin, vol.origin) and np.allclose(back.direction, vol.direction)


def test_fiducials_land_within_half_a_voxel_of_the_landmarks():
    from FMOneShotLib.pipeline import Landmark, Result

    vol = Volume(np.zeros((5, 7, 9), np.int16), (0.7, 0.9, 3.0), (10.0, -20.0, 35.5), oblique(), name="ct")
    scene = slicer.vtkMRMLScene()
    per = {"apex": [Landmark("apex", z, (2.25 + z, 3.5), tuple(vol.index_to_physical([2.25 + z, 3.5, z])), c)
                    for z, c in [(1, 0.2), (3, 0.9), (4, 0.5)]]}
    result = Result(vol.like(np.zeros(vol.array.shape, np.uint16)), [], np.zeros((5, 0)), np.zeros((5, 0), bool),
                    landmarks=per)
    node = mrml.fiducials_from_landmarks(scene, result, "ct landmarks")
    assert node.GetNumberOfControlPoints() == 1 and node.GetNthControlPointLabel(0) == "apex"
    ras = np.zeros(3)
    node.GetNthControlPointPositionWorld(0, ras)
    ijk = mrml.ras_to_index(vol, ras)
    assert np.all(np.abs(ijk - [5.25, 3.5, 3]) <= 0.5) and np.allclose(ijk, [5.25, 3.5, 3], atol=1e-6)
    every = mrml.fiducials_from_landmarks(scene, result, "ct landmarks per slice", per_slice=True)
    assert [every.GetNthControlPointLabel(i) for i in range(3)] == ["apex@1", "apex@3", "apex@4"]


def test_export_reads_back_with_simpleitk(tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    vol = Volume(np.zeros((5, 7, 9), np.int16), (0.7, 0.9, 3.0), (10.0, -20.0, 35.5), oblique(), name="CT 1/a")
    scene, node = scene_with(vol)
    labels = rng.choice([0, 1, 2, 5], size=vol.array.shape).astype(np.uint16)
    seg = mrml.segmentation_from_labels(scene, vol.like(labels), LABELS, node, "seg")
    for fmt in (".nrrd", ".nii.gz"):
        (path,) = mrml.export_segmentations([seg], tmp_path, fmt, labels=LABELS)
        assert path.name == f"CT 1_a-labels{fmt}"
        back = read_volume(path)
        assert np.array_equal(back.array, labels), fmt
        assert np.allclose(back.spacing, vol.spacing) and np.allclose(back.origin, vol.origin, atol=1e-4)
        assert np.allclose(back.direction, vol.direction, atol=1e-6)
    # without the template's labels, the values kept on the segments are used
    again = tmp_path / "again"
    again.mkdir()
    (path,) = mrml.export_segmentations([seg], again)
    assert np.array_equal(read_volume(path).array, labels)
    (path,) = mrml.export_segmentations([seg], tmp_path, ".seg.nrrd")
    img = sitk.ReadImage(str(path))
    names = {img.GetMetaData(f"Segment{i}_Name"): int(img.GetMetaData(f"Segment{i}_LabelValue")) for i in range(3)}
    assert set(names) == {"liver", "spleen", "kidney"}
    seg_back = read_volume(path)  # one layer: each segment has its value in it
    for lb in LABELS:
        assert np.array_equal(seg_back.array == names[lb.name], labels == lb.value), lb.name
    assert np.allclose(seg_back.origin, vol.origin, atol=1e-4) and np.allclose(seg_back.direction, vol.direction)
    # never over an existing file without asking
    before = path.stat().st_mtime_ns
    with pytest.raises(FMOneShotError, match="already exists; nothing was written"):
        mrml.export_segmentations([seg], tmp_path, ".seg.nrrd")
    assert path.stat().st_mtime_ns == before
    mrml.export_segmentations([seg], tmp_path, ".seg.nrrd", overwrite=True)
    with pytest.raises(FMOneShotError, match="Unknown export format"):
        mrml.export_segmentations([seg], tmp_path, ".png")
    # the file the volume was loaded from is never written over, even when overwriting is confirmed
    source = tmp_path / "CT 1_a-labels.nrrd"
    before = source.read_bytes()
    node.AddDefaultStorageNode()
    node.GetStorageNode().SetFileName(str(source))
    with pytest.raises(FMOneShotError, match="is the input"):
        mrml.export_segmentations([seg], tmp_path, ".nrrd", overwrite=True, labels=LABELS)
    assert source.read_bytes() == before


class SceneCheckedLogic:
    """The Segmentations logic's static methods, each call recording the MRML nodes it was given that are not
    in ``scene``: Slicer 5.6 and 5.8 crash on such a node (a colour table outside the scene is dereferenced
    as a null colour node), while slicer-core 5.13, fixed upstream, passes."""

    def __init__(self, scene):
        self.scene, self.calls = scene, []

    def __getattr__(self, name):
        method = getattr(slicer.vtkSlicerSegmentationsModuleLogic, name)

        def call(*args):
            nodes = [a for a in args if isinstance(a, slicer.vtkMRMLNode)]
            self.calls.append((name, [n.GetClassName() for n in nodes if n.GetScene() is not self.scene]))
            return method(*args)

        return call


def test_every_node_given_to_a_segmentations_import_or_export_is_in_the_scene(tmp_path, monkeypatch):
    """Every way FMOneShot reaches the Segmentations logic (results, painted masks, labelmap export) gives it
    only nodes in the scene, and the scene is left as it was (the temporary nodes are removed)."""
    vol = Volume(textured((5, 7, 9)), (0.7, 0.9, 3.0), (10.0, -20.0, 35.5), oblique(), name="ct")
    scene, node = scene_with(vol)
    checked = SceneCheckedLogic(scene)
    monkeypatch.setattr(mrml, "_segmentations_logic", lambda: checked)
    labels = np.zeros(vol.array.shape, np.uint16)
    labels[2, 1:5, 2:7], labels[3, 2:4, 3:5] = 1, 2
    seg = mrml.segmentation_from_labels(scene, vol.like(labels), LABELS, node, "ct segmentation")
    before = node_names(scene)
    mrml.template_from_markups(node, [mrml.LabelPrompt("liver", None, None, None, seg, "liver")])  # painted
    assert np.array_equal(mrml.labels_from_segmentation(seg, LABELS, node).array, labels)
    for fmt in (".nrrd", ".nii.gz"):
        (path,) = mrml.export_segmentations([seg], tmp_path, fmt, labels=LABELS)
        assert np.array_equal(read_volume(path).array, labels)
    assert node_names(scene) == before
    used = {name for name, _ in checked.calls}
    assert used == {"ImportLabelmapToSegmentationNode", "ExportSegmentsToLabelmapNode"}, used
    outside = [(name, classes) for name, classes in checked.calls if classes]
    assert not outside, f"nodes outside the scene given to the Segmentations logic: {outside}"


def test_the_segmentations_logic_is_reached_through_one_checked_place():
    """No other code of the library or the module names the Segmentations logic, so the check above covers
    every call, and none creates a logic object (each one registers the converter rules again)."""
    root = Path(__file__).resolve().parents[2]
    files = [*sorted((root / "FMOneShotLib").rglob("*.py")), root / "FMOneShot" / "FMOneShot.py"]
    naming = [f"{p.relative_to(root)}:{i}" for p in files
              for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
              if "vtkSlicerSegmentationsModuleLogic" in line and not line.lstrip().startswith("#")]
    assert naming == [f"FMOneShotLib/mrml.py:{_line_of('return slicer.vtkSlicerSegmentationsModuleLogic')}"], naming


def _line_of(text: str) -> int:
    lines = (Path(mrml.__file__)).read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


# ---------------------------------------------------------------------------------------------------- batch
LIVER, SPLEEN = 5, 1  # values in the bundled CT's reference (Testing/Data/totalseg-ct-small/dataset.json)


def sample_scene(sample, n_volumes=1):
    """The bundled CT loaded n times into a scene (as a user would load several cases), with its reference."""
    from FMOneShotLib.datasets import load_dataset

    case = load_dataset(sample).cases[0]
    volume, reference = case.read_image(), case.read_mask()
    scene = slicer.vtkMRMLScene()
    nodes = [mrml.node_from_volume(scene, volume, name=f"case{k}") for k in range(n_volumes)]
    return scene, nodes, volume, reference


def clicks(scene, volume, reference, z, value, name, seed=0):
    """Positive and negative markups on slice z, drawn from the reference mask as a radiologist would click."""
    from FMOneShotLib.template import sample_prompts

    pos, neg = sample_prompts(reference[z] == value, 5, 5, seed)
    return (points_node(scene, volume, f"{name} +", [(x, y, z) for x, y in pos]),
            points_node(scene, volume, f"{name} -", [(x, y, z) for x, y in neg]))


def test_marks_in_the_scene_segment_every_slice(sample):
    """Clicks plus a mask painted on the template slice (as with the Segment Editor), applied in the scene:
    the segmentation node holds the library's labels, and they match the reference like the demo does."""
    from FMOneShotLib.demo import choose_template_slice
    from FMOneShotLib.metrics import dice

    scene, (node,), volume, reference = sample_scene(sample)
    z = choose_template_slice(reference, [LIVER, SPLEEN])
    one_slice = np.zeros_like(reference)
    one_slice[z] = np.where(np.isin(reference[z], [LIVER, SPLEEN]), reference[z], 0)
    painted = mrml.segmentation_from_labels(scene, volume.like(one_slice),
                                            [Label("liver", LIVER), Label("spleen", SPLEEN)], node, "painted")
    prompts = [mrml.LabelPrompt(n, None, *clicks(scene, volume, reference, z, v, n), painted, n)
               for n, v in (("liver", LIVER), ("spleen", SPLEEN))]
    tpl = mrml.template_from_markups(node, prompts)
    assert tpl.orientation == "axial" and tpl.slices[0].index == z
    (out,) = mrml.apply_to_nodes(tpl, [node])
    labels = mrml.labels_from_segmentation(out.segmentation, tpl.labels, node)
    assert np.array_equal(labels.array, out.result.labels.array)
    for i, (name, v) in enumerate((("liver", LIVER), ("spleen", SPLEEN))):
        on = [k for k in range(volume.n_slices) if (reference[k] == v).any()]
        d = np.mean([dice(labels.array[k] == i + 1, reference[k] == v) for k in on])
        assert d >= 0.8, (name, d)  # the demo's figures: 0.842 and 0.846
    table = out.confidence.GetTable()
    assert table.GetNumberOfRows() == volume.n_slices and table.GetColumnName(1) == "liver found"


def test_clicks_alone_in_the_scene(sample):
    """The panel's plainest use: five positive and five negative clicks per organ, nothing painted. The
    template masks come from the segmenter on the template slice, each organ's clicks being negatives of
    the other (docs/slicer.md: liver 0.65-0.80, spleen 0.74-0.79 over click draws; this draw 0.676, 0.766)."""
    from FMOneShotLib.demo import choose_template_slice
    from FMOneShotLib.metrics import dice

    scene, (node,), volume, reference = sample_scene(sample)
    z = choose_template_slice(reference, [LIVER, SPLEEN])
    for name, value in (("liver", LIVER), ("spleen", SPLEEN)):
        positive, negative = mrml.add_label(scene, name)
        pos, neg = clicks(scene, volume, reference, z, value, name)
        for src, dst in ((pos, positive), (neg, negative)):
            for i in range(src.GetNumberOfControlPoints()):
                dst.AddControlPoint(src.GetNthControlPointPosition(i))
    tpl = mrml.template_from_scene(node)
    assert not tpl.has_masks and tpl.slices[0].index == z
    (out,) = mrml.apply_to_nodes(tpl, [node])
    labels = mrml.labels_from_segmentation(out.segmentation, tpl.labels, node).array
    for i, (name, value, floor) in enumerate((("liver", LIVER, 0.62), ("spleen", SPLEEN, 0.72))):
        on = [k for k in range(volume.n_slices) if (reference[k] == value).any()]
        d = np.mean([dice(labels[k] == i + 1, reference[k] == value) for k in on])
        assert d >= floor, (name, d)


def test_batch_gives_one_node_per_volume_with_the_same_segments(sample):
    scene, nodes, volume, reference = sample_scene(sample, 3)
    z = 15
    pos, neg = clicks(scene, volume, reference, z, LIVER, "liver")
    marks = points_node(scene, volume, "marks", [(100, 60, z)], ["tip"])
    tpl = mrml.template_from_markups(nodes[0], [mrml.LabelPrompt("liver", (1, 2, 3), pos, neg),
                                                mrml.LabelPrompt("spleen", None, *clicks(scene, volume, reference,
                                                                                         z, SPLEEN, "spleen"))],
                                   marks)
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    nodes[1].SetAndObserveTransformNodeID(moved.GetID())  # a target registered to another
    seen = []
    out = mrml.apply_to_nodes(tpl, nodes, progress=lambda *a: seen.append(a))
    assert [o.segmentation.GetName() for o in out] == ["case0 segmentation", "case1 segmentation",
                                                        "case2 segmentation"]
    for o in out:
        segmentation = o.segmentation.GetSegmentation()
        assert [segmentation.GetNthSegment(i).GetName() for i in range(2)] == ["liver", "spleen"]
        assert np.allclose(segmentation.GetSegment("liver").GetColor(), np.array((1, 2, 3)) / 255)
        assert o.landmarks.GetNumberOfControlPoints() == 1 and o.landmarks.GetNthControlPointLabel(0) == "tip"
    assert mrml.result_segmentations(scene) == [o.segmentation for o in out]  # what Export writes
    assert out[1].segmentation.GetTransformNodeID() == moved.GetID()  # results follow their volume's transform
    assert out[1].landmarks.GetTransformNodeID() == moved.GetID()
    assert out[0].segmentation.GetTransformNodeID() is None
    assert out[0].summary() == (f"case0: liver on {int(out[0].result.present[:, 0].sum())} slices, "
                                f"spleen on {int(out[0].result.present[:, 1].sum())} slices, 1 landmark(s)")
    # the same volume three times: the same answer three times
    assert all(np.array_equal(o.result.labels.array, out[0].result.labels.array) for o in out)
    assert seen[0] == (0, 3, 1, volume.n_slices, "case0") and seen[-1] == (2, 3, volume.n_slices, volume.n_slices,
                                                                             "case2")


def test_a_cancelled_run_leaves_the_scene_as_it_was(sample):
    from FMOneShotLib.pipeline import Cancelled

    scene, nodes, volume, reference = sample_scene(sample, 2)
    tpl = mrml.template_from_markups(nodes[0], [mrml.LabelPrompt("liver", None,
                                                                 *clicks(scene, volume, reference, 15, LIVER,
                                                                                        "liver"))])
    before = node_names(scene)
    calls = []

    def cancel():  # the user presses Cancel while the second volume is being processed
        calls.append(1)
        return len(calls) > volume.n_slices + 3

    with pytest.raises(Cancelled):
        mrml.apply_to_nodes(tpl, nodes, cancel=cancel)
    assert len(calls) == volume.n_slices + 4  # stopped within one slice of the request
    assert node_names(scene) == before


def test_a_volume_removed_while_the_run_works_stops_it_with_nothing_added(sample):
    """The panel processes events while it works, so a target volume can be removed (or the scene closed)
    meanwhile: the run stops with an error naming it, and adds nothing, instead of failing on a node with no
    scene after every volume was computed."""
    from FMOneShotLib.errors import FMOneShotError

    scene, nodes, volume, reference = sample_scene(sample, 2)
    tpl = mrml.template_from_markups(nodes[0], [mrml.LabelPrompt("liver", None,
                                                                 *clicks(scene, volume, reference, 15, LIVER,
                                                                         "liver"))])

    def progress(v, n, done, total, name):  # the user deletes case1 while case0 is being processed
        if nodes[1].GetScene() is not None:
            scene.RemoveNode(nodes[1])

    before = [item for item in node_names(scene) if item[1] != "case1"]
    with pytest.raises(FMOneShotError, match="'case1' left the scene"):
        mrml.apply_to_nodes(tpl, nodes, progress=progress)
    assert node_names(scene) == before
    # Preview: the template volume removed while the fit ran, or none selected any more
    from FMOneShotLib.pipeline import OneShot

    engine = OneShot(tpl).fit()
    scene.RemoveNode(nodes[0])
    before = node_names(scene)
    with pytest.raises(FMOneShotError, match="'case0' left the scene"):
        mrml.preview_template(nodes[0], tpl, engine)
    with pytest.raises(FMOneShotError, match="No template volume is selected"):
        mrml.preview_template(None, tpl, engine)
    assert node_names(scene) == before


def test_each_volume_can_be_computed_in_a_worker_thread_with_every_node_touched_in_the_calling_one(sample,
                                                                                                   monkeypatch):
    """The panel runs each volume's computation (alignment, slices) in a worker thread (``run``) so that Slicer
    stays responsive: the volumes are converted in the calling thread, only the library's apply and the
    progress run in the worker, and the results are those of a direct run."""
    import threading

    from FMOneShotLib.pipeline import OneShot

    scene, nodes, volume, reference = sample_scene(sample, 2)
    tpl = mrml.template_from_markups(nodes[0], [mrml.LabelPrompt("liver", None,
                                                                 *clicks(scene, volume, reference, 15, LIVER,
                                                                         "liver"))])
    engine = OneShot(tpl).fit()
    direct = mrml.apply_to_nodes(tpl, nodes, oneshot=engine)
    seen = {"convert": [], "apply": [], "progress": [], "cancel": []}  # the thread of each call
    convert, apply = mrml.volume_from_node, engine.apply

    def record(kind, call):
        def wrapped(*args, **kwargs):
            seen[kind].append(threading.get_ident())
            return call(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(mrml, "volume_from_node", record("convert", convert))
    monkeypatch.setattr(engine, "apply", record("apply", apply))

    def run(work):  # as the panel's runWhileResponsive, without Qt
        out = {}
        worker = threading.Thread(target=lambda: out.update(value=work()))
        worker.start()
        worker.join()
        return out["value"]

    threaded = mrml.apply_to_nodes(tpl, nodes, oneshot=engine, run=run,
                                   progress=record("progress", lambda *step: None),
                                   cancel=record("cancel", lambda: False))
    main = threading.get_ident()
    assert set(seen["convert"]) == {main} and len(seen["convert"]) == 2
    assert len(seen["apply"]) == 2 and seen["progress"] and seen["cancel"]
    assert seen["cancel"][0] == main  # asked once before the first volume, then per slice in the worker
    assert main not in seen["apply"] + seen["progress"] + seen["cancel"][1:]
    for a, b in zip(direct, threaded):
        assert b.segmentation.GetScene() is scene and b.volume is a.volume
        assert np.mean(a.result.labels.array == b.result.labels.array) > 0.999


def test_labels_live_in_the_scene_as_tagged_point_lists():
    vol = Volume(textured((6, 10, 12)), (1.0, 1.0, 2.0), name="ct")
    scene, node = scene_with(vol)
    pos, neg = mrml.add_label(scene, "liver", (200, 10, 10))
    mrml.add_label(scene, "spleen")
    with pytest.raises(FMOneShotError, match="already a label 'liver'"):
        mrml.add_label(scene, "liver")
    with pytest.raises(FMOneShotError, match="no name"):
        mrml.add_label(scene, "  ")
    assert pos.GetName() == "liver +" and neg.GetName() == "liver -"
    # positive and negative points look different: label-coloured spheres against blue crosses
    assert pos.GetDisplayNode().GetGlyphType() != neg.GetDisplayNode().GetGlyphType()
    assert np.allclose(pos.GetDisplayNode().GetSelectedColor(), np.array((200, 10, 10)) / 255)
    assert np.allclose(neg.GetDisplayNode().GetSelectedColor(), mrml.NEGATIVE_COLOR)
    for ijk in [(3, 4, 2), (5, 5, 2)]:
        pos.AddControlPoint(*mrml.index_to_ras(vol, ijk).tolist())
    neg.AddControlPoint(*mrml.index_to_ras(vol, (9, 8, 2)).tolist())
    spleen_pos = mrml.label_prompts(scene)[1].positive
    spleen_pos.AddControlPoint(*mrml.index_to_ras(vol, (1, 1, 2)).tolist())
    marks = mrml.landmarks_node(scene, create=True)
    marks.AddControlPoint(*mrml.index_to_ras(vol, (7, 7, 2)).tolist(), "tip")
    assert mrml.landmarks_node(scene) is marks
    spleen = np.zeros(vol.array.shape, np.uint8)
    spleen[2, 3:6, 3:6] = 1
    painted = mrml.segmentation_from_labels(scene, vol.like(spleen), [Label("spleen", 1)], node, "painted")
    tpl = mrml.template_from_scene(node, painted)
    assert [(lb.name, lb.value, lb.color) for lb in tpl.labels][0] == ("liver", 1, (200, 10, 10))
    # a label added without a colour gets its structure's conventional colour (the terminology table's spleen
    # colour, not the palette's), shown on its points and kept in the template; an unknown name the palette's
    spleen_color = terminology.for_name("spleen").color
    assert spleen_color is not None and spleen_color != terminology.default_color(2)
    assert tpl.labels[1].color == spleen_color == mrml.label_prompts(scene)[1].color
    assert np.allclose(spleen_pos.GetDisplayNode().GetSelectedColor(), np.array(spleen_color) / 255)
    mrml.add_label(scene, "my structure")
    assert mrml.label_prompts(scene)[2].color == terminology.default_color(3) == terminology.PALETTE[2]
    assert tpl.label_names == ["liver", "spleen"] and tpl.slices[0].index == 2
    assert np.allclose(tpl.slices[0].positive["liver"], [[3, 4], [5, 5]]) and "spleen" in tpl.slices[0].masks
    assert np.allclose(tpl.slices[0].landmarks["tip"], [7, 7])
    mrml.remove_label(scene, "liver")
    assert [p.name for p in mrml.label_prompts(scene)] == ["spleen", "my structure"]


def test_a_labels_extent_lives_on_its_point_lists_and_reaches_the_template(tmp_path):
    """issue 15: the panel's first / last slice of a label is stored on the label's point lists, is saved and
    read back with the scene, and becomes Template.extent (slice indices of the template's plane)."""
    vol = Volume(textured((6, 10, 12)), (1.0, 1.0, 2.0), name="ct")
    scene, node = scene_with(vol)
    pos, neg = mrml.add_label(scene, "liver", (200, 10, 10))
    mrml.add_label(scene, "spleen")
    pos.AddControlPoint(*mrml.index_to_ras(vol, (3, 4, 2)).tolist())
    mrml.label_prompts(scene)[1].positive.AddControlPoint(*mrml.index_to_ras(vol, (8, 6, 2)).tolist())
    assert mrml.template_from_scene(node).extent == {}  # no extent set: the whole target is searched
    mrml.set_label_extent(scene, "liver", (1, 4))
    assert pos.GetAttribute(mrml.EXTENT_ATTRIBUTE) == neg.GetAttribute(mrml.EXTENT_ATTRIBUTE) == "1,4"
    # saved with the scene and read back
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "scene.mrml"))
    assert loaded.Connect()
    assert [(p.name, p.extent) for p in mrml.label_prompts(loaded)] == [("liver", (1, 4)), ("spleen", None)]
    tpl = mrml.template_from_scene(node)
    assert tpl.extent == {"liver": (1, 4)}
    # bad extents are refused before anything runs, naming the fix; the stored extent is left as it was
    with pytest.raises(FMOneShotError, match=r"slices 4 to 1.*first <= last"):
        mrml.set_label_extent(scene, "liver", (4, 1))
    with pytest.raises(FMOneShotError, match="There is no label 'kidney'"):
        mrml.set_label_extent(scene, "kidney", (0, 1))
    assert pos.GetAttribute(mrml.EXTENT_ATTRIBUTE) == "1,4"
    mrml.set_label_extent(scene, "spleen", (2, 6))  # the volume has axial slices 0 to 5
    with pytest.raises(FMOneShotError, match=r"'spleen' is slices 2 to 6.*axial slices 0 to 5"):
        mrml.template_from_scene(node)
    mrml.set_label_extent(scene, "spleen", (0, 5))
    assert mrml.template_from_scene(node).extent == {"liver": (1, 4), "spleen": (0, 5)}
    mrml.set_label_extent(scene, "liver", None)  # cleared
    assert pos.GetAttribute(mrml.EXTENT_ATTRIBUTE) is None
    assert mrml.template_from_scene(node).extent == {"spleen": (0, 5)}


def test_apply_to_all_skips_what_is_not_a_grey_value_volume_and_says_why():
    """RGB, DWI, tensor and label volumes are all vtkMRMLScalarVolumeNode subclasses: they are skipped and
    named instead of stopping the batch."""
    vol = Volume(np.zeros((3, 4, 5), np.int16), name="ct")
    scene, ct = scene_with(vol)
    mr = mrml.node_from_volume(scene, vol, name="mr")
    for cls, name in (("vtkMRMLVectorVolumeNode", "photo"), ("vtkMRMLDiffusionWeightedVolumeNode", "dwi"),
                      ("vtkMRMLDiffusionTensorVolumeNode", "dti"), ("vtkMRMLLabelMapVolumeNode", "labels")):
        scene.AddNewNodeByClass(cls, name)
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    targets, skipped = mrml.volume_targets(scene)
    assert [n.GetName() for n in targets] == ["ct", "mr"]
    assert dict(skipped) == {"photo": "a vector (RGB) volume", "dwi": "a DWI volume",
                             "dti": "a diffusion/tensor volume", "labels": "a labelmap",
                             "empty": "The volume 'empty' holds no image data."}


def test_too_old_packages_are_unmet(monkeypatch):
    """An old torch or timm left by another extension is not accepted: installed but older than required."""
    import importlib.metadata

    from FMOneShotLib import requirements

    real = importlib.metadata.version
    old = {"torch": "2.0.1", "timm": "0.9.16"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: old.get(name) or real(name))
    assert requirements.unmet() == [("torch>=2.1", "2.0.1"), ("timm>=1.0", "0.9.16")]
    assert requirements.missing() == ["torch>=2.1", "timm>=1.0"]
    old["torch"] = "2.5.1+cu121"  # local builds (the PyTorch extension's CUDA wheels) compare by release
    assert requirements.missing() == ["timm>=1.0"]


def test_the_runtime_requirements_are_pyprojects():
    import tomllib

    from FMOneShotLib import requirements

    doc = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    assert list(requirements.REQUIREMENTS) == doc["project"]["dependencies"]
    assert requirements.missing() == []  # this environment has them all
    assert requirements.package("segment-anything>=1.0") == "segment-anything"
    extras = doc["project"]["optional-dependencies"]
    assert {name: list(reqs) for name, reqs in requirements.EXTRAS.items()} == {n: extras[n] for n in ("sam2", "sd")}


def test_sam2_is_installed_with_one_command_wherever_it_is_given(monkeypatch):
    """The sam2 package is an sdist that pip builds against a second PyTorch unless told otherwise: README,
    docs/models.md, pyproject.toml's comment on the extra, .ci/run and the error for a missing package all give
    requirements.pip_command's command, and none gives the plain install of the extra."""
    import sys

    from FMOneShotLib import models, requirements

    command = requirements.pip_command("sam2")
    assert command == "SAM2_BUILD_CUDA=0 pip install --no-build-isolation 'sam2>=1.0'"
    repo = Path(__file__).resolve().parents[2]
    for doc in ("README.md", "docs/models.md", "pyproject.toml"):
        text = (repo / doc).read_text(encoding="utf-8")
        assert command in text and "pip install 'fmoneshot[sam2]'" not in text, doc
    ci = (repo / ".ci" / "run").read_text(encoding="utf-8")
    assert command.replace("pip install", "python3 -m pip install -q") in ci
    monkeypatch.setitem(sys.modules, "sam2", None)  # 'import sam2' raises ImportError, as where it is missing
    with pytest.raises(FMOneShotError, match="SAM 2 needs the 'sam2' package") as err:
        models.require_sam2()
    assert err.value.fix.startswith(command + " (Python >= 3.10")


def test_a_choice_that_needs_an_optional_package_is_refused_before_any_work_with_slicers_command(monkeypatch):
    """The panel lists the sd backend and the sam2 segmenter, whose packages are pyproject extras it does not
    install: the choice is refused before the models load, with the command for Slicer's Python console; sam2
    on Slicer 5.8's Python 3.9 (the sam2 package needs 3.10) with the Slicer version to use."""
    import importlib.machinery
    import importlib.metadata
    import importlib.util

    # which optional packages "are installed" is set here, not read from this environment (a fresh clone's
    # quick start installs diffusers and transformers but not sam2): requirements.unmet's own checks run on it
    installed = {"sam2": "1.1.0", "diffusers": "0.31.0", "transformers": "4.46.0"}
    optional = set(installed)
    real_spec, real_version = importlib.util.find_spec, importlib.metadata.version

    def find_spec(name, *args):
        if name in optional:
            return importlib.machinery.ModuleSpec(name, None) if name in installed else None
        return real_spec(name, *args)

    def version(name):
        if name in optional:
            if name not in installed:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed[name]
        return real_version(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "version", version)

    for backend, segmenter in (("auto", "auto"), ("offline", "sam"), ("d2s14", "offline"), ("sd", "sam2")):
        mrml.check_extras(backend, segmenter, python=(3, 12))  # all installed
    with pytest.raises(FMOneShotError, match=r"segmenter sam2 needs Python 3\.10 or later.*Python 3\.9") as err:
        mrml.check_extras("auto", "sam2", python=(3, 9))
    assert "Slicer 5.10" in err.value.fix
    mrml.check_extras("sd", "auto", python=(3, 9))  # diffusers and transformers run on 3.9

    del installed["diffusers"], installed["sam2"]
    with pytest.raises(FMOneShotError, match=r"backend sd needs diffusers>=0\.27\.") as err:
        mrml.check_extras("sd", "offline", python=(3, 12))
    assert "slicer.util.pip_install('diffusers>=0.27 transformers>=4.38')" in err.value.fix
    with pytest.raises(FMOneShotError, match=r"segmenter sam2 needs sam2>=1\.0\.") as err:
        mrml.check_extras("offline", "sam2", python=(3, 12))
    assert ("os.environ['SAM2_BUILD_CUDA'] = '0'; slicer.util.pip_install('--no-build-isolation sam2>=1.0')"
            in err.value.fix)
    installed["sam2"] = "0.4.1"  # too old
    with pytest.raises(FMOneShotError, match=r"segmenter sam2 needs sam2>=1\.0 \(installed: 0\.4\.1\)\."):
        mrml.check_extras("offline", "sam2", python=(3, 12))
    mrml.check_extras("auto", "auto", python=(3, 12))  # auto never needs them


def test_every_package_the_library_imports_is_installed_in_slicer():
    """Each top-level package that FMOneShotLib and the module import is one Slicer gets: the standard library,
    Slicer's own (slicer, vtk, qt, the PyTorch extension), a requirement (which the panel installs), a package
    a requirement installs with it, or an optional extra whose absence the library reports itself. A package
    missing here fails only in Slicer, after the dependency check passed (dicomseg's skimage did, for DICOM
    SEG export)."""
    import ast
    import sys

    from FMOneShotLib import requirements

    repo = Path(__file__).resolve().parents[2]
    slicers_own = {"slicer", "vtk", "qt", "PyTorchUtils", "FMOneShotLib"}
    with_a_requirement = {"pydicom": "highdicom", "PIL": "highdicom, torchvision"}
    extras = {"sam2", "diffusers", "transformers", "distributed", "dask"}  # pyproject's optional dependencies
    allowed = (set(sys.stdlib_module_names) | slicers_own | set(with_a_requirement) | extras
               | set(requirements.REQUIREMENTS.values()))
    imported = {}
    for path in sorted((repo / "FMOneShotLib").rglob("*.py")) + [repo / "FMOneShot" / "FMOneShot.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                imported.setdefault(name.split(".")[0], set()).add(path.relative_to(repo).as_posix())
    assert {name: where for name, where in imported.items() if name not in allowed} == {}
    assert "FMOneShotLib/dicomseg.py" in imported["skimage"]  # the scan sees function-level imports


def test_the_panels_choices_run(sample):
    """Each backend/segmenter/device choice of the panel becomes OneShot options that build and run."""
    from FMOneShotLib.pipeline import OneShot

    scene, (node,), volume, reference = sample_scene(sample)
    tpl = mrml.template_from_markups(node, [mrml.LabelPrompt("liver", None,
                                                             *clicks(scene, volume, reference, 15, LIVER, "liver"))])
    auto = OneShot(tpl, **mrml.run_options()).fit()  # nothing downloaded: offline features and refiner
    assert auto.extractor.name == "offline" and auto.segmenter.name == "offline"
    chosen = OneShot(tpl, **mrml.run_options("offline", "contrastive", "offline", "cpu")).fit()
    assert chosen.adapter.name == "contrastive" and chosen.segmenter.name == "offline"
    result = chosen.apply(volume, slices=[15])
    assert result.present[15, 0] and result.mask("liver")[15].any()
    with pytest.raises(FMOneShotError, match="Unknown device 'gpu'"):
        mrml.run_options(device="gpu")
    augmented = OneShot(tpl, **mrml.run_options("offline", "classification", "offline", "cpu", True)).fit()
    assert augmented.adapter.augment and tpl.adapter["description"]["options"]["augment"] is True
    with pytest.raises(FMOneShotError, match="untick 'Augment the template'"):
        mrml.run_options(adapter="none", augment=True)
    # the default: auto, which leaves a volume unregistered (an image is aligned affinely: test_align)
    assert auto.align_kind == "auto" and result.alignment.kind == "none"
    unaligned = OneShot(tpl, **mrml.run_options("offline", "contrastive", "offline", "cpu", align="none")).fit()
    assert unaligned.apply(volume, slices=[15]).alignment.kind == "none"
    with pytest.raises(FMOneShotError, match="Unknown alignment 'elastic'"):
        mrml.run_options(align="elastic")


def test_preview_shows_the_template_masks_and_can_be_corrected_and_reused(sample):
    """Clicks alone -> the preview holds the segmenter's masks on the template slice only; chosen as the
    painted masks of the next template, they are what the template learns from."""
    from FMOneShotLib.demo import choose_template_slice
    from FMOneShotLib.metrics import dice
    from FMOneShotLib.pipeline import OneShot

    scene, (node,), volume, reference = sample_scene(sample)
    z = choose_template_slice(reference, [LIVER, SPLEEN])
    prompts = [mrml.LabelPrompt(n, None, *clicks(scene, volume, reference, z, v, n)) for n, v in (("liver", LIVER),
                                                                                                   ("spleen", SPLEEN))]
    tpl = mrml.template_from_markups(node, prompts)
    engine = OneShot(tpl).fit()
    preview = mrml.preview_template(node, tpl, engine)
    assert preview.GetName() == "case0 FMOneShot template"
    shown = mrml.labels_from_segmentation(preview, tpl.labels, node).array
    assert not np.delete(shown, z, axis=0).any()  # the template slice only
    liver_mask, spleen_mask = engine.template_masks[0]
    assert np.array_equal(shown[z] == 1, liver_mask)
    assert np.array_equal(shown[z] == 2, spleen_mask & ~liver_mask)  # where masks overlap, the first label
    for i, value in enumerate((LIVER, SPLEEN)):
        assert dice(shown[z] == i + 1, reference[z] == value) >= 0.85  # measured 0.883 and 0.891
    # the user corrects the liver (here: replaced by the reference) and uses the preview as painted masks
    corrected = shown.copy()
    corrected[z][shown[z] == 1] = 0
    corrected[z][reference[z] == LIVER] = 1
    fixed = mrml.segmentation_from_labels(scene, volume.like(corrected), tpl.labels, node, "corrected")
    again = mrml.template_from_markups(node, [mrml.LabelPrompt(p.name, None, p.positive, p.negative, fixed, p.name)
                                              for p in prompts])
    assert np.array_equal(again.slices[0].masks["liver"], reference[z] == LIVER)
    assert np.array_equal(again.slices[0].masks["spleen"], spleen_mask & ~liver_mask)


def test_install_plan_puts_pytorch_through_the_extension_and_refuses_what_fmoneshot_must_not_replace(monkeypatch):
    """requirements.install_plan: torch and torchvision together through the PyTorch extension, with both
    minimums (as keywords of SlicerPyTorch's installTorch); a torch already installed is never upgraded under
    another extension nor paired with a pip torchvision; Slicer's own SimpleITK is never replaced by pip."""
    import importlib.metadata
    import inspect

    from FMOneShotLib import requirements
    from FMOneShotLib.errors import FMOneShotError

    def install_torch(askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                      torchvisionVersionRequirement=None):  # PyTorchUtilsLogic.installTorch (SlicerPyTorch)
        pass

    assert requirements.install_plan([], True) == requirements.InstallPlan(None, [])
    fresh = [("torch>=2.1", None), ("torchvision>=0.16", None), ("scipy>=1.10", None)]
    plan = requirements.install_plan(fresh, pytorch_extension=True)
    assert plan.torch == {"torchVersionRequirement": ">=2.1", "torchvisionVersionRequirement": ">=0.16"}
    assert plan.pip == ["scipy>=1.10"]
    inspect.signature(install_torch).bind(askConfirmation=False, **plan.torch)  # the keywords exist there
    assert requirements.install_plan(fresh, pytorch_extension=False) == requirements.InstallPlan(
        None, ["torch>=2.1", "torchvision>=0.16", "scipy>=1.10"])  # without the extension: pip's build
    # a too old torch from another extension: not replaced, and the fix is one that works (PyTorch Util's
    # Install button does nothing while a torch is installed)
    with pytest.raises(FMOneShotError, match=r"PyTorch 2\.0\.1 is installed.*torch>=2\.1 \(installed: 2\.0\.1\)"
                       r".*uninstall PyTorch, restart Slicer"):
        requirements.install_plan([("torch>=2.1", "2.0.1"), ("timm>=1.0", None)], pytorch_extension=True)
    # a good torch without its torchvision: pip would fetch a torchvision of another build
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "2.5.1+cu121" if name == "torch" else real(name))
    with pytest.raises(FMOneShotError, match=r"PyTorch 2\.5\.1\+cu121 is installed.*torchvision>=0\.16 "
                                             r"\(installed: missing\)"):
        requirements.install_plan([("torchvision>=0.16", None)], pytorch_extension=True)
    assert requirements.install_plan([("torchvision>=0.16", None)], False).pip == ["torchvision>=0.16"]
    with pytest.raises(FMOneShotError, match=r"Slicer's own SimpleITK \(2\.1\.0\).*SimpleITK>=2\.2.*newer"):
        requirements.install_plan([("SimpleITK>=2.2", "2.1.0"), ("scipy>=1.10", None)], pytorch_extension=True)


def test_a_package_installed_during_the_session_is_seen(tmp_path, monkeypatch):
    """After pip installs into a folder whose listing the import system has cached, and the folder looks
    unchanged (same modification time, as within one tick of a coarse clock), unmet() still finds the new
    package: it drops the cached listings first. Without that, Slicer would say 'still missing after
    installing: restart Slicer' right after a successful install."""
    import os
    import sys

    from FMOneShotLib import requirements

    monkeypatch.setattr(requirements, "REQUIREMENTS", {"fmoneshot_probe>=0": "fmoneshot_probe"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert requirements.unmet() == [("fmoneshot_probe>=0", None)]  # caches the listing of tmp_path
    stat = os.stat(tmp_path)
    (tmp_path / "fmoneshot_probe").mkdir()
    (tmp_path / "fmoneshot_probe" / "__init__.py").write_text("", encoding="utf-8")
    os.utime(tmp_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the folder looks unchanged
    assert requirements.unmet() == []
    sys.modules.pop("fmoneshot_probe", None)


def test_listing_nodes_keeps_no_node_alive():
    """vtkMRMLScene.GetNodesByClass returns a collection its caller must delete; from Python it leaked and kept
    every listed node alive (a removed volume's voxels never freed) each time the panel listed its labels,
    volumes or results. Every listing leaves each node's reference count as it was."""
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    positive, negative = mrml.add_label(scene, "liver", (200, 10, 10))
    landmarks = mrml.landmarks_node(scene, create=True)
    result = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct segmentation")
    result.SetAttribute(mrml.RESULT_ATTRIBUTE, "ct")
    nodes = (volume, positive, negative, landmarks, result)
    before = [n.GetReferenceCount() for n in nodes]
    for _ in range(3):
        assert [p.name for p in mrml.label_prompts(scene)] == ["liver"]
        assert mrml.landmarks_node(scene) is landmarks
        assert mrml.volume_targets(scene) == ([], [("ct", "The volume 'ct' holds no image data.")])
        assert mrml.result_segmentations(scene) == [result]
    import gc

    gc.collect()
    assert [n.GetReferenceCount() for n in nodes] == before
