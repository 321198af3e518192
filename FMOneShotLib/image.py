"""Volumes with their geometry, read and written with SimpleITK, and the one place intensities are normalised.

A :class:`Volume` is a numpy array in (z, y, x) order, exactly as ``SimpleITK.GetArrayFromImage`` gives it,
together with spacing, origin and direction in SimpleITK's convention (x, y, z order, LPS physical space).
A 2D image is a one-slice volume that remembers it was 2D, so that results are written back as 2D files.
Intensities are kept as acquired; :func:`normalize` maps them to [0, 1] for the feature extractors.
Non-finite voxels (NaN, +-inf) are missing values: left out of every window and statistic, and background
(0) after normalisation; :func:`read_volume` warns with their number.
Masks and label images are matched to their image by physical position, never by array index
(:func:`labels_on_grid`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import FMOneShotError, warn
from .files import atomic_paths, refuse_existing, refuse_inputs

MODALITIES = ("CT", "MR", "US", "XR")
LABEL_EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".mha", ".png")
# File name endings of the images FMOneShot reads (SimpleITK's formats); an output name keeps everything else.
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff", ".jpg", ".jpeg",
                    ".bmp", ".dcm", ".hdr", ".img", ".vtk")
# CT soft-tissue window (level 40 HU, width 400 HU): abdominal organs, the product's main use.
CT_WINDOW = (-160.0, 240.0)
# MR, ultrasound and X-ray have no absolute scale: robust percentiles of the whole volume.
PERCENTILES = (0.5, 99.5)
# A slice or region whose normalised grey values spread no more than this is blank (constant, all missing, or
# wholly outside the intensity window): a template is refused there, and nothing is found on such a target slice.
BLANK_SPREAD = 1e-3
# Anatomical slicing planes and the LPS axis each plane is normal to.
ORIENTATIONS = {"sagittal": 0, "coronal": 1, "axial": 2}
# For slices along index axis a (x=0, y=1, z=2): the index axes that become the slice's columns and rows.
IN_PLANE = {0: (1, 2), 1: (0, 2), 2: (0, 1)}


@dataclass
class Volume:
    """Pixels in (z, y, x) order plus the geometry that places them in LPS physical space (mm)."""

    array: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)  # (x, y, z) mm
    origin: tuple = (0.0, 0.0, 0.0)  # (x, y, z) mm, LPS
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns: index axes in LPS
    is_2d: bool = False
    name: str = ""
    modality: str | None = None
    # The file or folder the pixels were read from ("" when made in memory). Volumes derived from it (``like``,
    # ``label_volume``, ``resliced``) keep it, and ``write_volume`` never writes over it, even with ``force``.
    source: str = ""

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if self.array.ndim == 2:
            self.array = self.array[None]
            self.is_2d = True
        if self.array.ndim != 3:
            raise FMOneShotError(
                f"A volume needs 2 or 3 dimensions; this array has shape {self.array.shape}.",
                "pass one 2D slice or one 3D volume (split 4D series into 3D volumes first).",
            )
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def n_slices(self) -> int:
        return self.array.shape[0]

    @property
    def slice_shape(self) -> tuple:
        return self.array.shape[1:]

    @property
    def pixel_spacing(self) -> tuple:
        """In-plane (x, y) spacing in mm."""
        return self.spacing[:2]

    def like(self, array: np.ndarray, name: str | None = None) -> "Volume":
        """A volume with this geometry and other pixels (a label volume of the same grid, say)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise FMOneShotError(
                f"Array shape {array.shape} differs from the volume's {self.array.shape}.",
                "give an array on the same (z, y, x) grid.",
            )
        return replace(self, array=array, name=self.name if name is None else name)

    def slice_axis(self, orientation: str | None = None) -> int:
        """The index axis (x=0, y=1, z=2) to slice along for an anatomical ``orientation``: the axis whose
        direction is closest to the plane's normal; ``None`` means the volume's own slices (z)."""
        if orientation is None:
            return 2
        if orientation not in ORIENTATIONS:
            raise FMOneShotError(f"Unknown slice orientation {orientation!r}.",
                                 f"use one of: {', '.join(ORIENTATIONS)} (or none for the volume's own slices).")
        return int(np.argmax(np.abs(self.direction[ORIENTATIONS[orientation]])))

    def orientation_of(self, axis: int) -> str:
        """The anatomical plane of the slices along index axis ``axis`` (x=0, y=1, z=2)."""
        lps = int(np.argmax(np.abs(self.direction[:, axis])))
        return next(name for name, a in ORIENTATIONS.items() if a == lps)

    def resliced(self, axis: int) -> "Volume":
        """The same voxels and geometry, sliced along index axis ``axis`` (x=0, y=1, z=2): slice k of the
        result is the plane index[axis] == k, its columns and rows follow the other two axes in x, y, z order.
        Physical positions are unchanged, so ``index_to_physical`` of the result places every voxel where it
        was. ``axis`` 2 gives the volume itself; :meth:`unslice` turns arrays of the result back."""
        if axis == 2:
            return self
        cols, rows = IN_PLANE[axis]
        order = (axis, rows, cols)  # new (z, y, x) as index axes
        return replace(self, array=self.array.transpose([2 - a for a in order]),
                       spacing=tuple(self.spacing[a] for a in order[::-1]),
                       direction=self.direction[:, list(order[::-1])], is_2d=False)

    @staticmethod
    def unslice(array: np.ndarray, axis: int) -> np.ndarray:
        """An array of ``volume.resliced(axis)`` back in the volume's own (z, y, x) order."""
        if axis == 2:
            return array
        cols, rows = IN_PLANE[axis]
        perm = [2 - a for a in (axis, rows, cols)]
        return np.ascontiguousarray(array.transpose(np.argsort(perm)))

    def index_to_physical(self, index) -> np.ndarray:
        """(x, y, z) continuous index -> LPS mm. Accepts one point or an (N, 3) array."""
        idx = np.asarray(index, dtype=float)
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ self.direction.T

    def physical_to_index(self, point) -> np.ndarray:
        """LPS mm -> (x, y, z) continuous index. Accepts one point or an (N, 3) array."""
        p = np.asarray(point, dtype=float) - np.asarray(self.origin)
        return (p @ np.linalg.inv(self.direction).T) / np.asarray(self.spacing)

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """A SimpleITK image of ``array`` (default: the volume's own pixels) with this geometry."""
        a = self.array if array is None else np.asarray(array)
        if self.is_2d:
            img = sitk.GetImageFromArray(a[0])
            img.SetSpacing(self.spacing[:2])
            img.SetOrigin(self.origin[:2])
            img.SetDirection(tuple(self.direction[:2, :2].ravel()))
        else:
            img = sitk.GetImageFromArray(a)
            img.SetSpacing(self.spacing)
            img.SetOrigin(self.origin)
            img.SetDirection(tuple(self.direction.ravel()))
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, name: str = "", modality: str | None = None, source: str = "") -> "Volume":
        where = f" ({source})" if source else ""
        if img.GetNumberOfComponentsPerPixel() == 2:
            raise FMOneShotError(
                f"The image{where} has 2 components per pixel (grey and alpha, or a 2-vector); FMOneShot works "
                "on one grey value per pixel and does not guess what the second means.",
                "save it without the alpha channel (e.g. as greyscale PNG), or take the grey component with "
                "SimpleITK.VectorIndexSelectionCast(image, 0).",
            )
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise FMOneShotError(
                f"The image{where} has {img.GetNumberOfComponentsPerPixel()} components per pixel "
                "(RGB or vector); FMOneShot works on one grey value per pixel.",
                "convert it to greyscale first, e.g. in Slicer with 'Vector to Scalar Volume', or "
                "SimpleITK.VectorIndexSelectionCast(image, 0).",
            )
        dim = img.GetDimension()
        if dim == 4:
            raise FMOneShotError(
                f"The image{where} is 4D (size {img.GetSize()}); FMOneShot works on 2D slices and 3D volumes.",
                "extract the 3D volume you want first (one time point or one channel).",
            )
        if dim not in (2, 3):
            raise FMOneShotError(f"The image{where} has {dim} dimensions.", "give a 2D image or a 3D volume.")
        arr = sitk.GetArrayFromImage(img)
        if dim == 2:
            d2 = np.asarray(img.GetDirection()).reshape(2, 2)
            direction = np.eye(3)
            direction[:2, :2] = d2
            return cls(arr[None], tuple(img.GetSpacing()) + (1.0,), tuple(img.GetOrigin()) + (0.0,),
                       direction, True, name, modality, source)
        return cls(arr, img.GetSpacing(), img.GetOrigin(), np.asarray(img.GetDirection()).reshape(3, 3),
                   False, name, modality, source)


def image_stem(path) -> str:
    """The name of an image file without its image extension (``p.001.nii.gz`` -> ``p.001``, case-insensitive);
    a folder's (DICOM series) own name. The base of every output name derived from an input."""
    path = Path(path)
    name = path.name or Path(path).resolve().name
    lower = name.lower()
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


# Slices of a DICOM series are evenly spaced and untilted when their positions agree within this (mm), as in
# Slicer's DICOMScalarVolumePlugin (spacingEpsilon 0.01 mm).
DICOM_POSITION_TOLERANCE = 0.01


def _regular_slices(img: sitk.Image, reader: sitk.ImageSeriesReader, n: int, path: Path) -> sitk.Image:
    """The series image on a grid whose slices lie where the files say (ImagePositionPatient along the normal
    of ImageOrientationPatient), as Slicer checks them. ITK's series reader places slices at one spacing,
    which is wrong when slices are missing or unevenly spaced: such a series is resampled onto a regular grid
    at its most common spacing (linear interpolation across the gaps, with a warning), so every acquired
    slice keeps its true position. Gantry tilt (positions shifting within the slice plane) and repeated
    positions are refused. A series without position tags is left as ITK read it."""
    if n < 3 or img.GetDimension() != 3:
        return img
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
        cosines = np.array([float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")])
    except (RuntimeError, ValueError):
        return img
    if positions.shape != (n, 3) or cosines.shape != (6,):
        return img
    row, col = cosines[:3], cosines[3:]
    normal = np.cross(row, col)
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    depth, positions = depth[order], positions[order]
    steps = np.diff(depth)
    if steps.min() <= DICOM_POSITION_TOLERANCE:
        raise FMOneShotError(f"The DICOM series in {path} has several slices at one position "
                             f"({depth[np.argmin(steps)]:.2f} mm along the slice normal).",
                             "keep one acquisition per folder (a series with repeated or overlapping acquisitions "
                             "must be split first).")
    shift = np.linalg.norm(np.diff(positions, axis=0) - steps[:, None] * normal, axis=1)
    if shift.max() > DICOM_POSITION_TOLERANCE:
        angle = np.degrees(np.arctan2(shift.max(), steps[np.argmax(shift)]))
        raise FMOneShotError(f"The DICOM series in {path} is acquired with a gantry tilt of about {angle:.1f} "
                             "degrees (slice positions shift within the slice plane); FMOneShot would place its "
                             "slices at wrong positions.",
                             "convert it to a volume with the tilt corrected first, e.g. with dcm2niix, or load it "
                             "in Slicer with acquisition geometry regularization and save the result.")
    spacing = float(np.median(steps))
    if np.abs(steps - spacing).max() <= DICOM_POSITION_TOLERANCE:
        return img
    array = sitk.GetArrayFromImage(img)[order].astype(np.float64)
    count = int(round((depth[-1] - depth[0]) / spacing)) + 1
    targets = depth[0] + spacing * np.arange(count)
    upper = np.clip(np.searchsorted(depth, targets - DICOM_POSITION_TOLERANCE), 1, n - 1)
    weight = np.clip((targets - depth[upper - 1]) / (depth[upper] - depth[upper - 1]), 0.0, 1.0)
    regular = (1 - weight)[:, None, None] * array[upper - 1] + weight[:, None, None] * array[upper]
    dtype = sitk.GetArrayViewFromImage(img).dtype
    if np.issubdtype(dtype, np.integer):
        regular = np.round(regular)
    out = sitk.GetImageFromArray(regular.astype(dtype))
    out.SetSpacing((img.GetSpacing()[0], img.GetSpacing()[1], spacing))
    out.SetOrigin(tuple(positions[0]))
    out.SetDirection(tuple(np.column_stack([row, col, normal]).ravel()))
    gaps = [(float(a), float(b)) for a, b, st in zip(depth[:-1], depth[1:], steps)
            if abs(st - spacing) > DICOM_POSITION_TOLERANCE]
    warn(f"The DICOM series in {path} has missing or unevenly spaced slices ({len(gaps)} gaps, e.g. between "
         f"{gaps[0][0]:.2f} and {gaps[0][1]:.2f} mm along the slice normal); it was resampled onto a regular grid "
         f"of {count} slices {spacing:.3g} mm apart, filling the gaps by linear interpolation, so every acquired "
         "slice keeps its position.")
    return out


def _dicom_modality(reader: sitk.ImageSeriesReader) -> str | None:
    try:
        value = reader.GetMetaData(0, "0008|0060").strip().upper()
    except RuntimeError:
        return None
    return {"CT": "CT", "MR": "MR", "US": "US", "CR": "XR", "DX": "XR", "XA": "XR"}.get(value)


def _png_colour_type(path: Path) -> int | None:
    """The colour type of a PNG file's header (0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA; PNG
    specification, IHDR chunk), or None for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[25]
    return None


def read_volume(path, modality: str | None = None) -> Volume:
    """Read NIfTI, NRRD, MHA, PNG/TIFF or a folder holding one DICOM series into a :class:`Volume`."""
    path = Path(path)
    if not path.exists():
        raise FMOneShotError(f"No such file or folder: {path}.", "check the path (relative paths start "
                             f"from {Path.cwd()}).")
    if modality is not None and modality not in MODALITIES:
        raise FMOneShotError(f"Unknown modality {modality!r}.", f"use one of {', '.join(MODALITIES)}.")
    name = image_stem(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM's "No Series were found": said below, in one line
        try:
            series = reader.GetGDCMSeriesIDs(str(path))
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)
        if not series:
            raise FMOneShotError(f"The folder {path} holds no DICOM series.",
                                 "point to a folder with the .dcm files of one series, or to an image file.")
        if len(series) > 1:
            raise FMOneShotError(f"The folder {path} holds {len(series)} DICOM series ({', '.join(series)}).",
                                 "put each series in a folder of its own and pass that folder.")
        files = reader.GetGDCMSeriesFileNames(str(path), series[0])
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        reader.LoadPrivateTagsOn()
        try:
            img = reader.Execute()
        except RuntimeError as exc:
            raise FMOneShotError(f"Cannot read the DICOM series in {path}: {exc}".strip(),
                                 "check that the files are complete DICOM images of one series.") from None
        modality = modality or _dicom_modality(reader)
        img = _regular_slices(img, reader, len(files), path)
    else:
        try:
            _check_nifti_complete(path)
            img = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            if _png_colour_type(path) == 4:  # SimpleITK reads no grey + alpha PNG
                raise FMOneShotError(f"{path} is a PNG with grey and alpha (transparency) per pixel, which FMOneShot "
                                     "does not read: it works on one grey value per pixel.",
                                     "save it as a greyscale PNG without the alpha channel.") from None
            reason = str(exc).strip().splitlines()[-1].replace("sitk::ERROR:", "").strip() if str(exc).strip() else ""
            raise FMOneShotError(f"Cannot read {path} as an image" + (f" (SimpleITK: {reason})." if reason else "."),
                                 "give a NIfTI (.nii/.nii.gz), NRRD, MHA, PNG or TIFF file, or a DICOM folder.") from None
    vol = Volume.from_sitk(img, name=name, modality=modality, source=str(path))
    n_missing = count_non_finite(vol.array)
    if n_missing:
        warn(f"{path}: {n_missing} of {vol.array.size} voxels are NaN or infinite; they are treated as missing "
             "(left out of the intensity window, background in the features).")
    if vol.modality is None:
        vol.modality = guess_modality(vol.array)
    return vol


def _check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI file (.nii, .nii.gz) that ends before its voxels do: SimpleITK reads a cut-short file
    without an error and makes up the missing voxels, so a half-copied volume would be segmented as if whole.
    The size it must have is the header's ``vox_offset`` plus the product of ``dim[1..dim[0]]`` times
    ``bitpix`` / 8 bytes (NIfTI-1 and NIfTI-2 standards), read with SimpleITK's ``ReadImageInformation``;
    a .nii.gz is decompressed as a stream to count its bytes (a damaged gzip stream counts as cut short).
    Other formats are left to SimpleITK, whose NRRD and MetaImage readers refuse short files themselves.
    Raises FMOneShotError naming the file, the bytes expected and found, and the fix."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # a RuntimeError here is the caller's "cannot read" message
    keys = set(reader.GetMetaDataKeys())
    if not {"vox_offset", "bitpix", "dim[0]"} <= keys:
        return
    n_dims = int(reader.GetMetaData("dim[0]"))
    voxels = int(np.prod([int(reader.GetMetaData(f"dim[{k}]")) for k in range(1, n_dims + 1)]))
    expected = int(float(reader.GetMetaData("vox_offset"))) + voxels * int(reader.GetMetaData("bitpix")) // 8
    if name.endswith(".gz"):
        import gzip
        import zlib

        found = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    found += len(chunk)
        except (EOFError, OSError, zlib.error):
            found = min(found, expected - 1)  # the stream ends early or is damaged
    else:
        found = path.stat().st_size
    if found < expected:
        raise FMOneShotError(f"{path} is cut short: its header promises {expected} bytes of NIfTI data, the file "
                             f"holds {found} (an interrupted copy or download?).",
                             "copy or export the file again, completely.")


def count_non_finite(array: np.ndarray) -> int:
    """The number of NaN and +-inf values (0 for integer arrays, which cannot hold them)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.inexact):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def finite_values(array: np.ndarray) -> np.ndarray:
    """The array's values without NaN and +-inf, flattened (the array itself, flattened, when all are finite)."""
    flat = np.asarray(array).ravel()
    if np.issubdtype(flat.dtype, np.inexact):
        ok = np.isfinite(flat)
        if not ok.all():
            return flat[ok]
    return flat


def guess_modality(array: np.ndarray) -> str | None:
    """CT when the values look like Hounsfield units (air near -1000); otherwise unknown (None).
    Non-finite values are ignored."""
    if not np.issubdtype(np.asarray(array).dtype, np.number):
        return None
    values = finite_values(array)
    if values.size and float(np.min(values)) < -500:
        return "CT"
    return None


def _check_output(path: Path, force: bool) -> None:
    if not any(str(path).endswith(ext) for ext in LABEL_EXTENSIONS):
        raise FMOneShotError(f"Cannot tell the file format of {path}.",
                             f"end the file name with one of {', '.join(LABEL_EXTENSIONS)}.")
    refuse_existing([path], force)
    if not path.parent.exists():
        raise FMOneShotError(f"The folder {path.parent} does not exist.", "create it first or choose another.")


def write_volume(volume: Volume, path, force: bool = False, compress: bool = True) -> Path:
    """Write ``volume`` with its geometry. Refuses to overwrite unless ``force``, and always refuses to write
    over ``volume.source`` (the file it, or the image it was derived from, was read from); never leaves half a
    file."""
    path = Path(path)
    _check_output(path, force)
    refuse_inputs([path], [volume.source or None], "the output")
    img = volume.to_sitk()
    ext = next(e for e in LABEL_EXTENSIONS if str(path).endswith(e))
    if ext == ".png" and volume.array.dtype != np.uint8:
        img = sitk.Cast(img, sitk.sitkUInt8)
    with atomic_paths(path) as tmp:
        sitk.WriteImage(img, str(tmp), compress)
    return path


def label_volume(reference: Volume, labels: np.ndarray, name: str | None = None) -> Volume:
    """A label volume (uint8, or uint16 beyond 255 labels) on the grid of ``reference``."""
    labels = np.asarray(labels)
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    out = reference.like(labels.astype(dtype), name=name)
    out.modality = None
    return out


def grid_mismatch(a: Volume, b: Volume) -> float:
    """How far apart the voxel grids of ``a`` and ``b`` lie, in voxels of ``b``: over the 8 corner voxels of
    ``a``'s grid, the largest distance between the index a voxel has in ``a`` and the continuous index its
    physical centre has in ``b``. 0 for identical grids; below 0.5 every voxel centre of ``a`` falls inside
    the voxel of ``b`` with the same index. ``inf`` when the shapes differ."""
    if a.array.shape != b.array.shape:
        return float("inf")
    size = np.array(a.array.shape[::-1]) - 1  # (x, y, z) index of the last voxel
    corners = np.array([[i, j, k] for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])], float)
    return float(np.abs(b.physical_to_index(a.index_to_physical(corners)) - corners).max())


def _default_geometry(volume: Volume) -> bool:
    """Whether the volume carries no geometry of its own (what numpy arrays saved without one get)."""
    return (np.allclose(volume.origin, 0) and np.allclose(volume.spacing, 1)
            and np.allclose(volume.direction, np.eye(3)))


def labels_on_grid(labels: Volume, reference: Volume, what: str = "The mask") -> np.ndarray:
    """The integer labels of ``labels`` on the voxel grid of ``reference``, matched by physical position.

    When the two grids agree within half a voxel (:func:`grid_mismatch` < 0.5) the array is taken as it is.
    Otherwise the labels are resampled onto ``reference``'s grid by nearest neighbour (SimpleITK
    ``Resample``, identity transform; voxels outside ``labels`` are 0) and the mismatch is reported with
    :func:`errors.warn`. Both are treated as 3D grids (a 2D image lies in the plane z = 0).

    Returns a (z, y, x) array of ``reference``'s shape with ``labels``' integer dtype (float labels holding
    whole numbers become int32). Raises FMOneShotError, naming ``what``, when the labels are not whole
    numbers (NaN, 5.9) or when their grid does not overlap ``reference``'s at all.
    """
    array = np.asarray(labels.array)
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)) \
                or not np.array_equal(array, np.round(array)):
            raise FMOneShotError(f"{what} holds values that are not whole numbers (a probability map, or NaN); "
                                 "a mask or label image holds 0 for background and whole label values.",
                                 "threshold it into a label image first, e.g. (probability > 0.5).")
        array = array.astype(np.int32)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    mismatch = grid_mismatch(reference, labels)
    if mismatch < 0.5:
        return array
    if array.min(initial=0) < 0:
        raise FMOneShotError(f"{what} holds negative values ({int(array.min())}).",
                             "give a label image with 0 for background and positive label values.")
    flat = replace(labels, array=array.astype(np.uint32) + 1, is_2d=False)  # 0 marks "outside the labels"
    grid = replace(reference, array=np.zeros(reference.array.shape, np.uint8), is_2d=False)
    moved = sitk.GetArrayFromImage(sitk.Resample(flat.to_sitk(), grid.to_sitk(), sitk.Transform(),
                                                 sitk.sitkNearestNeighbor, 0, sitk.sitkUInt32))
    covered = moved > 0
    if not covered.any():
        raise FMOneShotError(f"{what} does not overlap its image: in physical space (origin, spacing, direction) "
                             f"the two lie apart (mask origin {np.round(labels.origin, 2).tolist()} mm, image origin "
                             f"{np.round(reference.origin, 2).tolist()} mm).",
                             "give the mask that was drawn on this image, saved with the image's geometry"
                             + (" (this one has none of its own: origin 0, spacing 1; give it the image's, e.g. "
                                "with SimpleITK's CopyInformation)." if _default_geometry(labels) else "."))
    how = (f"its voxel grid is {mismatch:.1f} voxels off the image's" if np.isfinite(mismatch) else
           f"its grid ({array.shape[::-1]} voxels) differs from the image's ({reference.array.shape[::-1]})")
    share = covered.mean()
    warn(f"{what}: {how}; it was resampled onto the image's grid by physical position (nearest neighbour)"
         + (f", and covers {100 * share:.0f}% of the image." if share < 1 else "."))
    return np.where(covered, moved - 1, 0).astype(array.dtype)


# --------------------------------------------------------------------------- intensities
def intensity_window(volume_or_array, modality: str | None = None) -> tuple:
    """The (low, high) intensities mapped to 0 and 1, chosen by modality.

    CT: the fixed soft-tissue window, so Hounsfield units mean the same in every scan. MR, US, XR and
    unknown: the 0.5 and 99.5 percentiles of the whole volume (not of one slice, so that slices of one
    volume stay comparable), of its finite values only (NaN and +-inf are missing values). A volume without
    contrast (one value, or no finite value) gets a window of width 1 starting at that value (0 when none).
    """
    array = volume_or_array.array if isinstance(volume_or_array, Volume) else np.asarray(volume_or_array)
    if modality is None and isinstance(volume_or_array, Volume):
        modality = volume_or_array.modality
    if modality == "CT":
        return CT_WINDOW
    sample = array.ravel()
    if sample.size > 2_000_000:
        sample = sample[:: sample.size // 2_000_000 + 1]
    sample = finite_values(sample)
    if not sample.size:
        return 0.0, 1.0
    lo, hi = np.percentile(sample.astype(np.float64), PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def normalize(array: np.ndarray, window: tuple) -> np.ndarray:
    """Map intensities linearly so that window[0] -> 0 and window[1] -> 1, clipped, as float32.
    Non-finite values (missing) become 0, the background. ``window`` must have window[1] > window[0]."""
    lo, hi = window
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise FMOneShotError(f"The intensity window {tuple(window)} is not a range (it needs low < high, finite).",
                             "give a window such as (-160, 240), or let FMOneShot choose it (image.intensity_window).")
    array = np.asarray(array)
    out = (array.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    if np.issubdtype(array.dtype, np.inexact):
        out[~np.isfinite(array)] = 0.0  # missing, not the values beyond float32 (those clip to 0 or 1)
    return np.clip(out, 0.0, 1.0, out=out)

