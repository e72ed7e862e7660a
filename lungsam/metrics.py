"""Segmentation metrics as the paper defines them. Torch-free.

For a predicted mask P and ground truth G (both boolean, same shape):
F1 (Dice) = 2|P∩G| / (|P| + |G|), IoU = |P∩G| / |P∪G|. When both are empty the prediction is
perfect and both metrics are 1.0. Summaries use the population standard deviation (``ddof=0``).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def confusion(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` pixel counts of boolean masks of equal shape."""
    p = np.asarray(pred, bool)
    g = np.asarray(gt, bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {g.shape}")
    tp = int(np.count_nonzero(p & g))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(g)) - tp


def f1_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice / F1 of two boolean masks."""
    tp, fp, fn = confusion(pred, gt)
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def iou_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks."""
    tp, fp, fn = confusion(pred, gt)
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def summarize(values: Iterable[float]) -> dict[str, float]:
    """``{"mean", "std", "min", "max", "n"}`` of a sequence (population std)."""
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}


def fmt_mean_std(s: dict[str, float], digits: int = 3) -> str:
    """``0.943 ± 0.007`` from a :func:`summarize` dict."""
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def boundary_summary(hd95: Iterable[float | None], asd: Iterable[float | None]) -> dict[str, dict]:
    """``{"hd95": summary, "asd": summary}`` of per-image boundary distances (:func:`summarize` over the
    defined ones); each summary adds ``"undefined"``: images whose distance is ``None`` (one mask empty)."""
    out = {}
    for name, vals in (("hd95", list(hd95)), ("asd", list(asd))):
        s = summarize(v for v in vals if v is not None)
        if s["n"] == 0:  # strict JSON: no NaN
            s = {"mean": None, "std": None, "min": None, "max": None, "n": 0}
        out[name] = {**s, "undefined": sum(v is None for v in vals)}
    return out
