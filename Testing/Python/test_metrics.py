"""Metrics against values worked out by hand."""

import numpy as np
import pytest

from FMOneShotLib.metrics import dice, distances, iou, ned, prompt_accuracy, within


def test_dice_and_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 pixels
    b[0, 1:] = True  # 3 pixels, 2 shared
    assert dice(a, b) == pytest.approx(4 / 6)
    assert iou(a, b) == pytest.approx(2 / 4)
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_prompt_accuracy():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    pts = [[1, 1], [3.4, 2.6], [0, 0], [9, 9]]  # inside, inside (rounds to 3,3), outside, off the image
    assert prompt_accuracy(pts, m) == pytest.approx(0.5)
    assert prompt_accuracy(pts, m, inside=False) == pytest.approx(0.5)
    assert np.isnan(prompt_accuracy([], m))


def test_distances_ned_within():
    pred = [[3, 4], [10, 10]]
    ref = [[0, 0], [10, 12]]
    assert np.allclose(distances(pred, ref), [5, 2])
    assert np.allclose(distances(pred, ref, spacing=(0.5, 2.0)), [np.hypot(1.5, 8), 4])
    assert ned(pred, ref, width=100) == pytest.approx(0.035)
    assert within(pred, ref, 2.0) == 0.5 and within(pred, ref, 5.0) == 1.0
    assert within(pred, ref, 4.0, spacing=(0.5, 2.0)) == 0.5
