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
