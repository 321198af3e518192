"""DICOM SEG: results of a DICOM series as a DICOM Segmentation object that PACS and viewers store beside it.

One SEG per target series (binary segmentation, one segment per template label), written with highdicom
(Herrmann et al., "Highdicom: a Python library for standardized encoding of image annotations and machine
learning model outputs in pathology and radiology", J Digit Imaging 2022). Each segment carries the label's
standard terminology (:mod:`terminology`: category, type and type modifier, anatomic region, colour), the
algorithm identification (FMOneShot, its version, the backend, adapter and segmenter as parameters) and
algorithm type SEMIAUTOMATIC (a person marked the template). Each frame references the source image it was
segmented on; study, patient and frame of reference are those of the source series, and frames are placed by
the source images' own position and orientation. Empty frames are left out, as highdicom does by default.

Landmarks are not written as DICOM (no SR): they stay JSON/CSV (``fmoneshot localize``).

The label volume must lie on the series' own grid (the target volume as :func:`image.read_volume` read it):
each source image is matched to a slice by its Image Position (Patient), and a mismatch is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import __version__
from .errors import FMOneShotError
from .files import atomic_paths, refuse_existing
from .image import Volume

SEG_EXTENSION = ".dcm"
MANUFACTURER = "FMOneShot"
# Series number of a SEG: after the source series' own, so that viewers list it after the images.
SERIES_NUMBER_OFFSET = 1000
# How far (in voxels) a source image's position may lie from the slice it is matched to.
POSITION_TOLERANCE = 0.01


def series_files(folder) -> list:
    """The files of the one DICOM series in ``folder``, in the order :func:`image.read_volume` stacks them
    (slice k of the volume is file k: GDCM's sort along the slice normal). FMOneShotError when ``folder`` is
    not a folder holding exactly one DICOM series, with the fix for DICOM SEG output."""
    import SimpleITK as sitk

    path = Path(folder)
    fix = ("DICOM SEG is written only for DICOM inputs: pass the folder of one DICOM series, or choose another "
           "output format (--format .nii.gz or .nrrd).")
    if not path.is_dir():
        raise FMOneShotError(f"{path} is not a DICOM series folder.", fix)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise FMOneShotError(f"The folder {path} holds no DICOM series.", fix)
    if len(series) > 1:
        raise FMOneShotError(f"The folder {path} holds {len(series)} DICOM series; a DICOM SEG belongs to one.",
                             "put each series in a folder of its own and pass that folder.")
    return [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])]


def algorithm_parameters(oneshot) -> dict:
    """The settings of a fitted :class:`pipeline.OneShot` as the SEG's algorithm parameters (str -> str):
    backend (and its settings), adapter and segmenter, as resolved (not "auto")."""
    if oneshot.extractor is None:
        raise FMOneShotError("The one-shot engine is not fitted.", "call fit() before writing its results.")
    settings = dict(oneshot.extractor.settings())
    params = {"backend": str(settings.pop("backend", oneshot.backend))}
    params.update({f"backend_{k}": str(v) for k, v in sorted(settings.items())})
    params["adapter"] = oneshot.adapter.name if oneshot.adapter is not None else "none"
    params["segmenter"] = getattr(oneshot.segmenter, "name", "") or type(oneshot.segmenter).__name__
    return params


def cielab(rgb) -> tuple:
    """An sRGB colour (0-255) as DICOM's Recommended Display CIELab Value (three integers 0-65535, PS3.3
    C.10.7.1.1): CIE L*a*b* under D65 by ``skimage.color.rgb2lab``, scaled by ``highdicom.color.CIELabColor``.
    (highdicom >= 0.23 offers the same as ``display_color``; this also runs with 0.22, Slicer 5.8's Python.)"""
    import highdicom as hd
    from skimage.color import rgb2lab

    lab = rgb2lab(np.asarray(rgb, float).reshape(1, 1, 3) / 255.0)[0, 0]
    lab = np.clip(lab, [0.0, -128.0, -128.0], [100.0, 127.0, 127.0])  # rounding may step just outside
    return tuple(int(v) for v in hd.color.CIELabColor(*(float(v) for v in lab)).value)


def _coded(code):
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _segment_description(number: int, label, algorithm):
    import highdicom as hd
    from pydicom.sequence import Sequence

    t = label.terminology
    desc = hd.seg.SegmentDescription(
        segment_number=number, segment_label=label.name, segmented_property_category=_coded(t.category),
        segmented_property_type=_coded(t.type), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[_coded(t.region)] if t.region is not None else None)
    desc.RecommendedDisplayCIELabValue = list(cielab(label.color))
    # highdicom has no argument for these two: DICOM nests them in the items they modify (PS3.3 C.8.20.2,
    # Segmented Property Type Modifier Code Sequence (0062,0011); Anatomic Region Modifier Sequence (0008,2220))
    if t.type_modifier is not None:
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = Sequence(
            [_coded(t.type_modifier)])
    if t.region is not None and t.region_modifier is not None:
        desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = Sequence([_coded(t.region_modifier)])
    return desc


def _slice_of_each_file(labels: Volume, datasets: list, files: list) -> list:
    """For each source image, the slice k of ``labels`` it lies on; FMOneShotError when the grids differ."""
    slices = []
    for ds, f in zip(datasets, files):
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1 or "ImagePositionPatient" not in ds:
            raise FMOneShotError(f"{f} is not a single-frame image with a position (Image Position (Patient)).",
                                 "DICOM SEG output needs a series of single-frame CT, MR or similar images.")
        if (int(ds.Rows), int(ds.Columns)) != labels.slice_shape:
            raise FMOneShotError(f"{f} has {ds.Rows} x {ds.Columns} pixels, the labels {labels.slice_shape}.",
                                 "write the SEG for the series the labels were computed on.")
        ijk = labels.physical_to_index([float(v) for v in ds.ImagePositionPatient])
        k = int(round(ijk[2]))
        if np.abs(ijk - [0, 0, k]).max() > POSITION_TOLERANCE or not 0 <= k < labels.n_slices:
            raise FMOneShotError(f"The image {f} does not lie on a slice of the label volume (it falls at voxel "
                                 f"{np.round(ijk, 3).tolist()}).",
                                 "write the SEG for the series the labels were computed on, on its own grid.")
        slices.append(k)
    missing = sorted(set(range(labels.n_slices)) - set(slices))
    if missing:
        raise FMOneShotError(f"Slices {missing} of the label volume have no source image in the series.",
                             "write the SEG for the complete series the labels were computed on.")
    return slices


def write_dicom_seg(labels: Volume, template_labels: list, source_files: list, path, algorithm: dict | None = None,
                    force: bool = False) -> Path:
    """Write the label volume ``labels`` ((z, y, x), values of ``template_labels``, on the grid of the DICOM
    series ``source_files``, e.g. :func:`series_files`) as one DICOM SEG file ``path`` (ending .dcm).

    Segment k (1, 2, ...) is the k-th template label: its name as Segment Label, its terminology as category,
    type, modifier and region, its colour as the recommended display CIELab value. ``algorithm``: parameters
    of the algorithm identification (:func:`algorithm_parameters`). Frames: one per source image and segment
    with voxels of that segment, each referencing its source image. Nothing existing is overwritten unless
    ``force``; the file appears whole or not at all. Returns ``path``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    path = Path(path)
    if not path.name.endswith(SEG_EXTENSION):
        raise FMOneShotError(f"A DICOM SEG file name must end with {SEG_EXTENSION}: {path}.", "e.g. ct.seg.dcm")
    if not template_labels:
        raise FMOneShotError("There is no label to write as a segment.", "segment at least one label.")
    if not path.parent.is_dir():
        raise FMOneShotError(f"The folder {path.parent} does not exist.", "create it first or choose another.")
    refuse_existing([path], force)
    files = [Path(f) for f in source_files]
    if not files:
        raise FMOneShotError("No source DICOM image was given.", "give the files of the segmented series.")
    try:
        datasets = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise FMOneShotError(f"Cannot read the source DICOM images ({exc}).",
                             "give the files of the segmented DICOM series.") from None
    slices = _slice_of_each_file(labels, datasets, files)
    values = [lb.value for lb in template_labels]
    unknown = sorted(set(np.unique(labels.array).tolist()) - {0, *values})
    if unknown:
        raise FMOneShotError(f"The label volume holds values {unknown} that no label has.",
                             "give the labels of the template the volume was segmented with.")
    # label values -> segment numbers 1..L in template order, frames in the order of the source images
    lut = np.zeros(int(max(values + [int(labels.array.max(initial=0))])) + 1, np.uint16)
    lut[values] = np.arange(1, len(values) + 1)
    frames = lut[np.asarray(labels.array)[slices]]
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name="FMOneShot", family=codes.DCM.ArtificialIntelligence, version=__version__,
        parameters=dict(algorithm or {}) or None)
    descriptions = [_segment_description(i + 1, lb, algorithm_id) for i, lb in enumerate(template_labels)]
    first = datasets[0]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=int(getattr(first, "SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER, software_versions=__version__, device_serial_number="0",
        content_label="FMONESHOT", content_description="FMOneShot one-shot segmentation",
        series_description=f"FMOneShot segmentation of {getattr(first, 'SeriesDescription', '') or 'series'}"[:64])
    with atomic_paths(path) as tmp:
        seg.save_as(str(tmp))
    return path
