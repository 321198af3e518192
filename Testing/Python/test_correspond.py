"""Correspondences on images whose answer is known exactly."""

import numpy as np
import pytest
import torch

from FMOneShotLib.correspond import correspond, similarity_maps
from FMOneShotLib.features import create_extractor, pixel_to_grid, sample_features
from FMOneShotLib.image import Volume
from FMOneShotLib.pipeline import OneShot
from FMOneShotLib.template import Template


def blobs(shape=(96, 96), shift=(0, 0)):
    """A 'body' with three distinct blobs; ``shift`` (dx, dy) moves everything."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    dx, dy = shift
    img = 0.3 * (((xx - 48 - dx) / 40) ** 2 + ((yy - 48 - dy) / 40) ** 2 <= 1)
    img += 0.6 * np.exp(-(((xx - 30 - dx) ** 2 + (yy - 35 - dy) ** 2) / 30))
    img += 0.4 * (((xx - 62 - dx) ** 2 + (yy - 60 - dy) ** 2) <= 36)
    img += 0.5 * ((np.abs(xx - 55 - dx) <= 3) & (np.abs(yy - 30 - dy) <= 8))
    return img.astype(np.float32)


def test_similarity_of_identical_features_is_one():
    f = torch.randn(5, 4, 6)
    q = f[:, 2, 3][None]
    maps = similarity_maps(q, f)
    assert maps.shape == (1, 4, 6)
    assert maps[0, 2, 3] == pytest.approx(1.0, abs=1e-6) and maps.max() == maps[0, 2, 3]


def test_grid_convention_round_trip():
    f = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    # grid cell (i=1, j=2) of a 3x4 grid over a 30x40 image is centred on pixel (25 - 0.5, 15 - 0.5)
    assert np.allclose(pixel_to_grid(np.array([[24.5, 14.5]]), (30, 40), (3, 4)), [[2, 1]])
    assert sample_features(f, np.array([[24.5, 14.5]]), (30, 40))[0, 0] == pytest.approx(6.0)


@pytest.mark.parametrize("shift", [(7, -5), (-3, 9)])
def test_points_follow_a_known_shift(shift):
    ext = create_extractor("offline")
    template, target = blobs(), blobs(shift=shift)
    f_t, f_s = ext.extract(template[None])[0], ext.extract(target[None])[0]
    pts = np.array([[30.0, 35.0], [62.0, 60.0], [55.0, 30.0]])
    q = sample_features(f_t, pts, template.shape)
    c = correspond(q, f_s, target.shape)
    assert np.abs(c.xy - (pts + np.array(shift))).max() <= 1.0
    assert (c.score > 0.95).all()


def test_landmarks_through_the_chain_in_pixels_and_mm():
    shift = (6, 4)
    tvol = Volume(blobs()[None] * 1000, spacing=(0.5, 0.5, 2.0), modality="MR")
    target = Volume(blobs(shift=shift)[None] * 1000, spacing=(0.5, 0.5, 2.0), origin=(10, 20, 30), modality="MR")
    tpl = Template.from_volume(tvol, 0, landmarks={"blob": [30, 35], "square": [62, 60]})
    result = OneShot(tpl).fit().apply(target)
    best = result.best_landmarks()
    assert np.allclose(best["blob"].xy, (36, 39), atol=1.0)
    assert np.allclose(best["square"].xy, (68, 64), atol=1.0)
    assert np.allclose(best["square"].physical, (10 + 68 * 0.5, 20 + 64 * 0.5, 30), atol=0.5)


def test_landmark_correspondence_does_not_snap_to_feature_cells():
    """A similarity peak between cell centres (grid 5.35, 7.62 on a 20x16 grid of a 160x128 image): the
    continuous argmax lands within a pixel of it, where the pixel argmax is 2.3 and 2.5 pixels away (16.8)."""
    import torch

    from FMOneShotLib.correspond import correspond

    h, w, H, W, gx, gy = 16, 20, 128, 160, 5.35, 7.62
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    features = torch.stack([torch.ones_like(xx), 0.3 * (xx - gx), 0.3 * (yy - gy)])  # cosine peak at (gx, gy)
    query = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    truth = np.array([(gx + 0.5) * W / w - 0.5, (gy + 0.5) * H / h - 0.5])
    snapped = correspond(query, features, (H, W)).xy[0]
    refined = correspond(query, features, (H, W), subpixel=True)
    assert np.abs(snapped - truth).min() > 2.0  # at a cell centre: what landmarks were before
    assert np.abs(refined.xy[0] - truth).max() < 1.0
    assert refined.score[0] == pytest.approx(float(features[:, 8, 5][0] / features[:, 8, 5].norm()), abs=1e-6)


def textured(shape=(200, 200), seed=0):
    """A 'head' filled with smooth random texture: every patch of it looks different."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    body = (((xx - shape[1] / 2) / (0.425 * shape[1])) ** 2 + ((yy - shape[0] / 2) / (0.4 * shape[0])) ** 2
            <= 1).astype(float)
    return (0.5 * body + 2.0 * ndi.gaussian_filter(rng.random(shape), 3.0) * body).astype(np.float32)


def test_patch_match_finds_a_point_in_a_rotated_scaled_target_from_a_start_off_by_ten_pixels():
    """The target is the template under a known similarity map (scale 1.1, 6 degrees, a shift); the patch,
    sampled in the target in that map's pose, lands within a pixel of where the map takes the point."""
    from scipy import ndimage as ndi

    from FMOneShotLib.correspond import match_patch

    template = textured()
    c, s = 1.1 * np.cos(0.1), 1.1 * np.sin(0.1)
    A, b = np.array([[c, -s], [s, c]]), np.array([-4.0, 6.0])  # template (x, y) -> target (x, y)
    yy, xx = np.mgrid[0:200, 0:200].astype(float)
    inv = np.linalg.inv(A)
    src = np.einsum("ij,jhw->ihw", inv, np.stack([xx - b[0], yy - b[1]]))  # target pixel -> template (x, y)
    target = ndi.map_coordinates(template, [src[1], src[0]], order=3, mode="nearest").astype(np.float32)
    point = np.array([90.0, 110.0])
    truth = A @ point + b
    found, ncc = match_patch(template, point, target, truth + [8.0, -6.0], A, half=16, radius=12)
    assert np.linalg.norm(found - truth) <= 1.0 and ncc > 0.9
    flat, zero = match_patch(np.zeros_like(template), point, target, truth + [8.0, -6.0], A, 16, 12)
    assert np.array_equal(flat, truth + [8.0, -6.0]) and zero == 0.0  # nothing to correlate: the start


def test_patch_matching_recovers_a_landmark_that_the_feature_chain_misses():
    """A local deformation (a smooth bump displacing the landmark by about 11 pixels) that no affine
    registration models: the features' chain stops more than 2 pixels off, the patch step within 1 pixel."""
    from scipy import ndimage as ndi

    at, amp, sigma = np.array([70.0, 90.0]), np.array([10.0, -7.0]), 50.0
    template = textured()
    yy, xx = np.mgrid[0:200, 0:200].astype(float)
    bump = np.exp(-((xx - at[0]) ** 2 + (yy - at[1]) ** 2) / (2 * sigma ** 2))  # target(x) = template(x - d(x))
    target = ndi.map_coordinates(template, [yy - amp[1] * bump, xx - amp[0] * bump], order=3, mode="nearest")
    truth = at.copy()
    for _ in range(50):  # where the landmark went: q = at + d(q)
        truth = at + amp * np.exp(-((truth - at) ** 2).sum() / (2 * sigma ** 2))
    tpl = Template.from_volume(Volume(template * 1000, modality="XR"), 0,
                               landmarks={"a": at, "b": [140.0, 120.0], "c": [100.0, 50.0], "d": [110.0, 150.0]})
    tgt = Volume(target.astype(np.float32) * 1000, modality="XR")
    old = OneShot(tpl, segmenter="offline", patch_steps=()).fit().apply(tgt).best_landmarks()["a"]
    new = OneShot(tpl, segmenter="offline").fit().apply(tgt).best_landmarks()["a"]
    assert np.linalg.norm(np.array(old.xy) - truth) > 2.0
    assert np.linalg.norm(np.array(new.xy) - truth) <= 1.0


def test_patch_consensus_brings_back_a_landmark_that_locked_onto_a_look_alike(monkeypatch):
    """Five landmarks; one starts 140 px off, on a slightly blurred copy of its own patch (a look-alike), beyond
    the 90 px the pyramid can move it. Alone it stays far off; the second pass, from where the other four's
    affine consensus puts it, finds the true place, whose NCC is higher, within 1 px."""
    import FMOneShotLib.pipeline as pipeline
    from scipy import ndimage as ndi

    template = textured((320, 320), seed=1)
    points = {"a": [100.0, 110.0], "b": [220.0, 110.0], "c": [160.0, 200.0], "d": [100.0, 230.0],
              "e": [220.0, 230.0]}
    target = template.copy()
    decoy = (160, 60)  # (x, y): where the look-alike of "c"'s patch is pasted, 140 px above it
    patch = ndi.gaussian_filter(template, 1.0)[200 - 20:200 + 21, 160 - 20:160 + 21]
    target[decoy[1] - 20:decoy[1] + 21, decoy[0] - 20:decoy[0] + 21] = patch
    tpl = Template.from_volume(Volume(template * 1000, modality="XR"), 0, landmarks=points)
    engine = OneShot(tpl, segmenter="offline").fit()
    truth = np.array(list(points.values()))
    starts = truth + np.array([[2.0, -3.0], [-2.0, 2.0], [0.0, -140.0], [3.0, 1.0], [-1.0, -2.0]])
    frames = np.repeat(np.eye(2)[None], 5, axis=0)
    found = engine.match_landmark_patches(target, starts, frames)
    assert np.linalg.norm(found - truth, axis=1).max() <= 1.0
    monkeypatch.setattr(pipeline, "CONSENSUS_MIN", 6)  # one pass only: "c" stays far off
    alone = engine.match_landmark_patches(target, starts, frames)
    assert np.linalg.norm(alone[2] - truth[2]) > 20.0
