import numpy as np
import pytest

from lungsam.metrics import confusion, f1_score, iou_score, summarize


def test_hand_made_overlap():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True  # 4 px
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True  # 6 px, 4 overlap
    assert confusion(pred, gt) == (4, 2, 0)
    assert f1_score(pred, gt) == pytest.approx(2 * 4 / (6 + 4))
    assert iou_score(pred, gt) == pytest.approx(4 / 6)


def test_disjoint_and_perfect_and_empty():
    a = np.zeros((3, 3), bool)
    a[0, 0] = True
    b = np.zeros((3, 3), bool)
    b[2, 2] = True
    assert f1_score(a, b) == 0.0 and iou_score(a, b) == 0.0
    assert f1_score(a, a) == 1.0 and iou_score(a, a) == 1.0
    empty = np.zeros((3, 3), bool)
    assert f1_score(empty, empty) == 1.0 and iou_score(empty, empty) == 1.0
    assert f1_score(a, empty) == 0.0


def test_f1_iou_relation_and_shape_check():
    rng = np.random.default_rng(0)
    p, g = rng.random((32, 32)) > 0.5, rng.random((32, 32)) > 0.4
    f, j = f1_score(p, g), iou_score(p, g)
    assert f == pytest.approx(2 * j / (1 + j))
    with pytest.raises(ValueError):
        f1_score(p, g[:10])


def test_summarize_population_std():
    s = summarize([0.9, 1.0])
    assert s["mean"] == pytest.approx(0.95) and s["std"] == pytest.approx(0.05) and s["n"] == 2
    assert s["min"] == 0.9 and s["max"] == 1.0
