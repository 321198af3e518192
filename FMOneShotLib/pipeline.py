"""The one-shot chain: fit on the template once, then apply to every slice of any number of target volumes.

:meth:`OneShot.apply` runs one named stage after another, in the order the data flows:
  0. ``plan``: the target in the template's plane, the slices to do, the intensity window;
  1. ``align``, once per target: the template registered to the target (:mod:`align`, SimpleITK, Mattes
     mutual information); it places every template point, each label's region (the spatial prior) and each
     label's extent (the slices it may lie on) in the target;
  2. ``encode``, per batch of slices: features at the feature grid, standardised like the template's;
  3. ``localise``, per slice and label: correspondences of the template's positive and negative points
     (paper A, Eq. 1), searched within ``search_radius`` mm of their aligned positions (the whole slice with
     ``align="none"``); with an adapter (by default, trained on the painted masks or on the masks the
     segmenter draws from the template's clicks), its probability map gated by the aligned template region
     dilated by ``prior_margin`` mm, whose largest confident region decides whether the structure is on the
     slice at all (in a volume the segmenter then delineates the structure from the ungated map: the region is
     one slice's outline placed on every slice); without one, the mean
     similarity of the positive correspondences decides; on slices beyond the label's aligned extent widened by
     its tolerance, nothing is found;
  4. ``prompt``: ten random pixels of the region join the corresponding positive points (paper B);
  5. ``segment``: the segmenter turns the prompts into a mask; overlaps go to the more probable label;
  6. ``locate_landmarks``: each template landmark's windowed correspondence, refined on features of a crop
     around it at a finer grid than the whole slice allows, and last its intensity patch matched by
     normalised cross-correlation, coarse to fine (``match_landmark_patches``, the same for every backend);
     with an adapter chosen explicitly, the centre of the adapter's localised region of each landmark
     (paper B) instead;
  7. ``bound``, after the last slice, per label with an extent: found slices beyond the aligned extent are kept
     only where they continue the label found inside it, slice after slice, each as confident as the label
     is inside (the extent is a soft bound, :meth:`OneShot.bound`);
  8. ``clean_up``, after the last slice, per label: detections in connected components (over the processed
     slices) smaller than ``minor_components`` of the largest, or less confident than ``component_confidence``
     times the most confident of the others, are dropped, and those slices count as empty.

A trained adapter is stored in the template (``template.adapter``), so saving the template after ``fit`` keeps
it, and a later ``fit`` with the same backend and adapter reuses it instead of training again.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy import ndimage as ndi

from .adapters import Adapter, adapter_from_state, create_adapter, mask_to_grid, template_views
from .align import (DEFAULT_KIND, EXTENT_CONFIDENCE, EXTENT_MARGIN, EXTENT_TOLERANCE, MIN_SIDE, PRIOR_FALLOFF,
                    PRIOR_MARGIN, SEARCH_RADIUS, Alignment, agreement, check_kind, extent_uncertainty, resolve_kind)
from .align import align as align_images
from .correspond import Correspondence, FeatureStandardizer, correspond, match_patch, similarity_maps, upsample
from .errors import FMOneShotError
from .features import create_extractor, pixel_to_grid, sample_features
from .image import BLANK_SPREAD, Volume, intensity_window, label_volume, normalize
from .postprocess import drop_minor_components, keep_components
from .propagate import propagate_volume
from .segmenters import Segmenter, create_segmenter, resolve_segmenter
from .template import Template
from .threads import small_work


class Cancelled(Exception):
    """Raised inside :meth:`OneShot.apply` when the cancel callback says so; nothing is returned."""


@dataclass
class Landmark:
    name: str
    slice: int
    xy: tuple  # pixel (x, y) on that slice
    physical: tuple  # LPS mm
    confidence: float


@dataclass
class Result:
    """What one target volume gave: label volume, per-slice confidences and prompts, landmarks, timings."""

    labels: Volume
    label_names: list
    confidence: np.ndarray  # (n_slices, n_labels): mean probability / similarity behind each decision
    present: np.ndarray  # (n_slices, n_labels) bool
    prompts: dict = field(default_factory=dict)  # (slice, label) -> (positive (n, 2), negative (m, 2))
    # (slice, label) -> the raw correspondences of the template's positive and negative points (paper A's
    # Acc+ / Acc- are measured on these), on every slice processed, whether the label was found or not.
    matches: dict = field(default_factory=dict)
    landmarks: dict = field(default_factory=dict)  # name -> [Landmark per slice]
    timings: dict = field(default_factory=dict)

    def best_landmarks(self) -> dict:
        """Per landmark, the slice's correspondence with the highest confidence."""
        return {n: max(per_slice, key=lambda lm: lm.confidence) for n, per_slice in self.landmarks.items()}

    label_values: list = field(default_factory=list)
    # The slices that ``confidence``, ``present``, ``prompts`` and landmarks count: slice k is the plane
    # index[slice_axis] == k of the target volume (x=0, y=1, z=2), in the anatomical plane ``orientation``.
    orientation: str = "axial"
    slice_axis: int = 2

    # The align stage's registration of the template to this target, and per label with an extent the range
    # of slices (as above) it was searched on: its aligned extent widened by the tolerance (Placement.band).
    alignment: Alignment | None = None
    searched: dict = field(default_factory=dict)

    def mask(self, name: str) -> np.ndarray:
        """(z, y, x) bool mask of one label."""
        return self.labels.array == self.label_values[self.label_names.index(name)]


@dataclass
class Target:
    """One target as the stages see it (:meth:`OneShot.plan`): the volume as given, resliced in the template's
    plane along index axis ``axis``, the slices to process and the intensity window."""

    source: Volume
    volume: Volume
    axis: int
    todo: list
    window: tuple

    @property
    def pixel_area(self) -> float:
        """mm^2 of one pixel of a slice."""
        return float(self.volume.pixel_spacing[0] * self.volume.pixel_spacing[1])


@dataclass
class Placement:
    """The template placed in one target by the align stage: ``positive`` / ``negative`` label name -> (N, 2)
    aligned pixel (x, y) of each template point (the windows' centres; empty with ``align="none"``),
    ``landmarks`` (K, 2) or None, ``prior`` label -> (H, W) float32 weight in [0, 1] of the aligned template region
    (1 inside it, falling off beyond: :func:`_rasterise`) or None, ``slices``
    label -> (first, last) target slice its extent maps to, and ``band`` label -> (first, last) slices searched:
    ``slices`` widened by the tolerance (labels with an extent only; :meth:`OneShot.bound`)."""

    alignment: Alignment
    positive: dict = field(default_factory=dict)
    negative: dict = field(default_factory=dict)
    landmarks: np.ndarray | None = None
    prior: dict = field(default_factory=dict)
    slices: dict = field(default_factory=dict)
    # (K, 2, 2): per landmark, the alignment's local linear map of template pixel offsets to target pixel
    # offsets (finite differences at the landmark), or None: the pose the patch match samples the target in
    landmark_frames: np.ndarray | None = None
    band: dict = field(default_factory=dict)
    # True where ``prior`` is each structure's own outline mapped onto a 2D target: it bounds the segmented shape as
    # well as where the structure is looked for; False for a volume, where it is the template slice's outline placed
    # on every target slice, and bounds only where the structure is looked for (:meth:`OneShot.localise`)
    outline: bool = True


@dataclass
class Found:
    """What the localise stage found for one label on one slice: the correspondences of the positive and
    negative template points, whether the label is present, the confidence behind that decision, and with an
    adapter the probability map ``prior`` (H, W) the segmenter delineates from (gated by the aligned template region
    in 2D, the adapter's own in a volume: :attr:`Placement.outline`) and the localised ``region`` (H, W) bool
    (chosen within the aligned template region: the spatial prior)."""

    positive: Correspondence
    negative: Correspondence
    present: bool = False
    confidence: float = 0.0
    prior: np.ndarray | None = None
    region: np.ndarray | None = None

    @property
    def matches(self) -> tuple:
        return self.positive.xy, self.negative.xy


class _Clock:
    """Seconds per stage: ``with clock("features"): ...`` adds the block's wall time to ``seconds["features"]``."""

    def __init__(self):
        self.seconds = {"align": 0.0, "features": 0.0, "adapter": 0.0, "correspondence": 0.0, "segmenter": 0.0}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t


# Defaults of the alignment stages (docs/results.md has the measurements behind them).
CONSENSUS_MIN = 4  # landmarks needed to fit their consensus affine map (3 determine one)
CONSENSUS_RADIUS = 0.3  # the second search's radius, as a fraction of search_radius
REFINE_SIDE = 160  # template pixels a side of the crop a landmark is refined on (the offline grid's limit)
REFINE_WINDOW = 0.06  # the refined position lies within this fraction of the crop side of the coarse one
# The landmarks' last step, intensity patches matched by normalised cross-correlation over a Gaussian pyramid,
# coarse to fine: template pixels between samples at each level, and at every level a patch of 2 PATCH_HALF + 1
# samples a side searched within PATCH_RADIUS samples (so 48 template pixels at the coarsest level, where the
# patch spans 264). docs/results.md has the schedules tried.
PATCH_STEPS = (8, 4, 2, 1)
PATCH_HALF = 16
PATCH_RADIUS = 6
FRAME_STEP = 10.0  # template pixels: the finite-difference step of the alignment's local linear map
# The clean-up's second test: a 3D component less confident than this fraction of the label's most confident
# (not minor) component is dropped (postprocess.drop_minor_components; docs/results.md)
COMPONENT_CONFIDENCE = 0.9


class OneShot:
    """``OneShot(template).fit()`` once, then ``apply(volume)`` for each target volume."""

    def __init__(self, template: Template, backend: str = "offline", adapter: str | None = "auto",
                 segmenter: str | Segmenter = "auto", backend_options: dict | None = None, seed: int = 0,
                 prompt_points: int = 10, min_area_fraction: float = 0.03, min_similarity: float = 0.3,
                 adapter_options: dict | None = None, landmark_radius: float = 2.0,
                 segmenter_options: dict | None = None, minor_components: float = 0.25,
                 align: str = DEFAULT_KIND, search_radius: float = SEARCH_RADIUS, prior_margin: float | None = PRIOR_MARGIN,
                 extent_margin: float = EXTENT_MARGIN, refine_side: int = REFINE_SIDE,
                 patch_steps=PATCH_STEPS, propagate: bool = False, extent_tolerance: float = EXTENT_TOLERANCE,
                 prior_falloff: float = PRIOR_FALLOFF, component_confidence: float = COMPONENT_CONFIDENCE):
        self.template = template.validate()
        self.align_kind = check_kind(align)
        for what, value in (("search radius", search_radius), ("extent margin", extent_margin),
                            ("extent tolerance", extent_tolerance), ("prior falloff", prior_falloff),
                            ("prior margin", 0.0 if prior_margin is None else prior_margin)):
            if not value >= 0:
                raise FMOneShotError(f"The {what} is {value} mm.", f"give a {what} of 0 mm or more.")
        if not search_radius > 0:
            raise FMOneShotError(f"The search radius is {search_radius} mm.", "give a search radius above 0 mm.")
        self.search_radius = float(search_radius)  # mm around each aligned template point
        self.prior_margin = prior_margin  # mm the aligned template region is dilated by (None: no prior)
        # mm over which the prior's weight falls off beyond that margin at full uncertainty (0: a hard gate)
        self.prior_falloff = float(prior_falloff)
        self.extent_margin = float(extent_margin)  # mm added at both ends of an aligned extent
        # mm beyond an aligned extent's ends that the label's own evidence may carry it, at full uncertainty
        self.extent_tolerance = float(extent_tolerance)
        self.refine_side = int(refine_side)  # template pixels a side of a landmark's refinement crop (0: none)
        self.patch_steps = tuple(int(s) for s in (patch_steps or ()))  # (): no patch matching
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self.adapter_name = adapter
        self.adapter_options = dict(adapter_options or {})
        self.landmark_radius = landmark_radius  # feature cells: the ROI of a landmark for a landmark adapter
        self.landmark_adapter: Adapter | None = None
        self.adapter_reused = False
        if propagate:  # checked before any model is built
            kind = (resolve_segmenter(segmenter, segmenter_options)[0] if isinstance(segmenter, str)
                    else segmenter.name)
            if kind != "sam2":
                raise FMOneShotError(f"Propagation needs the SAM 2 segmenter, not {kind!r}.",
                                     "add --segmenter sam2 (with its weights), or drop --propagate.")
        self.segmenter = (create_segmenter(segmenter, **(segmenter_options or {})) if isinstance(segmenter, str)
                          else segmenter)
        # SAM 2 carries each label from its most confident slice through the volume (propagate.py)
        self.propagator = self.segmenter.propagator() if propagate else None
        self.seed = seed
        self.prompt_points = prompt_points
        self.min_area_fraction = min_area_fraction
        self.min_similarity = min_similarity
        # 3D clean-up: per label, detections in components under this fraction of the largest are dropped
        # (on CHAOS across subjects: empty slices left empty 35% -> 56%, Dice unchanged; docs/results.md)
        self.minor_components = minor_components
        if not 0 <= component_confidence <= 1:
            raise FMOneShotError(f"The component confidence is {component_confidence}.",
                                 "give a fraction from 0 (components judged by size alone) to 1.")
        # ... and those less confident than this fraction of the most confident one (docs/results.md)
        self.component_confidence = float(component_confidence)
        self.extractor = None
        self.adapter: Adapter | None = None
        self.fit_seconds = 0.0

    # ------------------------------------------------------------------ fit
    def _features(self, images: np.ndarray, pixel_spacing) -> torch.Tensor:
        with torch.inference_mode():
            return self.standardizer(self.extractor.extract(images, pixel_spacing))

    def fit(self) -> "OneShot":
        """Features of the template, its queries and masks, and the adapter (trained, or the saved one reused).
        Runs on one PyTorch thread except the model forwards (:mod:`FMOneShotLib.threads`)."""
        with small_work():
            return self._fit()

    def _fit(self) -> "OneShot":
        t0 = time.perf_counter()
        tpl = self.template
        self.extractor = create_extractor(self.backend, **self.backend_options)
        raw = [self.extractor.extract(normalize(s.image, s.window)[None], s.pixel_spacing)[0] for s in tpl.slices]
        self.standardizer = FeatureStandardizer.fit(raw, self.extractor.channel_weights(raw[0].shape[0]))
        std_feats = [self.standardizer(f) for f in raw]
        feats = [self.standardizer.for_similarity(f) for f in std_feats]
        names = tpl.label_names

        def queries(table_name):
            out = {}
            for name in names:
                q = [sample_features(f, getattr(s, table_name)[name], s.image.shape)
                     for s, f in zip(tpl.slices, feats) if len(getattr(s, table_name).get(name, ()))]
                out[name] = torch.cat(q) if q else torch.zeros(0, feats[0].shape[0])
            return out

        self.q_pos, self.q_neg = queries("positive"), queries("negative")
        self.q_landmarks = {}
        for s, f in zip(tpl.slices, feats):
            for name, xy in s.landmarks.items():
                self.q_landmarks.setdefault(name, []).append(sample_features(f, xy[None], s.image.shape))
        self.q_landmarks = {n: torch.cat(q).mean(0, keepdim=True) for n, q in self.q_landmarks.items()}
        # Template points as (x, y, slice index) of the template's plane, in the order of the queries: the
        # align stage places them in each target.
        def points(table_name):
            return {name: np.concatenate([np.c_[getattr(s, table_name)[name], np.full(len(getattr(s, table_name)[name]), s.index)]
                                          for s in tpl.slices if len(getattr(s, table_name).get(name, ()))] or [np.zeros((0, 3))])
                    for name in names}

        self.pos_points, self.neg_points = points("positive"), points("negative")
        self.lm_points = {n: np.mean([[*s.landmarks[n], s.index] for s in tpl.slices if n in s.landmarks], axis=0)
                          for n in self.q_landmarks}
        if self.q_landmarks and self.align_kind != "none" and self.refine_side:
            self._fit_crops()
        # per landmark: its first template slice in [0, 1] and the landmark's pixel (x, y) on it
        self._lm_patches, self._smooth_cache = {}, {}
        shown = {}
        for n in self.q_landmarks:
            s = next(s for s in tpl.slices if n in s.landmarks)
            if s.index not in shown:
                shown[s.index] = normalize(s.image, s.window).astype(np.float32)
            self._lm_patches[n] = (shown[s.index], np.asarray(s.landmarks[n], float))

        # Reference area of each label (mm^2) for the presence decision, from masks or the template clicks.
        # "auto" trains the classification adapter on the painted masks, or on the segmenter's masks from
        # the template's own clicks: on the sample CT, clicks alone gave liver/spleen Dice 0.54/0.50 without
        # an adapter and 0.55/0.73 with one.
        use_adapter = self.adapter_name not in (None, "none") and bool(names)
        self.template_masks = [self._template_masks(s, f) for s, f in zip(tpl.slices, feats)] if names else []
        self.reference_area = {}
        for i, name in enumerate(names):
            areas = [m[i].sum() * s.pixel_spacing[0] * s.pixel_spacing[1]
                     for s, m in zip(tpl.slices, self.template_masks) if m[i].any()]
            self.reference_area[name] = float(np.mean(areas)) if areas else 0.0
        if use_adapter:
            kind = "classification" if self.adapter_name == "auto" else self.adapter_name
            self.adapter = self._saved_adapter(kind)
            self.adapter_reused = self.adapter is not None
            if self.adapter is None:
                self.adapter = self._fit_adapter(kind, std_feats, self.template_masks)
                description, tensors = self.adapter.state()
                tpl.adapter = {"description": description, "backend": self.extractor.settings(), "labels": names}
                tpl.adapter_tensors = tensors
        if self.q_landmarks and self.adapter_name not in (None, "none", "auto"):
            # Landmarks as regions: a disc of landmark_radius feature cells around each landmark is its ROI.
            discs = []
            for s, f in zip(tpl.slices, std_feats):
                (H, W), (h, w) = s.image.shape, f.shape[1:]
                yy, xx = np.mgrid[:H, :W]
                radius = self.landmark_radius * max(H / h, W / w)
                discs.append(np.stack([(xx - s.landmarks[n][0]) ** 2 + (yy - s.landmarks[n][1]) ** 2 <= radius ** 2
                                       if n in s.landmarks else np.zeros((H, W), bool) for n in self.q_landmarks]))
            self.landmark_adapter = self._fit_adapter(self.adapter_name, std_feats, discs)
        self.fit_seconds = time.perf_counter() - t0
        return self

    def _fit_crops(self) -> None:
        """The landmarks' queries for :meth:`refine_landmarks`: features of a ``refine_side`` crop of the first
        template slice showing each landmark, standardised over those crops, sampled at the landmark."""
        crops, where = [], []
        names = list(self.q_landmarks)
        for n in names:
            s = next(s for s in self.template.slices if n in s.landmarks)
            crop, origin = _crop(normalize(s.image, s.window), s.landmarks[n], (self.refine_side,) * 2, self.refine_side)
            crops.append(crop)
            where.append(np.asarray(s.landmarks[n]) - origin)
            self._lm_spacing = tuple(s.pixel_spacing)
        with torch.inference_mode():
            raw = self.extractor.extract(np.stack(crops), self._lm_spacing)
        self.crop_standardizer = FeatureStandardizer.fit(list(raw), self.extractor.channel_weights(raw.shape[1]))
        grid = self.crop_standardizer.for_similarity(self.crop_standardizer(raw))
        shape = (self.refine_side, self.refine_side)
        self.q_crops = {n: sample_features(grid[k], where[k][None], shape) for k, n in enumerate(names)}

    def _fit_adapter(self, kind: str, std_feats: list, masks: list) -> Adapter:
        """A new adapter trained on the template slices' features and pixel masks (L, H, W) per slice, plus,
        when it augments, the features of every slice's :func:`template_views`."""
        adapter = create_adapter(kind, seed=self.seed, **self.adapter_options)
        feats, pixel_masks = list(std_feats), list(masks)
        if adapter.augment:
            for s, ms in zip(self.template.slices, masks):
                views = template_views(normalize(s.image, s.window), ms)
                feats += list(self._features(np.stack([image for image, _ in views]), s.pixel_spacing))  # one batch
                pixel_masks += [view_masks for _, view_masks in views]
        grids = [np.stack([mask_to_grid(m, f.shape[1:]) for m in ms]) for ms, f in zip(pixel_masks, feats)]
        return adapter.fit(feats, grids)

    def _saved_adapter(self, kind: str) -> Adapter | None:
        """The template's trained adapter when it was trained the same way on the same features, else None."""
        saved = self.template.adapter
        if not saved:
            return None
        # every option, defaults included: an adapter saved under other defaults (an older FMOneShot) retrains
        options = create_adapter(kind, seed=self.seed, **self.adapter_options).options()
        same = (saved["description"].get("adapter") == kind and saved.get("backend") == self.extractor.settings()
                and saved.get("labels") == self.template.label_names
                and saved["description"].get("options") == options)
        return adapter_from_state(saved["description"], self.template.adapter_tensors) if same else None

    def _template_masks(self, s, feats) -> np.ndarray:
        """(L, H, W): the painted mask of each label, else the segmenter's mask from the template's own clicks.
        The positive points of the other labels on the slice are negatives too: they lie in other structures."""
        out = []
        for name in self.template.label_names:
            if name in s.masks and s.masks[name].any():
                out.append(s.masks[name])
            elif len(s.positive.get(name, ())):
                image = normalize(s.image, s.window)
                others = [s.positive[o] for o in s.positive if o != name]
                negative = np.concatenate([s.negative.get(name, np.zeros((0, 2))), *others]).reshape(-1, 2)
                out.append(self.segmenter.segment(image, feats, s.positive[name], negative))
            else:
                out.append(np.zeros(s.image.shape, bool))
        return np.stack(out)

    # ------------------------------------------------------------------ apply
    def apply(self, volume: Volume, progress: Callable | None = None, cancel: Callable | None = None,
              slices=None) -> Result:
        """Run the chain on ``volume`` (all slices, or the indices in ``slices``), stage by stage.

        Slices are taken in the template's plane (``Template.orientation``: for a sagittal template, the
        volume's sagittal slices); the label volume comes back on the volume's own grid.
        ``progress(done, total)`` is called after each slice; ``cancel()`` returning True stops within one
        slice by raising :class:`Cancelled`. The stages, in the order the data flows: :meth:`plan`,
        :meth:`align` (once per target), then per batch of slices :meth:`encode`, and per slice and label
        :meth:`localise`, :meth:`prompt`, :meth:`segment`, then :meth:`locate_landmarks`, and last
        :meth:`bound` and :meth:`clean_up`. Blank slices (one grey value after normalisation: constant, all missing, or
        wholly outside the window) are left empty and give landmarks confidence 0. Runs on one PyTorch
        thread except the model forwards (:mod:`FMOneShotLib.threads`).
        """
        with small_work():
            return self._apply(volume, progress, cancel, slices)

    def _apply(self, volume: Volume, progress: Callable | None, cancel: Callable | None, slices) -> Result:
        if self.extractor is None:
            self.fit()
        target = self.plan(volume, slices)
        clock = _Clock()
        with clock("align"):
            placement = self.align(target)
        names, L = self.template.label_names, len(self.template.label_names)
        shape = target.volume.slice_shape
        labels = np.zeros(target.volume.array.shape, np.uint16)
        confidence = np.zeros((target.volume.n_slices, L))
        present = np.zeros((target.volume.n_slices, L), bool)
        prompts, matches, landmarks = {}, {}, {n: [] for n in self.q_landmarks}
        values = np.array([lb.value for lb in self.template.labels])
        batch = max(1, self.extractor.batch_size)
        done, blank_slices = 0, set()
        for start in range(0, len(target.todo), batch):
            chunk = target.todo[start:start + batch]
            images = normalize(target.volume.array[chunk], target.window)
            with clock("features"):
                std_feats, feats = self.encode(images, target.volume.pixel_spacing)
            with clock("adapter"):
                probs = self.adapter_maps(std_feats, shape)
                lm_probs = None if self.landmark_adapter is None else self.landmark_adapter.predict(std_feats)
            for b, z in enumerate(chunk):
                if cancel is not None and cancel():
                    raise Cancelled(f"cancelled at slice {z}")
                rng = np.random.default_rng(self.seed + z)
                scores = np.full((L,) + shape, -np.inf, dtype=np.float32)
                # a slice of one grey value (constant, all missing, or outside the window) holds nothing
                blank = float(np.ptp(images[b])) <= BLANK_SPREAD
                if blank:
                    blank_slices.add(z)
                for i, name in enumerate(names):
                    if blank:
                        matches[(z, name)] = (np.zeros((0, 2)), np.zeros((0, 2)))
                        continue
                    with clock("correspondence"):
                        found = self.localise(name, feats[b], None if probs is None else probs[b], placement, z,
                                              target)
                    matches[(z, name)] = found.matches
                    if not found.present:
                        continue
                    pos_xy, neg_xy = self.prompt(found, rng)
                    with clock("segmenter"):
                        mask = self.segment(images[b], feats[b], pos_xy, neg_xy, found.prior)
                    if mask.sum() * target.pixel_area < self.min_area_fraction * self.reference_area.get(name, 0.0):
                        continue
                    confidence[z, i], present[z, i] = found.confidence, True
                    prompts[(z, name)] = (pos_xy, neg_xy)
                    scores[i][mask] = found.prior[mask] if found.prior is not None else found.confidence
                if L:  # overlaps between labels go to the more probable label
                    best, hit = scores.argmax(axis=0), np.isfinite(scores.max(axis=0))
                    labels[z][hit] = values[best[hit]]
                if self.q_landmarks:
                    with clock("correspondence"):
                        for lm in self.locate_landmarks(images[b], feats[b], z, target, placement,
                                                        None if lm_probs is None else lm_probs[b]):
                            if blank:
                                lm.confidence = 0.0
                            landmarks[lm.name].append(lm)
                done += 1
                if progress is not None:
                    progress(done, len(target.todo))
        processed = sorted(set(target.todo) - blank_slices)
        self.bound(labels, present, confidence, placement, processed)
        self.clean_up(labels, present, confidence, processed)
        if self.propagator is not None:  # through every slice of the volume, from the labels' best slices
            with clock("propagation"):
                propagate_volume(self.propagator, lambda k: normalize(target.volume.array[k], target.window),
                                 labels, present, confidence, list(values))
        out = label_volume(target.source, Volume.unslice(labels, target.axis),
                           name=f"{target.volume.name}-labels" if target.volume.name else "labels")
        return Result(out, names, confidence, present, prompts, matches, landmarks, clock.seconds,
                      label_values=list(values), orientation=target.volume.orientation_of(2),
                      slice_axis=target.axis, alignment=placement.alignment, searched=placement.band)

    # The stages, in the order the data flows.
    def plan(self, volume: Volume, slices=None) -> "Target":
        """Stage 0: the target in the template's plane, the slices to process and its intensity window.
        Raises :class:`FMOneShotError` for slices outside the volume."""
        axis = volume.slice_axis(self.template.orientation)
        resliced = volume.resliced(axis)
        todo = list(range(resliced.n_slices)) if slices is None else [int(z) for z in slices]
        bad = [z for z in todo if not 0 <= z < resliced.n_slices]
        if bad:
            raise FMOneShotError(f"Slices {bad} are outside the volume (0 to {resliced.n_slices - 1}).",
                                 "choose slices inside the volume.")
        window = intensity_window(resliced, self.template.modality or resliced.modality)
        return Target(volume, resliced, axis, todo, window)

    def align(self, target: "Target") -> "Placement":
        """Stage 1, once per target: register the template to the target (:func:`align.align`) and place in it
        every template point (window centres, pixels of the target's slices), each label's region (the
        spatial prior) and each label's extent (the slices it may lie on).

        In 3D (the template knows its volume, both have ``align.MIN_SIDE`` slices or more) the template volume is registered
        to the target volume in LPS; otherwise the first template slice to the target slice of the same
        index, in 2D (each slice's own frame, pixels times spacing). ``align="none"``, or a volume registration
        that kept the identity (nothing beat the unregistered volumes): no windows, no prior (paper A's
        whole-slice search); an extent is still mapped through the geometry. A 2D registration that kept the
        identity places everything where the identity puts it. ``Placement.landmark_frames`` holds each
        landmark's local linear map (template pixel offsets -> target pixel offsets, finite differences of
        ``FRAME_STEP`` template pixels), the pose :meth:`match_landmark_patches` samples the target in. Each
        extent's band (the slices searched) adds ``extent_tolerance`` mm scaled by the mapping's uncertainty
        (:func:`align.extent_uncertainty`: 0 where template and target agree exactly) at both ends; with
        ``align="none"`` that uncertainty is taken from the volumes' agreement as their geometries place them
        (:func:`align.agreement`)."""
        tpl, source, volume = self.template, target.source, target.volume
        ref = tpl.volume
        in_3d = (ref is not None and not ref.is_2d and not source.is_2d and min(ref.array.shape) >= MIN_SIDE
                 and min(source.array.shape) >= MIN_SIDE)
        first = tpl.slices[0]
        if in_3d:
            fixed, moving = ref, source
            tpl_frame, tgt_frame = ref.resliced(ref.slice_axis(tpl.orientation)), volume
        else:
            k = min(first.index, volume.n_slices - 1)
            fixed = tpl_frame = Volume(first.image, tuple(first.pixel_spacing) + (1.0,), is_2d=True,
                                       modality=tpl.modality)
            moving = tgt_frame = Volume(volume.array[k], tuple(volume.pixel_spacing) + (1.0,), is_2d=True,
                                        modality=volume.modality)
        # auto: by the target, whatever frame is registered, and by whether an extent is to be placed in 3D
        kind = resolve_kind(self.align_kind, source.is_2d, extent=bool(tpl.extent) and in_3d)
        alignment = align_images(fixed, moving, kind, seed=self.seed)

        def place(points):  # template (x, y, slice index) -> target (x, y) pixels (and z index in 3D)
            pts = np.asarray(points, float).reshape(-1, 3)
            if not in_3d:
                pts = np.c_[pts[:, :2], np.zeros(len(pts))]
            return alignment.map_index(tpl_frame, tgt_frame, pts)

        # Where no registration beat leaving volumes as they are (kept "identity": a failed optimisation, or a
        # target posed quite differently, e.g. an oblique series), the template's physical positions say
        # nothing about the target's: search whole slices (paper A), as with align="none". Two 2D images that
        # nothing brings closer than the identity are in register as far as mutual information can tell (one
        # detector frame, as cephalograms): their windows lie where the identity puts them. (On ceph-xray a
        # registration that tied with the identity, NMI 1.1744 against 1.1762, sent ceph-006's landmarks to
        # whole-image searches: mean error 514 px instead of about 30 px.)
        windowed = kind != "none" and (alignment.kept != "identity" or alignment.dimension == 2)
        positive = {n: place(p)[:, :2] for n, p in self.pos_points.items()} if windowed else {}
        negative = {n: place(p)[:, :2] for n, p in self.neg_points.items()} if windowed else {}
        lm = place(np.stack([self.lm_points[n] for n in self.q_landmarks]))[:, :2] \
            if windowed and self.q_landmarks else None
        prior = {}
        if windowed and self.prior_margin is not None:
            # beyond the margin the prior's weight falls off over prior_falloff mm times the mapping's uncertainty:
            # a hard gate for the same volume, or with prior_falloff 0 (the default; docs/results.md)
            falloff = self.prior_falloff * extent_uncertainty(alignment)
            for i, name in enumerate(tpl.label_names):
                pts = np.concatenate([_mask_points(m[i], s.index) for s, m in zip(tpl.slices, self.template_masks)])
                prior[name] = _rasterise(place(pts)[:, :2], volume.slice_shape, volume.pixel_spacing,
                                         self.prior_margin, falloff) if len(pts) else None
        slices, band = {}, {}
        uncertainty = None
        for name, (a, b) in tpl.extent.items():
            if ref is not None and not ref.is_2d and not source.is_2d:
                ident = alignment if in_3d else Alignment("none", 3)
                frame = ref.resliced(ref.slice_axis(tpl.orientation))
                centre = self._label_centre(name)
                z = ident.map_index(frame, volume, [[*centre, a], [*centre, b]])[:, 2]
                if uncertainty is None and not self.extent_tolerance:
                    uncertainty = 0.0  # a hard bound: nothing to scale
                if uncertainty is None:
                    quality = ident.quality if ident.kind != "none" else agreement(ref, source)
                    uncertainty = extent_uncertainty(Alignment(ident.kind, 3, quality=quality))
            else:  # no template volume: slice indices as they are, their correspondence unknown
                z = np.array([a, b], float)
                uncertainty = 1.0
            margin = self.extent_margin / volume.spacing[2]
            slices[name] = (int(np.floor(z.min() - margin)), int(np.ceil(z.max() + margin)))
            slack = int(np.ceil(self.extent_tolerance * uncertainty / volume.spacing[2] - 1e-9))
            band[name] = (slices[name][0] - slack, slices[name][1] + slack)
        frames = None
        if lm is not None:
            at = np.stack([self.lm_points[n] for n in self.q_landmarks])
            d = FRAME_STEP
            frames = np.stack([(place(at + [d, 0, 0])[:, :2] - lm) / d, (place(at + [0, d, 0])[:, :2] - lm) / d], -1)
        return Placement(alignment, positive, negative, lm, prior, slices, landmark_frames=frames, band=band,
                         outline=source.is_2d)

    def encode(self, images: np.ndarray, pixel_spacing) -> tuple:
        """Stage 2: slices (B, H, W) in [0, 1] -> (standardised features, features for similarity), each
        (B, C, h, w) at the backend's grid (standardised as the template's: :class:`FeatureStandardizer`)."""
        std_feats = self._features(images, pixel_spacing)
        return std_feats, self.standardizer.for_similarity(std_feats)

    def adapter_maps(self, std_feats: torch.Tensor, shape) -> np.ndarray | None:
        """The segmentation adapter's probabilities (B, L + 1, H, W) upsampled to pixels, or None."""
        if self.adapter is None:
            return None
        B, _, h, w = std_feats.shape
        probs = upsample(self.adapter.predict(std_feats).reshape(-1, h, w), shape)
        return probs.reshape(B, -1, *shape).numpy()

    def localise(self, name: str, feats: torch.Tensor, probs: np.ndarray | None, placement: "Placement", z: int,
                 target: "Target") -> "Found":
        """Stage 3, per slice and label: the correspondences of the label's template points (windowed around
        their aligned positions unless ``align="none"``), and with an adapter its localised region, chosen on
        its probabilities gated by the aligned template region (the prior), and its confidence, their mean over
        that region; ``Found.prior`` is what the segmenter delineates from (ungated in a volume:
        :attr:`Placement.outline`). Beyond the label's band (its aligned extent widened by the
        tolerance: :class:`Placement`) nothing is found.
        ``feats`` (C, h, w) for similarity; ``probs`` (L + 1, H, W) or None."""
        shape = target.volume.slice_shape
        i = self.template.label_names.index(name)
        pos = self._correspond(self.q_pos[name], feats, shape, placement.positive.get(name), target)
        neg = self._correspond(self.q_neg[name], feats, shape, placement.negative.get(name), target)
        found = Found(pos, neg)
        bounds = placement.band.get(name)
        if bounds is not None and not bounds[0] <= z <= bounds[1]:
            return found
        if probs is None:
            found.confidence = float(pos.score.mean()) if len(pos.xy) else 0.0
            found.present = found.confidence >= self.min_similarity
            return found
        # The gate decides where the label may be (its region, and so whether it is on the slice). Where it is the
        # structure's own outline (a 2D target), the segmenter delineates from the gated probabilities too; in a
        # volume it is one slice's outline placed on every slice, and the segmenter gets the adapter's own
        # probabilities: gated ones trim the structure wherever its cross-section outgrows that outline
        # (docs/results.md)
        found.prior = probs[i + 1]
        gate = placement.prior.get(name)
        if gate is not None:
            probs = probs.copy()
            probs[i + 1] = probs[i + 1] * gate
            if placement.outline:
                found.prior = probs[i + 1]
        region = self._region(probs, i, target.pixel_area, name)
        found.region = region
        found.present = bool(region.any())
        found.confidence = float(probs[i + 1][region].mean()) if found.present else 0.0
        return found

    def prompt(self, found: "Found", rng: np.random.Generator) -> tuple:
        """Stage 4: the segmenter's prompts (positive (n, 2), negative (m, 2) pixel x, y). With an adapter's
        region: the positive correspondences inside it plus ``prompt_points`` random pixels of it (paper B),
        the negative ones outside it; without one, the correspondences themselves (paper A)."""
        pos_xy, neg_xy = found.matches
        region = found.region
        if region is None:
            return pos_xy, neg_xy
        inside = region[np.round(pos_xy[:, 1]).astype(int), np.round(pos_xy[:, 0]).astype(int)] \
            if len(pos_xy) else np.zeros(0, bool)
        cells = np.argwhere(region)
        pick = cells[rng.choice(len(cells), min(self.prompt_points, len(cells)), replace=False)]
        pos_xy = np.concatenate([pos_xy[inside], pick[:, ::-1].astype(float)])
        if len(neg_xy):
            neg_xy = neg_xy[~region[np.round(neg_xy[:, 1]).astype(int), np.round(neg_xy[:, 0]).astype(int)]]
        return pos_xy, neg_xy

    def segment(self, image: np.ndarray, feats: torch.Tensor, positive: np.ndarray, negative: np.ndarray,
                prior: np.ndarray | None) -> np.ndarray:
        """Stage 5: the segmenter's (H, W) bool mask of ``image`` (H, W) in [0, 1] from the prompts."""
        return self.segmenter.segment(image, feats, positive, negative, prior=prior)

    def locate_landmarks(self, image: np.ndarray, feats: torch.Tensor, z: int, target: "Target",
                         placement: "Placement", lm_grid: torch.Tensor | None) -> list:
        """Stage 6, per slice: every template landmark on slice ``z``: its correspondence (windowed around the
        aligned position, then refined on a full-resolution crop: :meth:`refine_landmarks`), or with a
        landmark adapter the centre of its localised region (paper B). Returns [:class:`Landmark`]."""
        shape = image.shape
        names = list(self.q_landmarks)
        c = self._correspond(torch.cat([self.q_landmarks[n] for n in names]), feats, shape, placement.landmarks,
                             target, subpixel=True)  # without alignment, landmarks do not snap to feature cells
        xy, score = c.xy.copy(), c.score.copy()
        if placement.landmarks is not None and len(names) >= CONSENSUS_MIN:
            # The landmarks' consensus corrects the global alignment locally: an affine map fitted to the
            # found positions (robustly), then each landmark searched again within half the radius of it.
            template_xy = np.stack([self.lm_points[n][:2] for n in names])
            centres = _robust_affine(template_xy, xy)
            c = self._correspond(torch.cat([self.q_landmarks[n] for n in names]), feats, shape, centres, target,
                                 radius_scale=CONSENSUS_RADIUS)
            xy, score = c.xy.copy(), c.score.copy()
        if placement.landmarks is not None and self.refine_side:
            xy, score = self.refine_landmarks(image, feats, xy, target.volume.pixel_spacing)
        if placement.landmark_frames is not None and self.patch_steps:
            xy = self.match_landmark_patches(image, xy, placement.landmark_frames)
        lm_probs = None if lm_grid is None else upsample(lm_grid, shape).numpy()
        out = []
        for k, n in enumerate(names):
            (x, y), conf = xy[k], float(score[k])
            if lm_probs is not None:
                # paper B: the centre of the localised region; the correspondence where none is found
                region = localised_region(lm_probs, k)
                if region.any():
                    wts = lm_probs[k + 1][region]
                    ys, xs = np.nonzero(region)
                    x, y = float((xs * wts).sum() / wts.sum()), float((ys * wts).sum() / wts.sum())
                    conf = float(wts.mean())
            physical = tuple(target.volume.index_to_physical([x, y, z]).tolist())
            out.append(Landmark(n, z, (float(x), float(y)), physical, conf))
        return out

    def refine_landmarks(self, image: np.ndarray, feats: torch.Tensor, xy: np.ndarray, pixel_spacing) -> tuple:
        """Each landmark searched again on features of a crop of ``image`` (H, W) in [0, 1] around its
        position ``xy`` (N, 2), computed at a finer grid than the whole slice allows (``refine_side``
        template pixels a side, at the template's pixel size), within ``REFINE_WINDOW`` of the crop side of
        its centre. The crop's similarity is added to the whole slice's (``feats`` (C, h, w)), which keeps the
        context the crop lacks. Returns (xy (N, 2), confidence (N,): the summed similarity, 2 at most)."""
        names = list(self.q_landmarks)
        scale = np.asarray(self._lm_spacing) / np.asarray(pixel_spacing, float)  # target pixels per template pixel
        side = self.refine_side
        crops, origins = [], []
        for (x, y) in xy:
            crop, origin = _crop(image, (x, y), side * scale, side)
            crops.append(crop)
            origins.append(origin)
        with torch.inference_mode():
            grid = self.crop_standardizer(self.extractor.extract(np.stack(crops), self._lm_spacing))
            grid = self.crop_standardizer.for_similarity(grid)
        out_xy, out_score = np.zeros_like(xy), np.zeros(len(xy))
        centre = np.array([(side - 1) / 2, (side - 1) / 2])
        coarse = similarity_maps(torch.cat([self.q_landmarks[n] for n in names]), feats).numpy()
        # crop pixels: never farther than the search radius, nor than REFINE_WINDOW of the crop
        radius = min(side * REFINE_WINDOW, self.search_radius / float(np.max(self._lm_spacing)))
        u = np.arange(side, dtype=float)
        for k, n in enumerate(names):
            px = np.stack(np.meshgrid(origins[k][0] + u * scale[0], origins[k][1] + u * scale[1]), -1)
            g = pixel_to_grid(px, image.shape, coarse.shape[1:])
            bias = ndi.map_coordinates(coarse[k], [g[..., 1], g[..., 0]], order=1, mode="nearest")
            c = correspond(self.q_crops[n], grid[k], (side, side), centres=centre[None], radius=radius,
                           bias=torch.from_numpy(bias.astype(np.float32))[None])
            out_xy[k] = origins[k] + c.xy[0] * scale
            out_score[k] = c.score[0]
        return out_xy, out_score

    def match_landmark_patches(self, image: np.ndarray, xy: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """The landmarks' last step, the same for every backend: each landmark's intensity patch on its template
        slice matched in ``image`` (H, W) in [0, 1] by normalised cross-correlation
        (:func:`correspond.match_patch`), coarse to fine over ``patch_steps`` (template pixels between samples;
        at each level a patch of ``2 PATCH_HALF + 1`` samples searched within ``PATCH_RADIUS`` samples),
        starting from ``xy`` (N, 2) pixels, the target sampled in the pose ``frames`` (N, 2, 2) gives (the
        alignment's local linear map: template pixel offsets -> target pixel offsets). Each level smooths both
        images by half its step (a Gaussian pyramid level). It uses intensities only, so it is the same for
        every feature backend. With ``CONSENSUS_MIN`` landmarks or more, each is matched a second time from
        where the robust affine map of all the first answers puts it (the landmarks' shape corrects a patch
        that locked onto a look-alike), and the answer of higher final NCC is kept. Returns the new (N, 2)
        pixel positions."""
        names = list(self.q_landmarks)
        scale = float(np.mean(np.sqrt(np.abs(np.linalg.det(frames)))))  # target pixels per template pixel
        levels = []
        for step in self.patch_steps:
            smooth = 0.5 * step if step > 1 else 0.0
            levels.append((step, smooth, ndi.gaussian_filter(image, smooth * scale) if smooth else image))

        def matched(start):
            out, ncc = np.asarray(start, float).copy(), np.zeros(len(names))
            for step, smooth, target in levels:
                for k, n in enumerate(names):
                    out[k], ncc[k] = match_patch(self._smoothed(n, smooth), self._lm_patches[n][1], target, out[k],
                                                 frames[k], PATCH_HALF, PATCH_RADIUS, step)
            return out, ncc

        out, ncc = matched(xy)
        if len(names) >= CONSENSUS_MIN:
            template_xy = np.stack([self.lm_points[n][:2] for n in names])
            again, ncc2 = matched(_robust_affine(template_xy, out))
            better = ncc2 > ncc
            out[better] = again[better]
        return out

    def _smoothed(self, name: str, sigma: float) -> np.ndarray:
        """The landmark's template slice in [0, 1], smoothed by ``sigma`` pixels (cached per slice and sigma)."""
        image = self._lm_patches[name][0]
        key = (id(image), sigma)
        if key not in self._smooth_cache:
            self._smooth_cache[key] = ndi.gaussian_filter(image, sigma) if sigma else image
        return self._smooth_cache[key]

    def _correspond(self, queries: torch.Tensor, feats: torch.Tensor, shape, centres, target: "Target",
                    radius_scale: float = 1.0, subpixel: bool = False):
        """Correspondences of ``queries``; windowed (``search_radius`` mm times ``radius_scale``) around
        ``centres`` when given, else over the whole slice (with ``subpixel``: the continuous argmax)."""
        if not len(queries):
            return Correspondence(np.zeros((0, 2)), np.zeros(0))
        if centres is None:
            return correspond(queries, feats, shape, subpixel=subpixel)
        mm = self.search_radius * radius_scale
        radius = (mm / target.volume.pixel_spacing[0], mm / target.volume.pixel_spacing[1])
        return correspond(queries, feats, shape, centres=centres, radius=radius)

    def _label_centre(self, name: str) -> tuple:
        """(x, y) pixel centre of a label on the first template slice that shows it (mask, else clicks)."""
        i = self.template.label_names.index(name)
        for s, m in zip(self.template.slices, self.template_masks):
            if m[i].any():
                ys, xs = np.nonzero(m[i])
                return float(xs.mean()), float(ys.mean())
        s = self.template.slices[0]
        return (s.image.shape[1] - 1) / 2, (s.image.shape[0] - 1) / 2

    def bound(self, labels: np.ndarray, present: np.ndarray, confidence: np.ndarray, placement: "Placement",
              done: list) -> None:
        """Stage 7: each label's aligned extent as a soft bound, in place. ``labels`` (n_slices, H, W) label
        values, ``present`` / ``confidence`` (n_slices, n_labels), ``done`` the processed slices in order.

        An extent mapped by a registration alone misses the structure's true ends (across CHAOS subjects by up
        to 9 slices), and the label found on every slice of the band would bring back the neighbouring organs
        beyond them. So the two are combined: inside the aligned extent (``placement.slices``) the findings stay
        as they are; outside it (within ``placement.band``) a slice keeps the label only while, walking outwards
        from the extent over the processed slices, every slice has it with a confidence of at least
        :data:`align.EXTENT_CONFIDENCE` times the upper quartile of its confidences inside the extent; a walk
        starts only where the extent's end slice has the label. The first slice without it, or less confident,
        ends the walk; every slice beyond loses the label. A label not
        found inside its extent is dropped from the whole band."""
        done = [z for z in done if present.shape[0] > z >= 0]
        for i, lb in enumerate(self.template.labels):
            ends = placement.slices.get(lb.name)
            if ends is None or not done:
                continue
            first, last = ends
            inside = [z for z in done if first <= z <= last and present[z, i]]
            keep = set(inside)
            if inside:
                floor = EXTENT_CONFIDENCE * float(np.percentile(confidence[inside, i], 75))
                below = [z for z in done if z <= last]  # the walks start where the label is found inside
                above = [z for z in done if z >= first]
                walks = ([z for z in done if z > last] if below and below[-1] in keep else [],
                         [z for z in reversed(done) if z < first] if above and above[0] in keep else [])
                for walk in walks:
                    for z in walk:
                        if not (present[z, i] and confidence[z, i] >= floor):
                            break
                        keep.add(z)
            for z in done:
                if present[z, i] and z not in keep:
                    labels[z][labels[z] == lb.value] = 0
                    present[z, i], confidence[z, i] = False, 0.0

    def clean_up(self, labels: np.ndarray, present: np.ndarray, confidence: np.ndarray, done: list) -> None:
        """Stage 8: per label, drop the detections in minor 3D components, in place: those under
        ``minor_components`` of the largest, and those less confident than ``component_confidence`` times the
        most confident of the others (:func:`postprocess.drop_minor_components`, judged by ``confidence``, the
        per-slice confidence behind each detection). Processed slices at most two apart are neighbours (a
        skipped slice, such as the template's own, does not split a structure); runs farther apart (sampled
        slices) are cleaned each on its own."""
        if self.minor_components <= 0 or not done:
            return
        cuts = [k + 1 for k in range(len(done) - 1) if done[k + 1] - done[k] > 2]
        for run in np.split(np.asarray(done), cuts):
            stack = labels[run]
            for i, lb in enumerate(self.template.labels):
                mine = stack == lb.value
                kept = drop_minor_components(mine, self.minor_components, confidence[run, i],
                                             self.component_confidence)
                stack[mine & ~kept] = 0
                gone = run[present[run, i] & ~kept.any(axis=(1, 2))]
                present[gone, i], confidence[gone, i] = False, 0.0
            labels[run] = stack

    def _region(self, probs: np.ndarray, i: int, pixel_area: float, name: str) -> np.ndarray:
        """The adapter's localised region of label i, or nothing when it is too small to be the structure."""
        region = localised_region(probs, i)
        if region.sum() * pixel_area < self.min_area_fraction * self.reference_area.get(name, 0.0):
            return np.zeros_like(region)
        return region


def localised_region(probs: np.ndarray, i: int) -> np.ndarray:
    """(L + 1, H, W) adapter probabilities -> the most probable component where label i wins the argmax
    with a probability above 0.5 (paper B's connected-component step); empty when it wins nowhere."""
    win = (probs.argmax(axis=0) == i + 1) & (probs[i + 1] > 0.5)
    return keep_components(win, weights=probs[i + 1]) if win.any() else win


def _mask_points(mask: np.ndarray, index: int, most: int = 4000) -> np.ndarray:
    """Pixels of a (H, W) mask as (x, y, index) rows, thinned evenly to at most ``most`` of them."""
    ys, xs = np.nonzero(mask)
    step = max(1, int(np.ceil(len(xs) / most)))
    return np.c_[xs[::step], ys[::step], np.full(len(xs[::step]), index)].astype(float)


def _rasterise(xy: np.ndarray, shape, pixel_spacing, margin_mm: float, falloff_mm: float = 0.0) -> np.ndarray:
    """The (H, W) float32 weight in [0, 1] of the region of the points ``xy`` (N, 2, pixels; a thinned region
    mapped by the alignment) dilated by ``margin_mm``: 1 on pixels within the margin (plus the points' own
    spacing, to close gaps) of a point and in the holes that region encloses; beyond it, ``d`` mm further out
    (Euclidean distance transform in mm, ``scipy.ndimage.distance_transform_edt`` with ``pixel_spacing``
    (x, y) mm), ``exp(-(d / falloff_mm)^2)``, or 0 with ``falloff_mm`` 0 (a hard 0/1 gate). All 0 when no
    point falls on the slice."""
    H, W = shape
    hit = np.zeros((H, W), bool)
    ij = np.round(xy[:, ::-1]).astype(int)
    inside = (ij[:, 0] >= 0) & (ij[:, 0] < H) & (ij[:, 1] >= 0) & (ij[:, 1] < W)
    hit[ij[inside, 0], ij[inside, 1]] = True
    if not hit.any():
        return np.zeros((H, W), np.float32)
    gap = np.sqrt(np.prod(np.ptp(xy, axis=0) + 1) / max(len(xy), 1))  # typical distance between points
    dist = ndi.distance_transform_edt(~hit, sampling=(pixel_spacing[1], pixel_spacing[0]))
    reach = margin_mm + gap * max(pixel_spacing)
    region = ndi.binary_fill_holes(dist <= reach)
    if not falloff_mm > 0:
        return region.astype(np.float32)
    weight = np.exp(-(np.maximum(dist - reach, 0.0) / falloff_mm) ** 2)
    return np.where(region, 1.0, weight).astype(np.float32)


def _crop(image: np.ndarray, centre, size, side: int) -> tuple:
    """A ``size`` (sx, sy pixels) crop of ``image`` (H, W) centred on ``centre`` (x, y), resampled to
    ``side`` x ``side`` pixels (edge pixels repeated beyond the border). Returns (crop, origin): crop pixel
    (u, v) shows image pixel ``origin + (u, v) * size / side``."""
    sx, sy = (float(size[0]), float(size[1]))
    # a whole-pixel origin, so that at the template's pixel size the crop's pixels are the image's own
    origin = np.round([centre[0] - (sx - sx / side) / 2, centre[1] - (sy - sy / side) / 2])
    xs = np.clip(origin[0] + np.arange(side) * sx / side, 0, image.shape[1] - 1)
    ys = np.clip(origin[1] + np.arange(side) * sy / side, 0, image.shape[0] - 1)
    crop = ndi.map_coordinates(image, np.meshgrid(ys, xs, indexing="ij"), order=1, mode="nearest")
    return crop.astype(np.float32), origin


def _robust_affine(src: np.ndarray, dst: np.ndarray, rounds: int = 3) -> np.ndarray:
    """``src`` (N, 2) mapped by the least-squares affine map to ``dst`` (N, 2), refitted ``rounds`` times
    without the points whose residual exceeds twice the median (iteratively trimmed least squares)."""
    A = np.c_[src, np.ones(len(src))]
    keep = np.ones(len(src), bool)
    for _ in range(rounds):
        coef, *_ = np.linalg.lstsq(A[keep], dst[keep], rcond=None)
        residual = np.linalg.norm(A @ coef - dst, axis=1)
        new = residual <= 2 * np.median(residual) + 1e-9
        if new.sum() < 3 or (new == keep).all():
            break
        keep = new
    return A @ coef
