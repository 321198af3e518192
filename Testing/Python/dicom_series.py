"""A DICOM CT series written from a Volume with pydicom, for tests of DICOM input and DICOM SEG output."""

from pathlib import Path

import numpy as np


def write_dicom_series(volume, folder, order=None, series_number=3, patient_id="FMO-TEST") -> list:
    """Write ``volume`` (int16-compatible values) as one single-frame CT image per slice in ``folder``, with
    its geometry (Image Position / Orientation (Patient) from the Volume's LPS origin, spacing and direction).
    ``order``: the slice written to img000.dcm, img001.dcm, ... (file names need not follow the anatomy).
    Returns [(slice index, path, SOP Instance UID)] in file-name order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    out = []
    for n, k in enumerate(range(volume.n_slices) if order is None else order):
        k = int(k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", patient_id, "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "FMOneShot tests"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", series_number, k + 1
        ds.ImageOrientationPatient = [float(v) for v in (*volume.direction[:, 0], *volume.direction[:, 1])]
        ds.ImagePositionPatient = [float(v) for v in volume.index_to_physical([0, 0, k])]
        ds.PixelSpacing = [float(volume.spacing[1]), float(volume.spacing[0])]  # row spacing, column spacing
        ds.SliceThickness = float(volume.spacing[2])
        ds.Rows, ds.Columns = volume.slice_shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(volume.array[k].astype(np.int16)).tobytes()
        path = folder / f"img{n:03d}.dcm"
        try:
            ds.save_as(str(path), enforce_file_format=True)  # pydicom >= 3
        except TypeError:
            ds.save_as(str(path), write_like_original=False)
        out.append((k, path, str(ds.SOPInstanceUID)))
    return out
