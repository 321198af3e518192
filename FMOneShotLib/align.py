"""Anatomical alignment: register the template image to each target once, before any correspondence.

Across subjects the false answers of a whole-slice argmax (paper A, Eq. 1) are similar-looking anatomy
elsewhere; paper B names the cause, pose and protocol changes between template and target. A global
registration with SimpleITK removes most of it: the template (fixed image) is registered to the target
(moving image) with Mattes mutual information (Mattes et al. 2003, so that intensity and protocol changes
do not matter), initialised by the images' moments (``CenteredTransformInitializer(MOMENTS)``) and
optimised over a multi-resolution pyramid of downsampled images (shrink factors 4, 2, 1 over images of at
most :data:`WORK_SIDE` pixels a side). ITK's registration transform maps points of the fixed image to the
moving one, so the result maps template points (LPS mm) straight to target points (LPS mm).

Kinds (:data:`KINDS`): ``auto`` (the default: :func:`resolve_kind`), ``none`` (identity: paper A's chain), ``rigid``, ``similarity``, ``affine`` and
``bspline`` (an affine registration refined by a coarse B-spline free-form deformation, Rueckert et al.
1999, mesh of :data:`BSPLINE_MESH` nodes a side). 2D images are registered in 2D, volumes in 3D.

The quality figure is the normalised mutual information ``NMI = (H(A) + H(B)) / H(A, B)`` (Studholme et al.
1999) of the template and the target resampled onto it, on the downsampled grid: 1 for unrelated images, 2
for identical ones; :attr:`Alignment.quality_before` gives the same figure before registration (identity),
so that a caller sees what registration gained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import FMOneShotError
from .image import Volume, intensity_window, normalize
from .threads import SMALL_WORK_THREADS, itk_threads

KINDS = ("auto", "none", "rigid", "similarity", "affine", "bspline")
# "auto", the default, as measured (docs/results.md): affine for 2D images, where it brought the cephalometric
# NED from 0.273 to 0.032 and HC18's Dice from 0.132 to 0.139; none for volumes, where on CHAOS across
# subjects it lowered the mean Dice (0.648 -> 0.642) and a target posed quite differently (an oblique
# series) lost a structure; except where the template carries an extent, which only a registration places in
# another subject (CHAOS with --extent reference: organ-free slices left empty 0.835 over the organs with the
# affine registration, 0.754 with the geometry alone). Otherwise volumes are aligned when asked.
DEFAULT_KIND = "auto"


def resolve_kind(kind: str, is_2d: bool, extent: bool = False) -> str:
    """The kind that runs: ``auto`` is ``affine`` for a 2D image and for a volume registered in 3D to a template
    that carries an extent (``extent``), ``none`` for other volumes; others as given (checked by
    :func:`check_kind`)."""
    check_kind(kind)
    if kind == "auto":
        return "affine" if is_2d or extent else "none"
    return kind
# How the chain uses the alignment (pipeline.OneShot; docs/results.md has the measurements behind them).
SEARCH_RADIUS = 80.0  # mm: window around each aligned template point
PRIOR_MARGIN = 20.0  # mm: the aligned template region is dilated by this much before it gates the adapter
# Beyond that margin the prior's weight may fall off as exp(-(d / (PRIOR_FALLOFF * uncertainty))^2), d the mm beyond
# it and uncertainty the mapping's (extent_uncertainty: 0 for the same volume, where the gate stays hard, about
# 0.9 across CHAOS subjects), so that a finding just outside a misplaced region survives and far look-alikes do
# not. Off by default (0: a hard 0/1 gate): on CHAOS across subjects 10, 20 and 40 mm raised the mean Dice
# (0.645-0.647 against 0.642 with the hard gate) but left the spleen's organ-free slices empty less often than
# --align none (52-66% against 70%), the hard gate more often (72%); docs/results.md.
PRIOR_FALLOFF = 0.0
EXTENT_MARGIN = 0.0  # mm added beyond both ends of an aligned extent (0: the mapped ends, rounded outwards)
# An aligned extent is a soft bound (pipeline.OneShot.bound): beyond its ends, a label found on the slices next
# to it is kept while its confidence stays at EXTENT_CONFIDENCE of that inside, up to EXTENT_TOLERANCE mm
# scaled by the mapping's uncertainty (extent_uncertainty). On CHAOS across subjects the organs' ends mapped by
# the 3D affine registration missed the true ones by up to 9 slices (69 mm); docs/results.md.
EXTENT_TOLERANCE = 60.0
EXTENT_CONFIDENCE = 0.85
# Images are registered at most this many pixels a side (the finest pyramid level): the registration is
# global, and a cephalogram's 1340 x 1671 pixels would cost seconds per iteration at full size.
WORK_SIDE = 192
SHRINK = (4, 2, 1)
SMOOTH_MM_CELLS = (2.0, 1.0, 0.0)  # Gaussian sigma per level, in units of the level's (shrunk) pixels
BSPLINE_MESH = 4
HISTOGRAM_BINS = 32
MIN_SAMPLES = 10000
SAMPLING_FRACTION = 0.02  # of a large image's pixels drawn for the metric at each iteration (_sampling)
MIN_SIDE = 8  # images with fewer pixels a side (after downsampling) are not registered: the identity


def check_kind(kind: str) -> str:
    """``kind`` itself when it is one of :data:`KINDS`; otherwise an :class:`FMOneShotError`."""
    if kind not in KINDS:
        raise FMOneShotError(f"Unknown alignment {kind!r}.", f"choose one of: {', '.join(KINDS)}.")
    return kind


@dataclass
class Alignment:
    """The template -> target mapping of one target, and how well the images agree.

    ``transform`` is a SimpleITK transform of the template's physical space (LPS mm, 2 or 3 coordinates)
    into the target's; ``None`` is the identity. ``quality`` and ``quality_before``: normalised mutual
    information after and before registration (1 unrelated .. 2 identical). ``seconds``: wall time.
    """

    kind: str
    dimension: int
    transform: sitk.Transform | None = None
    quality: float = float("nan")
    quality_before: float = float("nan")
    seconds: float = 0.0
    # "registered"; "moments" or "identity" where the registration failed or lowered the NMI below theirs
    kept: str = "identity"

    def map_points(self, points) -> np.ndarray:
        """Template LPS points (N, 3) in mm -> target LPS points (N, 3). A 2D alignment maps x and y and
        keeps z (a 2D image lies in the plane z = its origin)."""
        pts = np.atleast_2d(np.asarray(points, dtype=float)).copy()
        if self.transform is None:
            return pts
        d = self.dimension
        for row in pts:
            row[:d] = self.transform.TransformPoint(tuple(float(v) for v in row[:d]))
        return pts

    def map_index(self, template: Volume, target: Volume, index) -> np.ndarray:
        """Continuous (x, y, z) indices (N, 3) of ``template`` -> those of ``target`` (their geometries
        turn indices into LPS mm and back: :meth:`Volume.index_to_physical`)."""
        physical = template.index_to_physical(np.atleast_2d(np.asarray(index, dtype=float)))
        return target.physical_to_index(self.map_points(physical))


def _sitk_image(volume: Volume, dimension: int) -> sitk.Image:
    """The volume normalised to [0, 1] by its modality's window, with its geometry, downsampled so that its
    longest side is at most :data:`WORK_SIDE` pixels (physical extent and position unchanged)."""
    array = normalize(volume.array, intensity_window(volume))
    image = volume.like(array).to_sitk() if dimension == 3 else Volume(
        array[0], volume.spacing, volume.origin, volume.direction, is_2d=True).to_sitk()
    size = np.array(image.GetSize())
    factor = max(1.0, float(size.max()) / WORK_SIDE)
    if factor <= 1.0:
        return image
    new_size = [max(1, int(round(s / factor))) for s in size]
    new_spacing = [sp * s / n for sp, s, n in zip(image.GetSpacing(), size, new_size)]
    # Shift the origin so that the new grid covers the same extent (pixel centres inside the old edges).
    direction = np.asarray(image.GetDirection()).reshape(dimension, dimension)
    half_old, half_new = np.asarray(image.GetSpacing()) / 2, np.asarray(new_spacing) / 2
    origin = np.asarray(image.GetOrigin()) + direction @ (half_new - half_old)
    smoothed = sitk.SmoothingRecursiveGaussian(image, [0.5 * (n - o) for n, o in zip(new_spacing, image.GetSpacing())])
    return sitk.Resample(smoothed, new_size, sitk.Transform(), sitk.sitkLinear, tuple(origin), new_spacing,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def normalized_mutual_information(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                                  bins: int = HISTOGRAM_BINS) -> float:
    """NMI ``(H(A) + H(B)) / H(A, B)`` (Studholme et al. 1999) of ``fixed`` and ``moving`` resampled onto it
    by ``transform``, over the fixed pixels that the moving image covers; 1 unrelated, 2 identical."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(moving)
    inside = sitk.Resample(ones, fixed, transform, sitk.sitkNearestNeighbor, 0.0)
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0)
    mask = sitk.GetArrayViewFromImage(inside) > 0
    a = sitk.GetArrayViewFromImage(fixed)[mask]
    b = sitk.GetArrayViewFromImage(warped)[mask]
    if a.size < 16:
        return 1.0
    joint, _, _ = np.histogram2d(a, b, bins=bins, range=[[0, 1], [0, 1]])
    p = joint / joint.sum()

    def entropy(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_ab = entropy(p)
    return (entropy(p.sum(1)) + entropy(p.sum(0))) / h_ab if h_ab > 0 else 2.0


def agreement(template: Volume, target: Volume) -> float:
    """NMI (:func:`normalized_mutual_information`) of two volumes (or two 2D images) as their geometries place
    them, without registration: what :attr:`Alignment.quality` is for ``kind="none"``. Both are normalised and
    downsampled as for :func:`align`; 1 for unrelated images, 2 for identical ones."""
    dimension = 2 if template.is_2d else 3
    fixed, moving = _sitk_image(template, dimension), _sitk_image(target, dimension)
    return normalized_mutual_information(fixed, moving, sitk.Transform(dimension, sitk.sitkIdentity))


def extent_uncertainty(alignment: Alignment) -> float:
    """How uncertain the slices an extent is mapped to are, as a fraction in [0, 1]: ``2 - NMI`` of the
    mapping's quality, 0 where template and target agree exactly (NMI 2: the same volume), 1 where they look
    unrelated (NMI 1) or the quality is unknown (NaN). Scales :data:`EXTENT_TOLERANCE` and
    :data:`PRIOR_FALLOFF`."""
    q = alignment.quality
    return 1.0 if not np.isfinite(q) else float(np.clip(2.0 - q, 0.0, 1.0))


def _sampling(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, seed: int) -> None:
    """Every pixel of a small image; a random :data:`SAMPLING_FRACTION` (at least :data:`MIN_SAMPLES`) of a
    large one. Measured on two CHAOS MR pairs (256x256x~30, 2-core machine, one run): 2% of the voxels gave
    the same NMI as a quarter (1.0973 / 1.0978 and 1.1145 / 1.1144) in 2.1-2.3 s instead of 20-26 s."""
    n = int(np.prod(fixed.GetSize()))
    if n <= 4 * MIN_SAMPLES:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        # SimpleITK reads a seed of 0 as "seed from the wall clock" (sitkWallClock): each run then drew other
        # samples, and the same pair registered differently from run to run. Shifted by one, seed 0 is a seed.
        reg.SetMetricSamplingPercentage(min(1.0, max(SAMPLING_FRACTION, MIN_SAMPLES / n)),
                                        int(seed) % (2 ** 31 - 2) + 1)


def _method(fixed: sitk.Image, iterations: int, seed: int) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    _sampling(reg, fixed, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(SHRINK))
    reg.SetSmoothingSigmasPerLevel(list(SMOOTH_MM_CELLS))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    return reg


def _linear(kind: str, dimension: int):
    if kind == "rigid":
        return sitk.Euler2DTransform() if dimension == 2 else sitk.Euler3DTransform()
    if kind == "similarity":
        return sitk.Similarity2DTransform() if dimension == 2 else sitk.Similarity3DTransform()
    return sitk.AffineTransform(dimension)


def align(template: Volume, target: Volume, kind: str = DEFAULT_KIND, iterations: int = 200,
          seed: int = 0) -> Alignment:
    """Register ``template`` (fixed) to ``target`` (moving): the mapping of template points to target points.

    Both are :class:`image.Volume` objects with their geometry (a 2D image: ``is_2d``; 2D with 2D, 3D with
    3D). Intensities are normalised by each volume's own window (:func:`image.intensity_window`), so the
    modality's scale does not matter; Mattes mutual information tolerates the rest. Returns an
    :class:`Alignment`; ``kind`` ``none`` returns the identity at no cost, and so does an image under
    :data:`MIN_SIDE` pixels a side (with ``kept="identity"``). The registration is kept where
    its NMI beats that of the moments' initial placement and of the identity; otherwise (a failed or diverged
    optimisation) the better of those two is returned, and ``Alignment.kept`` says which. Raises
    :class:`FMOneShotError` for an unknown kind or a 2D image aligned with a volume. The registration runs on
    one ITK thread with its random metric samples drawn from ``seed``: the same pair gives the same mapping.
    """
    if template.is_2d != target.is_2d:
        raise FMOneShotError("The template is a 2D image and the target a volume, or the reverse.",
                             "align 2D images with 2D images and volumes with volumes (or use --align none).")
    dimension = 2 if template.is_2d else 3
    kind = resolve_kind(kind, template.is_2d)
    if kind == "none":
        return Alignment("none", dimension)
    # One ITK thread for the registration alone (ITK's process-wide default, restored after it): small work
    # (threads.py), and on one thread the metric's sums, so the result, do not depend on the machine
    with itk_threads(SMALL_WORK_THREADS):
        return _register(template, target, kind, dimension, iterations, seed)


def _register(template: Volume, target: Volume, kind: str, dimension: int, iterations: int,
              seed: int) -> Alignment:
    """:func:`align`'s registration of a resolved ``kind`` other than ``none``."""
    t0 = time.perf_counter()
    fixed, moving = _sitk_image(template, dimension), _sitk_image(target, dimension)
    if min(fixed.GetSize()) < MIN_SIDE or min(moving.GetSize()) < MIN_SIDE:  # nothing to register
        return Alignment(kind, dimension, None, 2.0, 2.0, time.perf_counter() - t0, "identity")
    linear_kind = "affine" if kind == "bspline" else kind
    try:
        initial = sitk.CenteredTransformInitializer(fixed, moving, _linear(linear_kind, dimension),
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
    except RuntimeError:  # an empty image has no moments: its centre
        initial = sitk.CenteredTransformInitializer(fixed, moving, _linear(linear_kind, dimension),
                                                    sitk.CenteredTransformInitializerFilter.GEOMETRY)
    identity = sitk.Transform(dimension, sitk.sitkIdentity)
    quality_before = normalized_mutual_information(fixed, moving, identity)
    reg = _method(fixed, iterations, seed)
    reg.SetInitialTransform(initial, inPlace=False)
    try:
        transform = reg.Execute(fixed, moving)
    except RuntimeError:  # too little overlap, say: judged below with the other candidates
        transform = None
    if transform is not None and kind == "bspline":
        mesh = sitk.BSplineTransformInitializer(fixed, [BSPLINE_MESH] * dimension)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
        _sampling(reg, fixed, seed)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
        reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=50)
        reg.SetMovingInitialTransform(transform)
        reg.SetInitialTransform(mesh, inPlace=True)
        try:
            reg.Execute(fixed, moving)
            transform = sitk.CompositeTransform([transform, mesh])
        except RuntimeError:
            pass
    # The registration is kept where it agrees better with the target than its starting points do: a failed or
    # diverged optimisation falls back to the moments' initial placement, or to none at all.
    candidates = [(transform, "registered"), (initial, "moments"), (None, "identity")]
    scored = [(normalized_mutual_information(fixed, moving, t if t is not None else identity), t, how)
              for t, how in candidates if t is not None or how == "identity"]
    quality, transform, how = max(scored, key=lambda c: c[0])
    return Alignment(kind, dimension, transform, quality, quality_before, time.perf_counter() - t0, how)
