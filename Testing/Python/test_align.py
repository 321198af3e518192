"""The align stage: registrations with a known answer, the windowed search, extents, and the stages on their own."""

import dataclasses
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FMOneShotLib.align import EXTENT_TOLERANCE, Alignment, align, extent_uncertainty, resolve_kind
from FMOneShotLib.correspond import correspond
from FMOneShotLib.errors import FMOneShotError
from FMOneShotLib.features import create_extractor, sample_features
from FMOneShotLib.image import Volume
from FMOneShotLib.metrics import dice
from FMOneShotLib.pipeline import OneShot, Placement, _rasterise
from FMOneShotLib.template import Template


def phantom(shape, centre, scale=1.0, angle=0.0):
    """A 2D 'head': an ellipse with three inner structures of different brightness, placed at ``centre``
    (x, y pixels), scaled and rotated (radians) about it. Returns the image and a function giving where a
    phantom point (x, y in the unit frame, centred at 0) lies in the image."""
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    c, s = np.cos(angle), np.sin(angle)
    u = (c * (xx - centre[0]) + s * (yy - centre[1])) / scale
    v = (-s * (xx - centre[0]) + c * (yy - centre[1])) / scale
    img = 0.4 * ((u / 40) ** 2 + (v / 30) ** 2 <= 1)
    img += 0.5 * (((u + 15) / 8) ** 2 + ((v + 8) / 6) ** 2 <= 1)
    img += 0.3 * ((np.abs(u - 18) <= 6) & (np.abs(v - 5) <= 12))
    img += 0.2 * (((u) / 5) ** 2 + ((v - 20) / 4) ** 2 <= 1)

    def where(p):
        p = np.asarray(p, float)
        return np.stack([centre[0] + scale * (c * p[:, 0] - s * p[:, 1]),
                         centre[1] + scale * (s * p[:, 0] + c * p[:, 1])], 1)

    return img.astype(np.float32), where


@pytest.mark.parametrize("kind", ["similarity", "affine"])
def test_2d_registration_recovers_a_known_transform_within_one_pixel(kind):
    fixed, f_where = phantom((128, 128), (60, 66))
    moving, m_where = phantom((128, 128), (70, 58), scale=1.12, angle=0.15)
    tvol = Volume(fixed * 1000, spacing=(1.0, 1.0, 1.0), modality="MR")
    mvol = Volume(moving * 1000, spacing=(1.0, 1.0, 1.0), modality="MR")
    a = align(tvol, mvol, kind)
    probes = np.array([[-15, -8], [18, 5], [0, 20], [30, 0], [-30, 10]], float)
    found = a.map_index(tvol, mvol, np.c_[f_where(probes), np.zeros(len(probes))])[:, :2]
    assert np.abs(found - m_where(probes)).max() <= 1.0
    assert a.quality > a.quality_before and a.quality > 1.3
    assert a.seconds > 0 and a.dimension == 2


def test_3d_affine_registration_recovers_a_known_transform_within_one_mm():
    rng = np.random.default_rng(0)
    shape = (24, 48, 48)  # (z, y, x)
    zz, yy, xx = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(float)
    body = (((xx - 24) / 18) ** 2 + ((yy - 24) / 14) ** 2 + ((zz - 12) / 9) ** 2 <= 1) * 0.4
    body += (((xx - 18) / 5) ** 2 + ((yy - 20) / 4) ** 2 + ((zz - 10) / 3) ** 2 <= 1) * 0.5
    body += (((xx - 31) / 4) ** 2 + ((yy - 28) / 6) ** 2 + ((zz - 15) / 4) ** 2 <= 1) * 0.3
    body += rng.normal(0, 0.01, shape)
    spacing = (2.0, 2.0, 3.0)
    tvol = Volume(body.astype(np.float32) * 1000, spacing=spacing, origin=(-10, 5, 20), modality="MR")
    # The target: the template resampled under a known affine map (a shift, a 6% scale and a small shear).
    truth = sitk.AffineTransform(3)
    truth.SetMatrix((1.06, 0.03, 0.0, 0.0, 0.95, 0.02, 0.0, 0.0, 1.04))
    truth.SetTranslation((4.0, -3.0, 5.0))
    truth.SetCenter(tuple(tvol.index_to_physical([24, 24, 12])))
    img = tvol.to_sitk()
    # A target point p shows the template at truth(p), so template point q lies at truth^-1(q) in the target.
    moved = sitk.Resample(img, img, truth, sitk.sitkLinear, 0.0)
    mvol = Volume(sitk.GetArrayFromImage(moved), spacing=spacing, origin=(-10, 5, 20), modality="MR")
    a = align(tvol, mvol, "affine")
    inverse = truth.GetInverse()
    probes = tvol.index_to_physical(np.array([[18, 20, 10], [31, 28, 15], [24, 24, 12], [12, 30, 8]], float))
    expected = np.array([inverse.TransformPoint(tuple(p)) for p in probes])
    assert np.linalg.norm(a.map_points(probes) - expected, axis=1).max() <= 1.0  # mm
    assert a.dimension == 3 and a.quality > a.quality_before
    # 55296 voxels: the metric samples them at random, from the seed (0, the default: not the wall clock), so the
    # same pair registers the same way every time (on one ITK thread, whatever the caller's count)
    once, again = align(tvol, mvol, "affine"), align(tvol, mvol, "affine")
    assert np.array_equal(again.map_points(probes), once.map_points(probes)) and again.quality == once.quality


def test_align_refuses_mixed_dimensions_and_unknown_kinds():
    flat = Volume(np.zeros((16, 16), np.float32))
    deep = Volume(np.zeros((8, 16, 16), np.float32))
    with pytest.raises(FMOneShotError, match="2D image and the target a volume"):
        align(flat, deep)
    with pytest.raises(FMOneShotError, match="Unknown alignment 'elastic'"):
        align(flat, flat, "elastic")
    with pytest.raises(FMOneShotError, match="Unknown alignment"):
        textured = Volume(np.random.default_rng(0).random((8, 16, 16)).astype(np.float32))  # blank is refused
        OneShot(Template.from_volume(textured, 3, {"x": [[4, 4]]}), align="elastic")
    # auto: affine for 2D images and for volumes whose template carries an extent, none for other volumes
    assert [resolve_kind("auto", *a) for a in ((True,), (False,), (False, True))] == ["affine", "none", "affine"]
    assert resolve_kind("rigid", False, True) == "rigid"
    none = align(flat, flat, "none")
    assert none.transform is None and np.array_equal(none.map_points([[1.0, 2.0, 3.0]]), [[1.0, 2.0, 3.0]])


def test_windowed_search_finds_the_true_point_where_the_global_argmax_picks_a_decoy():
    """A feature grid where the template point's feature appears exactly far away (the decoy) and slightly
    changed where it belongs: the whole-slice argmax (paper A) takes the decoy, the window the true point."""
    gen = torch.Generator().manual_seed(0)
    C, h, w = 64, 24, 24
    grid = torch.randn(C, h, w, generator=gen)
    query = torch.randn(1, C, generator=gen)
    grid[:, 17:19, 19:21] = query[0, :, None, None]  # the decoy: cells x 19-20, y 17-18
    grid[:, 5:7, 4:6] = (query[0] + 0.5 * torch.randn(C, generator=gen))[:, None, None]  # true: x 4-5, y 5-6
    shape = (96, 96)  # 4 pixels per cell: cell (j, i) is centred on pixel (4 j + 1.5, 4 i + 1.5)
    whole = correspond(query, grid, shape)
    assert np.linalg.norm(whole.xy[0] - [79.5, 71.5]) <= 2.5  # the decoy
    windowed = correspond(query, grid, shape, centres=[[25.0, 30.0]], radius=16.0)
    assert np.linalg.norm(windowed.xy[0] - [19.5, 23.5]) <= 2.5  # the true point
    assert windowed.score[0] < whole.score[0]  # less similar, and its distance counts against it too
    farther = correspond(query, grid, shape, centres=[[30.0, 36.0]], radius=20.0)
    assert np.linalg.norm(farther.xy[0] - [19.5, 23.5]) <= 2.5 and farther.score[0] < windowed.score[0]


def test_extent_maps_through_a_known_shift_and_scale_along_the_slice_axis():
    """Template and target show the same body; the target's slices are 1.5x thicker and start 12 mm lower.
    The liver's extent (template slices 10-19) must land on the target slices covering the same mm."""
    rng = np.random.default_rng(1)
    def body(z_mm):  # slices (len(z_mm), 48, 48) of a body whose cross-section changes along z (mm)
        zz, yy, xx = np.meshgrid(np.asarray(z_mm, float), np.arange(48.0), np.arange(48.0), indexing="ij")
        out = (((xx - 24) / (14 + 4 * np.sin(zz / 20))) ** 2 + ((yy - 24) / 14) ** 2 <= 1) * 0.3
        out += (((xx - 18) / 6) ** 2 + ((yy - 20) / 5) ** 2 <= 1) * (np.abs(zz - 40) < 20) * 0.4
        out += (((xx - 30) / 4) ** 2 + ((yy - 28) / 4) ** 2 <= 1) * (np.abs(zz - 55) < 10) * 0.5
        return (out + rng.normal(0, 0.01, out.shape)).astype(np.float32) * 1000

    tvol = Volume(body(np.arange(40) * 2.0), spacing=(2.0, 2.0, 2.0), modality="MR")
    # Target slice k lies at 12 + 3 k mm of the template's frame, and its geometry says so.
    tgt = Volume(body(12.0 + 3.0 * np.arange(27)), spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 12.0), modality="MR")
    yy, xx = np.mgrid[0:48, 0:48]
    mask = ((xx - 18) / 6) ** 2 + ((yy - 20) / 5) ** 2 <= 1
    tpl = Template.from_volume(tvol, 15, {"liver": [[18, 20]]}, masks={"liver": mask})
    tpl.extent = {"liver": (10, 19)}  # 20 .. 38 mm
    for kind in ("none", "affine"):
        engine = OneShot(tpl, align=kind, extent_margin=0.0, segmenter="offline").fit()
        placement = engine.align(engine.plan(tgt))
        first, last = placement.slices["liver"]
        # 20 mm and 38 mm of the template lie at target slices (20 - 12) / 3 = 2.7 and (38 - 12) / 3 = 8.7
        assert first in (2, 3) and last in (8, 9), (kind, first, last)
    engine = OneShot(tpl, align="none", extent_margin=10.0, segmenter="offline").fit()  # 10 mm: 3.3 slices
    first, last = engine.align(engine.plan(tgt)).slices["liver"]
    assert (first, last) == (-1, 12)  # floor(2.67 - 3.33), ceil(8.67 + 3.33)


def test_stages_each_on_their_own():
    fixed, f_where = phantom((96, 96), (46, 50))
    moving, m_where = phantom((96, 96), (54, 44), scale=1.05, angle=0.1)
    points = f_where(np.array([[-15, -8], [18, 5]]))
    tvol = Volume(fixed * 1000, modality="MR")
    tgt = Volume(moving * 1000, origin=(5.0, -3.0, 0.0), modality="MR")
    mask = fixed > 0.85  # the brightest inner structure, as painted
    tpl = Template.from_volume(tvol, 0, {"spot": points[:1]}, {"spot": [[5.0, 5.0]]}, {"spot": mask},
                               landmarks={"a": points[0], "b": points[1]})
    engine = OneShot(tpl, segmenter="offline", search_radius=12.0).fit()
    # plan: the slices to do and the window, in the template's plane
    target = engine.plan(tgt)
    assert target.todo == [0] and target.volume is tgt and target.pixel_area == 1.0
    with pytest.raises(FMOneShotError, match="outside the volume"):
        engine.plan(tgt, slices=[3])
    # align: template points placed where the known transform puts them
    placement = engine.align(target)
    truth = m_where(np.array([[-15, -8], [18, 5]]))
    assert np.abs(placement.landmarks - truth).max() <= 1.5
    assert np.abs(placement.positive["spot"] - truth[:1]).max() <= 1.5
    # and the local pose the landmarks' patches are matched in: the known scale and rotation
    known = 1.05 * np.array([[np.cos(0.1), -np.sin(0.1)], [np.sin(0.1), np.cos(0.1)]])
    assert placement.landmark_frames.shape == (2, 2, 2) and np.abs(placement.landmark_frames - known).max() <= 0.03
    assert placement.prior["spot"][int(truth[0, 1]), int(truth[0, 0])] == 1 and placement.prior["spot"][5, 90] < 0.5
    # encode: the backend's grid, standardised
    images = (moving[None] - 0.0) / 1.4
    std_feats, feats = engine.encode(images, (1.0, 1.0))
    assert std_feats.shape[:2] == feats.shape[:2] and std_feats.shape[0] == 1
    # localise: the adapter's region around the aligned structure
    probs = engine.adapter_maps(std_feats, target.volume.slice_shape)
    found = engine.localise("spot", feats[0], probs[0], placement, 0, target)
    assert found.present and found.region[int(truth[0, 1]), int(truth[0, 0])]
    assert not (found.region & (placement.prior["spot"] < 0.5)).any()  # gated by the prior
    # the confidence is the gated probability over the region; on a 2D target the segmenter delineates from the
    # gated map (the prior is the structure's own outline), in a volume from the adapter's own (the prior is one
    # slice's outline on every slice: a structure outgrowing it there is not cut at its edge)
    gated = probs[0][1] * placement.prior["spot"]
    assert placement.outline and found.confidence == pytest.approx(float(gated[found.region].mean()))
    assert np.array_equal(found.prior, gated)
    in_volume = engine.localise("spot", feats[0], probs[0], dataclasses.replace(placement, outline=False), 0, target)
    assert np.array_equal(in_volume.prior, probs[0][1]) and np.array_equal(in_volume.region, found.region)
    assert in_volume.confidence == found.confidence
    # prompt: positive prompts inside the region, negative ones outside
    pos, neg = engine.prompt(found, np.random.default_rng(0))
    assert len(pos) and found.region[np.round(pos[:, 1]).astype(int), np.round(pos[:, 0]).astype(int)].all()
    # segment: the segmenter's mask holds the structure
    mask_out = engine.segment(images[0], feats[0], pos, neg, found.prior)
    structure = moving > 0.85
    assert (mask_out & structure).sum() / structure.sum() >= 0.7
    # landmarks: windowed around the aligned positions
    lms = engine.locate_landmarks(images[0], feats[0], 0, target, placement, None)
    assert [lm.name for lm in lms] == ["a", "b"]
    assert max(np.hypot(*(np.array(lm.xy) - t)) for lm, t in zip(lms, truth)) <= 5.0
    # clean up: a stray detection on a far slice is dropped
    labels = np.zeros((5, 8, 8), np.uint16)
    labels[0:3, 2:6, 2:6] = 1
    labels[4, 0, 0] = 1
    present = labels.any(axis=(1, 2))[:, None].copy()
    engine.clean_up(labels, present, present.astype(float), [0, 1, 2, 3, 4])
    assert not labels[4].any() and labels[0:3].any() and present[:, 0].tolist() == [True, True, True, False, False]


def test_the_prior_softens_with_the_registrations_uncertainty():
    """A structure found just outside a misplaced aligned region is kept when the mapping is uncertain (across
    subjects) and dropped when it is not (the same volume: a hard gate); a far look-alike is dropped either way."""
    image, where = phantom((96, 96), (48, 48))
    vol = Volume(image * 1000, modality="MR")
    tpl = Template.from_volume(vol, 0, {"spot": where(np.array([[0, 0]]))}, {"spot": [[5.0, 5.0]]},
                               {"spot": image > 0.85})
    engine = OneShot(tpl, segmenter="offline", prior_falloff=40.0).fit()
    target = engine.plan(vol)
    # the same volume: NMI 2, uncertainty 0, a 0/1 prior as before
    same = engine.align(target)
    assert extent_uncertainty(same.alignment) == 0.0 and set(np.unique(same.prior["spot"])) == {0.0, 1.0}
    # a misplaced template region (a 10 x 10 mm square at x, y 10-19 mm), dilated by 5 mm; the adapter sees the
    # structure 12 mm beyond that and a look-alike 60 mm beyond it, both with probability 0.9
    ys, xs = np.mgrid[10:20, 10:20]
    region_pts = np.c_[xs.ravel(), ys.ravel()].astype(float)
    probs = np.zeros((2, 96, 96), np.float32)
    probs[0] = 0.9
    for y0, x0 in ((36, 10), (10, 84)):  # 12 mm below the dilated region; 60 mm right of it
        probs[1, y0:y0 + 10, x0:x0 + 10], probs[0, y0:y0 + 10, x0:x0 + 10] = 0.9, 0.1
    feats = engine.encode(image[None], (1.0, 1.0))[1][0]
    kept = {}
    for uncertainty in (0.0, 0.9):
        weight = _rasterise(region_pts, (96, 96), (1.0, 1.0), 5.0, engine.prior_falloff * uncertainty)
        assert weight[15, 15] == 1.0 and weight[40, 15] <= 1.0
        placement = Placement(same.alignment, prior={"spot": weight})
        found = engine.localise("spot", feats, probs, placement, 0, target)
        kept[uncertainty] = found.region if found.present else np.zeros((96, 96), bool)
        assert not kept[uncertainty][10:20, 84:94].any()  # the far look-alike: dropped
    assert not kept[0.0][36:46, 10:20].any()  # certain mapping: the structure outside the region is gated off
    assert kept[0.9][36:46, 10:20].mean() >= 0.9  # uncertain mapping: the confident structure survives


def test_a_foundation_model_backend_goes_through_the_same_stage():
    """d2s14 made small with random weights: the align stage places the template's points the same way,
    whatever the backend, and the windowed search stays inside its window."""
    pytest.importorskip("timm")
    fixed, f_where = phantom((64, 64), (30, 33))
    moving, m_where = phantom((64, 64), (35, 29), scale=1.05)
    tvol, tgt = Volume(fixed * 1000, modality="MR"), Volume(moving * 1000, modality="MR")
    points = f_where(np.array([[-15, -8], [18, 5]]))
    tpl = Template.from_volume(tvol, 0, landmarks={"a": points[0], "b": points[1]})
    torch.manual_seed(0)
    engine = OneShot(tpl, backend="d2s14", backend_options={"weights": "random", "precision": "fp32",
                                                            "input_size": 56, "device": "cpu",
                                                            "overrides": {"depth": 2, "embed_dim": 48,
                                                                          "num_heads": 2}},
                     segmenter="offline", search_radius=6.0).fit()
    target = engine.plan(tgt)
    placement = engine.align(target)
    truth = m_where(np.array([[-15, -8], [18, 5]]))
    assert np.abs(placement.landmarks - truth).max() <= 1.5
    result = engine.apply(tgt)
    found = np.array([result.landmarks[n][0].xy for n in ("a", "b")])
    assert (np.hypot(*(found - placement.landmarks).T) <= 6.0 + 1e-6).all()
    assert result.alignment.kind == "affine" and result.timings["align"] > 0
    assert engine.extractor.name == "d2s14"


def test_an_extent_is_a_soft_bound_that_the_labels_own_evidence_moves():
    """The bound stage on its own: the extent mapped to slices 6-10 while the organ lies on 3-10 and a
    neighbouring structure, found less confidently, continues it on 11-12; a stray finding lies on 15. The
    organ's slices beyond the mapped end come back (as confident as inside), the neighbour and the stray go."""
    from FMOneShotLib.pipeline import Placement

    tpl = Template.from_volume(Volume(np.random.default_rng(0).random((20, 8, 8)).astype(np.float32)), 8,
                               {"organ": [[4, 4]]})
    engine = OneShot(tpl, segmenter="offline", adapter="none")
    n = 20
    labels = np.zeros((n, 8, 8), np.uint16)
    present = np.zeros((n, 1), bool)
    confidence = np.zeros((n, 1))
    for z, conf in [*[(z, 0.9) for z in range(3, 11)], (11, 0.6), (12, 0.65), (15, 0.95)]:
        labels[z, 2:6, 2:6] = 1
        present[z, 0], confidence[z, 0] = True, conf
    confidence[3, 0] = 0.8  # the organ's first slice, a little less sure: still above 0.85 x 0.9
    placement = Placement(Alignment("affine", 3), slices={"organ": (6, 10)}, band={"organ": (0, 16)})
    engine.bound(labels, present, confidence, placement, list(range(n)))
    assert np.flatnonzero(present[:, 0]).tolist() == list(range(3, 11))
    assert np.array_equal(labels.any(axis=(1, 2)), present[:, 0]) and confidence[11:, 0].max() == 0
    # a gap next to the extent's end stops the walk: nothing beyond it comes back
    present[:] = False
    present[[7, 8, 9, 12, 13], 0] = True
    confidence[[7, 8, 9, 12, 13], 0] = 0.9
    engine.bound(labels, present, confidence, placement, list(range(n)))
    assert np.flatnonzero(present[:, 0]).tolist() == [7, 8, 9]
    # not found inside its extent: found nowhere
    present[:] = False
    present[[2, 3, 12], 0] = True
    engine.bound(labels, present, confidence, placement, list(range(n)))
    assert not present.any()


def test_a_wrongly_mapped_extent_is_restored_by_what_the_adapter_finds():
    """A volume whose geometry places it 4 slices (12 mm) off: the organ's extent, mapped through the geometry
    (no registration), misses the organ's first 4 slices. Trusted alone (tolerance 0) it cuts them; as a soft
    bound the adapter's confident findings on them restore them, and the slices beyond the organ stay empty."""
    rng = np.random.default_rng(3)
    zz, yy, xx = np.mgrid[0:30, 0:48, 0:48].astype(float)
    body = 0.3 * (((xx - 24) / 20) ** 2 + ((yy - 24) / 18) ** 2 <= 1)
    organ = (((xx - 18) / 7) ** 2 + ((yy - 20) / 6) ** 2 <= 1) & (zz >= 8) & (zz <= 19)
    image = (body + 0.5 * organ + rng.normal(0, 0.02, body.shape)).astype(np.float32) * 1000
    tvol = Volume(image, spacing=(2.0, 2.0, 3.0), modality="MR")
    tpl = Template.from_volume(tvol, 14, {"organ": [[18, 20]]}, masks={"organ": organ[14]})
    tpl.extent = {"organ": (8, 19)}
    # the same body, but the target's geometry says it starts 12 mm higher: the extent maps to slices 12-23
    target = Volume(image, spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, -12.0), modality="MR")
    figures = {}
    for tolerance in (0.0, EXTENT_TOLERANCE):
        engine = OneShot(tpl, align="none", segmenter="offline", extent_tolerance=tolerance).fit()
        result = engine.apply(target)
        first, last = result.searched["organ"]
        assert (first, last) == (12, 23) if tolerance == 0 else first <= 8, (tolerance, first, last)
        found = result.present[:, 0]
        figures[tolerance] = (np.flatnonzero(found).tolist(),
                              np.mean([dice(result.mask("organ")[k], organ[k]) for k in range(8, 20)]))
    print("found slices, Dice on the organ's slices (tolerance 0 / default):", figures)
    assert min(figures[0.0][0]) >= 12  # the hard bound cuts 8-11
    assert set(range(8, 20)) <= set(figures[EXTENT_TOLERANCE][0]) <= set(range(7, 21)), figures
    assert figures[EXTENT_TOLERANCE][1] >= figures[0.0][1] + 0.2, figures
