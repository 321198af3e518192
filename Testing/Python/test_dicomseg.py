"""DICOM SEG output: a DICOM series built here is segmented and its SEG read back with highdicom."""

import numpy as np
import pytest

from FMOneShotLib import terminology
from FMOneShotLib.cli import main
from FMOneShotLib.dicomseg import cielab, series_files, write_dicom_seg
from FMOneShotLib.errors import FMOneShotError
from FMOneShotLib.image import Volume, read_volume
from FMOneShotLib.template import Label

hd = pytest.importorskip("highdicom", reason="highdicom is a dependency: pip install -e .")
from dicom_series import write_dicom_series  # noqa: E402

CT = "Testing/Data/totalseg-ct-small/images/ct-small.nii.gz"
LIVER_CLICKS = ["--slice", "24", "--positive", "liver:86,49", "--positive", "liver:88,37", "--negative", "liver:30,60"]


def oblique():
    a, b = np.deg2rad(25), np.deg2rad(12)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rot @ tilt


@pytest.fixture
def ct_series(tmp_path, sample):
    """The bundled CT as two DICOM series (an oblique one, files in shuffled order, and the CT's own geometry)."""
    ct = read_volume(sample / "images" / "ct-small.nii.gz")
    tilted = Volume(ct.array, ct.spacing, (12.5, -40.0, 80.25), oblique(), name="ct")
    order = np.random.default_rng(0).permutation(ct.n_slices)
    return {"tilted": (tilted, write_dicom_series(tilted, tmp_path / "tilted", order=order)),
            "plain": (ct, write_dicom_series(ct, tmp_path / "plain", series_number=7))}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def frames_as_labels(seg, written, segment_values):
    """The SEG's masks per source image, back as a (z, y, x) label volume: segment k -> segment_values[k-1]."""
    uids = [uid for _, _, uid in sorted(written)]  # slice order
    combined = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    return np.array([0, *segment_values])[combined]


def test_segment_writes_one_seg_per_dicom_series(tmp_path, capsys, ct_series, monkeypatch):
    import pydicom

    from conftest import REPO
    monkeypatch.chdir(REPO)
    folders = [tmp_path / "tilted", tmp_path / "plain"]
    args = ["segment", *folders, "--template-image", folders[0], *LIVER_CLICKS, "--positive", "spleen:25,35"]
    code, stdout, err = run(capsys, *args, "--output", tmp_path / "seg", "--output-format", "dicom-seg")
    assert code == 0, err
    code, _, err = run(capsys, *args, "--output", tmp_path / "nii")  # the same run, as label volumes
    assert code == 0, err
    for name, (volume, written) in ct_series.items():
        folder = tmp_path / ("tilted" if name == "tilted" else "plain")
        path = tmp_path / "seg" / f"{folder.name}.seg.dcm"
        seg = hd.seg.segread(str(path))
        labels = read_volume(tmp_path / "nii" / f"{folder.name}-labels.nii.gz").array
        assert (labels == 1).sum() > 1000 and (labels == 2).sum() > 100  # liver and spleen were found
        # segments: the labels' names and standard codes, the algorithm that made them
        assert [d.SegmentLabel for d in seg.SegmentSequence] == ["liver", "spleen"]
        types = [(d.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
                  d.SegmentedPropertyTypeCodeSequence[0].CodeValue) for d in seg.SegmentSequence]
        assert types == [("SCT", "10200004"), ("SCT", "78961009")]  # SNOMED CT liver, spleen
        assert {d.SegmentedPropertyCategoryCodeSequence[0].CodeValue for d in seg.SegmentSequence} == {"123037004"}
        assert {d.SegmentAlgorithmType for d in seg.SegmentSequence} == {"SEMIAUTOMATIC"}
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("FMOneShot", "0.1.0")
        assert {"backend=offline", "segmenter=offline"} <= set(algorithm.AlgorithmParameters.split(","))
        # the series it belongs to: same patient, study and frame of reference; every source image referenced
        source = pydicom.dcmread(str(written[0][1]), stop_before_pixels=True)
        for keyword in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
            assert getattr(seg, keyword) == getattr(source, keyword), keyword
        referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                      for item in series.ReferencedInstanceSequence}
        assert referenced == {uid for _, _, uid in written}
        # every frame lies where its source image lies, and the masks equal the label volume voxel for voxel
        position = {uid: [float(v) for v in pydicom.dcmread(str(p)).ImagePositionPatient] for _, p, uid in written}
        for frame in seg.PerFrameFunctionalGroupsSequence:
            uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            assert np.allclose(frame.PlanePositionSequence[0].ImagePositionPatient, position[uid], atol=1e-3)
        assert np.array_equal(frames_as_labels(seg, written, [1, 2]), labels), name
    assert "seg/tilted.seg.dcm: liver on" in stdout


def test_dicom_seg_is_refused_for_inputs_that_are_not_dicom(tmp_path, capsys, ct_series, monkeypatch):
    from conftest import REPO
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, "segment", CT, "--template-image", CT, *LIVER_CLICKS, "-o", out,
                       "--output-format", "dicom-seg")
    assert code == 2 and "is not a DICOM series folder" in err and "--format .nii.gz" in err
    assert list(out.iterdir()) == []  # refused before anything ran
    # a DICOM target beside one that is not: refused as well, nothing written for either
    code, _, err = run(capsys, "segment", tmp_path / "plain", CT, "--template-image", CT, *LIVER_CLICKS, "-o", out,
                       "--format", "dicom-seg")
    assert code == 2 and "ct-small.nii.gz is not a DICOM series folder" in err
    assert list(out.iterdir()) == []
    # an existing SEG is kept unless --force
    existing = out / "plain.seg.dcm"
    existing.write_bytes(b"user's file")
    code, _, err = run(capsys, "segment", tmp_path / "plain", "--template-image", CT, *LIVER_CLICKS, "-o", out,
                       "--format", "dicom-seg")
    assert code == 2 and "already exists" in err and existing.read_bytes() == b"user's file"


def test_segments_carry_modifiers_regions_and_generic_codes(tmp_path, ct_series):
    volume, written = ct_series["plain"]
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[5:9, 10:20, 10:30] = 7
    labels[6, 40:50, 40:50] = 2
    labels[20, 60:70, 60:70] = 9
    template_labels = [Label("Left kidney", 7), Label("fetal head", 2), Label("liver", 3),
                       Label("kidney_cyst_right", 9)]
    path = write_dicom_seg(volume.like(labels), template_labels, [p for _, p, _ in written], tmp_path / "x.seg.dcm",
                           {"backend": "d2s14"})
    seg = hd.seg.segread(str(path))
    kidney, head, liver, cyst = seg.SegmentSequence
    kidney_type = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert (kidney_type.CodeValue, kidney_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue) == \
        ("64033007", "7771000")  # SNOMED CT kidney, left
    assert (head.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            head.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("85756007", "85756007")  # unknown: Tissue
    assert "SegmentedPropertyTypeModifierCodeSequence" not in head.SegmentedPropertyTypeCodeSequence[0]
    region = cyst.AnatomicRegionSequence[0]
    assert (cyst.SegmentedPropertyTypeCodeSequence[0].CodeMeaning, region.CodeMeaning,
            region.AnatomicRegionModifierSequence[0].CodeMeaning) == ("Cyst", "Kidney", "Right")
    assert list(kidney.RecommendedDisplayCIELabValue) == list(cielab(template_labels[0].color))
    assert cielab((255, 255, 255))[0] == 65535 and cielab((0, 0, 0)) == (0, 32896, 32896)  # white, black
    # liver has no voxel: it is described, with no frame; the other masks come back as they were
    back = frames_as_labels(seg, written, [7, 2, 3, 9])
    assert np.array_equal(back, labels)
    assert len(seg.PerFrameFunctionalGroupsSequence) == 4 + 1 + 1  # empty frames left out


def test_write_refuses_labels_off_the_series_grid(tmp_path, ct_series):
    volume, written = ct_series["plain"]
    files = [p for _, p, _ in written]
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[3, 4, 5] = 1
    shifted = Volume(labels, volume.spacing, np.add(volume.origin, (0, 0, 1.5)), volume.direction)
    with pytest.raises(FMOneShotError, match="does not lie on a slice of the label volume"):
        write_dicom_seg(shifted, [Label("liver", 1)], files, tmp_path / "x.seg.dcm")
    with pytest.raises(FMOneShotError, match="Slices \\[0\\] of the label volume have no source image"):
        write_dicom_seg(volume.like(labels), [Label("liver", 1)], [f for k, f, _ in written if k != 0],
                        tmp_path / "x.seg.dcm")
    with pytest.raises(FMOneShotError, match="values \\[1\\] that no label has"):
        write_dicom_seg(volume.like(labels), [Label("liver", 2)], files, tmp_path / "x.seg.dcm")
    with pytest.raises(FMOneShotError, match="must end with .dcm"):
        write_dicom_seg(volume.like(labels), [Label("liver", 1)], files, tmp_path / "x.nrrd")
    assert not any(tmp_path.glob("*.seg.dcm")) and not any(tmp_path.glob(".partial*"))


def test_series_files_follow_the_volume_slices(tmp_path, ct_series):
    volume, written = ct_series["tilted"]
    files = series_files(tmp_path / "tilted")
    by_path = {p: k for k, p, _ in written}
    assert [by_path[f] for f in files] == list(range(volume.n_slices))  # file k is slice k of read_volume
    with pytest.raises(FMOneShotError, match="holds no DICOM series"):
        series_files(tmp_path)


def test_slicer_export_of_a_volume_loaded_from_dicom(tmp_path, ct_series, sample):
    """mrml.export_segmentations(..., ".seg.dcm"): the volume node knows its SOP instances (as Slicer's DICOM
    plugins record them), the DICOM database gives their files; the SEG holds the segmentation's voxels."""
    from types import SimpleNamespace

    slicer = pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra")
    from FMOneShotLib import mrml

    _, written = ct_series["tilted"]
    volume = read_volume(tmp_path / "tilted")
    reference = read_volume(sample / "masks" / "ct-small.nii.gz").array  # liver 5, spleen 1
    scene = slicer.vtkMRMLScene()
    node = mrml.node_from_volume(scene, volume, name="CT tilted")
    labels = [Label("liver", 5), Label("spleen", 1), Label("Left kidney", 3)]
    seg_node = mrml.segmentation_from_labels(scene, volume.like(np.where(np.isin(reference, [1, 5]), reference, 0)),
                                             labels, node, "CT tilted segmentation")
    database = SimpleNamespace(fileForInstance=lambda uid: {u: str(p) for _, p, u in written}.get(uid, ""))
    # a segment with Slicer's default terminology (as a segment painted in Slicer has): its name's codes are used
    spleen = seg_node.GetSegmentation().GetSegment("spleen")
    mrml.set_segment_terminology(spleen, terminology.GENERIC)
    assert mrml.segment_terminology(spleen).is_generic
    out = tmp_path / "export"
    out.mkdir()
    # not loaded from DICOM: refused, nothing written
    with pytest.raises(FMOneShotError, match="was not loaded from DICOM"):
        mrml.export_segmentations([seg_node], out, ".seg.dcm", dicom_database=database)
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uid for _, _, uid in written))
    gone = SimpleNamespace(fileForInstance=lambda uid: "")
    with pytest.raises(FMOneShotError, match="30 of the 30 DICOM images of 'CT tilted' are not in the DICOM database"):
        mrml.export_segmentations([seg_node], out, ".seg.dcm", dicom_database=gone)
    assert list(out.iterdir()) == []
    (path,) = mrml.export_segmentations([seg_node], out, ".seg.dcm", dicom_database=database)
    assert path == out / "CT tilted.seg.dcm" and mrml.export_paths([seg_node], out, ".seg.dcm") == [path]
    seg = hd.seg.segread(str(path))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["liver", "spleen", "Left kidney"]
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"  # spleen
    kidney_type = seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0]
    assert kidney_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"  # from the segment's tag
    back = frames_as_labels(seg, written, [5, 1, 3])
    assert np.array_equal(back, np.where(np.isin(reference, [1, 5]), reference, 0))
    # what Apply made carries the algorithm's settings into the SEG
    from FMOneShotLib.template import Template, sample_prompts

    pos, neg = sample_prompts(reference[24] == 5, 5, 5, 0)
    template = Template.from_volume(volume, 24, {"liver": pos}, {"liver": neg})
    (result,) = mrml.apply_to_nodes(template, [node], backend="offline", segmenter="offline")
    (path,) = mrml.export_segmentations([result.segmentation], out, ".seg.dcm", dicom_database=database,
                                        overwrite=True)
    algorithm = hd.seg.segread(str(path)).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert {"backend=offline", "adapter=classification", "segmenter=offline"} <= \
        set(algorithm.AlgorithmParameters.split(","))
    assert np.array_equal(frames_as_labels(hd.seg.segread(str(path)), written, [1]), result.result.labels.array)
