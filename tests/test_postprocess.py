"""Mask clean-up on hand-made masks, the threshold sweep's range and edge warning, boundary metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lungsam.postprocess import CleanupSpec, PostprocessError, clean_mask

ON = CleanupSpec(enabled=True)


def two_lungs(size: int = 128) -> np.ndarray:
    """Two rectangles (left and right lung) on a ``size`` x ``size`` field."""
    m = np.zeros((size, size), bool)
    m[20:100, 15:55] = True
    m[20:100, 70:112] = True
    return m


def test_clean_keeps_two_lungs_and_drops_specks():
    m = two_lungs()
    noisy = m.copy()
    noisy[2:5, 2:5] = True  # a speck outside the body (9 px < 0.5 % of the field)
    noisy[110:120, 60:68] = True  # a third blob, larger than a speck: still not a lung (max two)
    out = clean_mask(noisy, ON)
    assert np.array_equal(out, m)


def test_clean_fills_holes_inside_each_lung_not_between_them():
    m = two_lungs()
    holed = m.copy()
    holed[40:60, 25:45] = False  # an opacity the model missed, inside the left lung
    out = clean_mask(holed, ON)
    assert np.array_equal(out, m)
    assert not out[50, 60]  # the mediastinum between the lungs stays background
    assert np.array_equal(clean_mask(holed, CleanupSpec(enabled=True, fill_holes=False)), holed)


def test_clean_drops_small_second_component_relative_to_largest():
    m = np.zeros((200, 200), bool)
    m[10:190, 10:100] = True  # 16200 px
    m[10:30, 150:170] = True  # 400 px: 1 % of the field, 2.5 % of the largest
    out = clean_mask(m, ON)
    assert out[20, 160] == False and out[100, 50]  # noqa: E712
    kept = clean_mask(m, CleanupSpec(enabled=True, min_relative_size=0.01))
    assert kept[20, 160]


def test_clean_never_empties_and_off_is_identity():
    tiny = np.zeros((64, 64), bool)
    tiny[3, 3] = True  # below every size rule, but the largest component is always kept
    assert np.array_equal(clean_mask(tiny, ON), tiny)
    assert not clean_mask(np.zeros((8, 8), bool), ON).any()
    noisy = two_lungs()
    noisy[0, 0] = True
    assert np.array_equal(clean_mask(noisy, CleanupSpec()), noisy)
    with pytest.raises(ValueError, match="one \\(H, W\\) mask"):
        clean_mask(np.zeros((2, 8, 8), bool), ON)


def test_clean_rules_are_relative_to_the_field():
    """The same shapes at twice the resolution clean the same way."""
    small = two_lungs(64)
    small[1, 1] = True
    big = np.kron(small, np.ones((2, 2), bool))
    assert np.array_equal(np.kron(clean_mask(small, ON), np.ones((2, 2), bool)), clean_mask(big, ON))


def test_spec_round_trip_and_validation():
    d = ON.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d and d["format"] == "lungsam-postprocess/1"
    assert CleanupSpec.from_dict(d) == ON
    assert CleanupSpec.from_dict(None) == CleanupSpec() and not CleanupSpec.from_dict(None).enabled
    with pytest.raises(PostprocessError, match="unknown key"):
        CleanupSpec.from_dict({**d, "dilate": 3})
    with pytest.raises(PostprocessError, match="max_components"):
        CleanupSpec.from_dict({**d, "max_components": 0})
    with pytest.raises(PostprocessError, match="min_component_fraction"):
        CleanupSpec.from_dict({**d, "min_component_fraction": 1.5})
    with pytest.raises(PostprocessError, match="format"):
        CleanupSpec.from_dict({**d, "format": "other/2"})


# ---- threshold sweep -------------------------------------------------------------------------------------------

def test_default_sweep_covers_005_to_095():
    from lungsam.train.config import DEFAULT_THRESHOLDS, TrainConfig, parse_thresholds

    assert min(DEFAULT_THRESHOLDS) == pytest.approx(0.05) and max(DEFAULT_THRESHOLDS) == pytest.approx(0.95)
    assert len(DEFAULT_THRESHOLDS) == 19 and TrainConfig().thresholds == DEFAULT_THRESHOLDS
    assert parse_thresholds("0.3,0.1,0.2") == (0.1, 0.2, 0.3)
    for bad in ("0:1:0.1", "0.5:0.2:0.1", "a,b", "0.2:0.8:0"):
        with pytest.raises(ValueError, match="--thresholds"):
            parse_thresholds(bad)


def _probs_peaking_at(t_best: float, n: int = 4, size: int = 32) -> tuple[np.ndarray, list[np.ndarray]]:
    """Probabilities whose mask matches the ground truth best when thresholded near ``t_best``: the lung is a
    disc with probability ramping from 1 at its centre down through ``t_best`` at its true border."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    gt = r < 10
    probs = np.clip(t_best + (10 - r) * 0.04, 0.001, 0.999).astype(np.float32)
    return np.stack([probs] * n), [gt] * n


def test_threshold_choice_inside_and_at_edge():
    from lungsam.train.engine import choose_threshold_and_cleanup, threshold_edge

    probs, masks = _probs_peaking_at(0.42)
    inside = choose_threshold_and_cleanup(probs, masks, tuple(np.round(np.arange(0.05, 0.96, 0.05), 2)))
    assert 0.35 <= inside.threshold <= 0.45 and inside.edge is None and inside.edge_warning() is None
    narrow = choose_threshold_and_cleanup(probs, masks, (0.50, 0.55, 0.60, 0.65, 0.70))  # the old sweep
    assert narrow.threshold == 0.50 and narrow.edge == "low"
    assert "low edge of the sweep 0.50-0.70" in narrow.edge_warning()
    rec = narrow.record()
    assert rec["threshold_edge"] == "low" and rec["threshold_range"] == [0.5, 0.7]
    json.dumps(rec, allow_nan=False)
    assert threshold_edge([{"threshold": 0.5}], 0.5) is None
    assert threshold_edge([{"threshold": 0.1}, {"threshold": 0.9}], 0.9) == "high"


def test_cleanup_chosen_only_when_it_helps_on_validation():
    from lungsam.train.engine import choose_threshold_and_cleanup

    gt = two_lungs(64)
    clean = np.where(gt, 0.9, 0.05).astype(np.float32)
    noisy = clean.copy()
    noisy[2:6, 2:6] = 0.9  # specks the clean-up removes
    noisy[30:34, 15:20] = 0.05  # a hole it fills
    on = choose_threshold_and_cleanup(np.stack([noisy] * 3), [gt] * 3, (0.3, 0.5, 0.7))
    assert on.cleanup.enabled and on.val_f1_cleaned > on.val_f1_raw
    off = choose_threshold_and_cleanup(np.stack([clean] * 3), [gt] * 3, (0.3, 0.5, 0.7))
    assert not off.cleanup.enabled  # equal F1: no clean-up
    assert off.record()["postprocess"]["enabled"] is False


def test_boundary_scores_monai_hd95_and_asd():
    from lungsam.boundary import boundary_scores

    gt = np.zeros((64, 64), bool)
    gt[10:40, 10:40] = True
    shifted = np.roll(gt, 3, axis=1)  # 3 px to the right
    hd, asd = boundary_scores([gt, shifted, np.zeros_like(gt)], [gt, gt, gt])
    assert hd[0] == 0.0 and asd[0] == 0.0
    assert hd[1] == pytest.approx(3.0, abs=0.01) and 0.5 < asd[1] < 3.0
    assert hd[2] is None and asd[2] is None
    hd_mm, _ = boundary_scores([shifted], [gt], spacing=(0.5, 0.5))
    assert hd_mm[0] == pytest.approx(1.5, abs=0.01)
    from lungsam.metrics import boundary_summary

    s = boundary_summary(hd, asd)
    assert s["hd95"]["n"] == 2 and s["hd95"]["undefined"] == 1
    json.dumps(boundary_summary([None], [None]), allow_nan=False)
