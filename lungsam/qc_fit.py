"""Fitting the version 2 quality flag (:class:`lungsam.qc.QcModel`) on a run's validation images. Torch-free
(numpy, scipy); run at training time, never by the runtime.

A fold's validation images are almost all good masks (28 Montgomery images: none below F1 0.90), too few bad
ones to fit a detector (and a weak model's may all be bad, too few good ones). Each validation image also gives a
reference map, its ground truth with a soft border (:func:`reference_map`, good by construction).
:func:`degraded_copies` makes from each validation probability map ``(S, S)`` (and each reference map) a fixed
set of copies with the errors seen on other hospitals' images (masks that stop short at the bases or the apex,
a lung left out, an opacified region cut out, blobs outside the lungs, masks too small or too large, a misplaced
field, a soft unsure map), with no randomness: every copy is a function of the map alone. Each copy is scored
against the image's ground truth exactly as a prediction is (threshold, clean-up, F1), so its label (bad =
F1 < ``bad_below``) is measured, not assumed; copies that stay good are kept as good examples. The decoder is
not rerun on a copy: its ``pred_iou`` is the source image's, and the two-pass signal cannot be made this way
(:func:`fit_quality_model` therefore never uses it).

The model: L2-regularised logistic regression of P(good) on the standardised signals (scipy's L-BFGS on the
class-balanced log-loss; each weight bound to its signal's good side), then the operating point ``flag_below``: the
lowest score line that catches at least ``target_recall`` of the bad examples of the fit set (real and degraded),
lowered where needed so that it flags at most ``max_flagged`` of the real validation images (their 10th
percentile score by default: the issue's budget of 10 % flagged). ``fit.recall`` records the recall it reached.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from .metrics import f1_score
from .postprocess import CleanupSpec, clean_mask
from .qc import (
    DEFAULT_JITTER_WEIGHT,
    FEATURES,
    IMAGE_FEATURES,
    JITTER,
    JITTER_MIN_SCALE,
    SHAPE_FEATURES,
    Z_CLIP,
    JitterTerm,
    QcModel,
    ShapeModel,
    good_sign,
    transform_signal,
)

DEFAULT_L2 = 1.0
DEFAULT_TARGET_RECALL = 0.80
#: The operating point never flags more than this share of the real validation images.
DEFAULT_MAX_FLAGGED = 0.10
BAD_BELOW = 0.90
#: The signals a fitted model reads by default: every map and shape signal.
DEFAULT_SIGNALS = FEATURES + SHAPE_FEATURES + IMAGE_FEATURES


def _disk(r: int) -> np.ndarray:
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def _ramp(n: int, start: float, width: float, rising: bool) -> np.ndarray:
    """``(n,)`` weights going smoothly from 1 to ``~0`` (or 0 to 1 when ``rising``) around ``start``."""
    t = 1.0 / (1.0 + np.exp(-(np.arange(n) - start) / max(width, 1e-3)))
    return t if rising else 1.0 - t


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of a mask (the central half of the field when empty)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        n = mask.shape[0]
        return n // 4, 3 * n // 4, n // 4, 3 * n // 4
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def degradations(threshold: float) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """The named degradations of a probability map ``(S, S)`` float32 (each returns a new map); sizes are
    fractions of the side S. See the module docstring."""
    from scipy import ndimage

    def morph(op, frac):
        return lambda p: op(p, footprint=_disk(max(1, round(frac * p.shape[0]))))

    def rows(lo_frac, hi_side, half=None, floor=0.02):
        def f(p):
            y0, y1, _, _ = _box(p > threshold)
            n = p.shape[0]
            cut = y0 + lo_frac * (y1 - y0)
            w = _ramp(n, cut, 0.015 * n, rising=not hi_side)[:, None] * np.ones((1, n))
            if half is not None:  # only one side of the field
                cols = np.arange(n) < n // 2 if half == "left" else np.arange(n) >= n // 2
                w[:, ~cols] = 1.0
            return p * (floor + (1 - floor) * w)
        return f

    def opacity(p):
        y0, y1, x0, x1 = _box(p > threshold)
        n = p.shape[0]
        yy, xx = np.mgrid[:n, :n]
        cy, cx, r = y0 + 0.7 * (y1 - y0), x0 + 0.18 * (x1 - x0), 0.09 * n
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        return p * (0.1 + 0.9 / (1.0 + np.exp(-(d - r) / (0.02 * n))))

    def blob(p):
        n = p.shape[0]
        yy, xx = np.mgrid[:n, :n]
        _, y1, _, _ = _box(p > threshold)
        cy, cx = min(y1 + 0.08 * n, 0.92 * n), 0.5 * n
        return np.maximum(p, 0.97 * (np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) < 0.05 * n))

    def soft(p):
        q = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
        return (1.0 / (1.0 + np.exp(-(0.3 * np.log(q / (1 - q)) - 0.6)))).astype(np.float32)

    def shift(p):
        d = round(0.07 * p.shape[0])
        return ndimage.shift(p, (d, d), order=1, cval=float(p.min()))

    return [("shrink_2pc", morph(ndimage.grey_erosion, 0.02)), ("shrink_5pc", morph(ndimage.grey_erosion, 0.05)),
            ("grow_2pc", morph(ndimage.grey_dilation, 0.02)), ("grow_5pc", morph(ndimage.grey_dilation, 0.05)),
            ("cut_bases_30pc", rows(0.70, True)), ("cut_one_base_45pc", rows(0.55, True, "left")),
            ("cut_apex_20pc", rows(0.20, False)), ("drop_one_lung", rows(-1.0, True, "right")),
            ("unsure_bases_30pc", rows(0.70, True, floor=0.4)), ("unsure_one_base_45pc", rows(0.55, True, "left", 0.4)),
            ("opacity", opacity), ("blob", blob), ("soft", soft), ("shift_7pc", shift)]


def degraded_copies(prob: np.ndarray, threshold: float) -> list[tuple[str, np.ndarray]]:
    """``[(name, map (S, S) float32)]``: every :func:`degradations` of one probability map."""
    p = np.asarray(prob, np.float32)
    return [(name, np.asarray(f(p), np.float32)) for name, f in degradations(threshold)]


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = DEFAULT_L2,
                 signs: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Weights ``(d,)`` and bias of an L2-regularised logistic regression of ``y`` (bool, True = good) on
    ``X`` ``(n, d)`` standardised, class-balanced (each class weighs half), by scipy's L-BFGS-B; ``signs``
    ``(d,)`` of +1 / -1 bound each weight to that sign (0 allowed)."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    yy = y.astype(np.float64)
    w_s = np.where(y, 0.5 / max(y.sum(), 1), 0.5 / max((~y).sum(), 1))

    def loss(theta):
        w, b = theta[:-1], theta[-1]
        t = X @ w + b
        nll = -np.sum(w_s * (yy * log_expit(t) + (1 - yy) * log_expit(-t)))
        g = w_s * (expit(t) - yy)
        return nll + 0.5 * l2 * w @ w / len(X), np.concatenate([X.T @ g + l2 * w / len(X), [g.sum()]])

    bounds = [(None, None)] * (X.shape[1] + 1)
    if signs is not None:
        bounds = [(0.0, None) if sg > 0 else (None, 0.0) for sg in signs] + [(None, None)]
    res = minimize(loss, np.zeros(X.shape[1] + 1), jac=True, method="L-BFGS-B", bounds=bounds)
    return res.x[:-1], float(res.x[-1])


def operating_point(scores: np.ndarray, bad: np.ndarray, target_recall: float, real: np.ndarray | None = None,
                    max_flagged: float = DEFAULT_MAX_FLAGGED) -> float:
    """The lowest ``flag_below`` (flag when score < it) that catches at least ``target_recall`` of the bad
    examples (midway to the next score), at most the ``max_flagged`` quantile of the scores of the good
    ``real`` examples (bool mask; ``None``: no cap); kept inside (0, 1)."""
    s_bad = np.sort(scores[bad])
    if len(s_bad) == 0:
        return 0.5
    k = int(np.ceil(target_recall * len(s_bad))) - 1
    above = scores[scores > s_bad[k]]
    line = (s_bad[k] + above.min()) / 2 if len(above) else s_bad[k] + 1e-6
    if real is not None and (real & ~bad).any():
        line = min(line, float(np.quantile(scores[real & ~bad], max_flagged)))
    return float(np.clip(line, 1e-6, 1 - 1e-6))


def fit_examples(probs, pred_iou, masks, threshold: float, cleanup: CleanupSpec, shape: ShapeModel | None,
                 bad_below: float = BAD_BELOW, images=None) -> tuple[list[dict], np.ndarray, list[str]]:
    """Signals, good labels (F1 >= ``bad_below``) and kind of every validation image (``real``), its reference
    map (``reference``: :func:`reference_map` of its ground truth) and the degraded copies of both (``<name>``,
    ``reference/<name>``); ``images``: the working-frame images, for the image signals."""
    probe = QcModel(features=("pred_iou",), mean={"pred_iou": 0.0}, std={"pred_iou": 1.0},
                    weights={"pred_iou": 0.0}, bias=0.0, flag_below=0.5, center={"pred_iou": 0.0}, shape=shape)
    rows, good, kind = [], [], []
    for i, (p, iou, gt) in enumerate(zip(probs, pred_iou, masks)):
        image = None if images is None else images[i]
        ref = reference_map(gt)
        maps = ([("real", np.asarray(p, np.float32))] + degraded_copies(p, threshold) + [("reference", ref)]
                + [(f"reference/{n}", q) for n, q in degraded_copies(ref, threshold)])
        for name, q in maps:
            rows.append(probe.signals(q, threshold, float(iou), cleanup, image=image))
            good.append(f1_score(clean_mask(q > threshold, cleanup), gt) >= bad_below)
            kind.append(name)
    return rows, np.asarray(good, bool), kind


def reference_map(mask: np.ndarray) -> np.ndarray:
    """A good example whatever the model: the ground-truth mask ``(S, S)`` bool as a probability map ``(S, S)``
    float32 with a soft border (Gaussian, sigma 0.6 % of S), values 0.02..0.98."""
    from scipy import ndimage

    soft = ndimage.gaussian_filter(np.asarray(mask, np.float32), sigma=0.006 * mask.shape[0])
    return (0.02 + 0.96 * soft).astype(np.float32)


def fit_quality_model(probs, pred_iou, masks, train_masks, threshold: float, cleanup: CleanupSpec | None,
                      source: str, *, l2: float = DEFAULT_L2, target_recall: float = DEFAULT_TARGET_RECALL,
                      bad_below: float = BAD_BELOW, signals: tuple[str, ...] | None = None,
                      images=None, max_flagged: float = DEFAULT_MAX_FLAGGED) -> QcModel:
    """The :class:`lungsam.qc.QcModel` of a fold from its validation probabilities ``(N, S, S)``, predicted IoU
    ``(N,)``, ground-truth masks (N x ``(S, S)`` bool), its training masks (the shape model) and its images
    (N x ``(S, S, 3)`` uint8, the image signals; ``None`` leaves them out). ``signals``: default
    :data:`DEFAULT_SIGNALS` (without the image signals when ``images`` is ``None``). The operating point's cap
    counts the real validation images only."""
    if len(probs) < 3:
        raise ValueError(f"quality calibration needs at least 3 validation images, got {len(probs)}")
    cleanup = cleanup or CleanupSpec()
    feats = tuple(signals or (DEFAULT_SIGNALS if images is not None else FEATURES + SHAPE_FEATURES))
    shape = ShapeModel.fit(list(train_masks)) if any(f in SHAPE_FEATURES for f in feats) else None
    rows, good, kind = fit_examples(probs, pred_iou, masks, threshold, cleanup, shape, bad_below, images)
    fit = {"degradations": [name for name, _ in degradations(threshold)], "l2": l2, "target_recall": target_recall,
           "max_flagged": max_flagged, "bad_below": bad_below}
    return fit_from_examples(rows, good, kind, feats, shape, source, fit)


def fit_from_examples(rows: list[dict], good: np.ndarray, kind: list[str], feats: tuple[str, ...],
                      shape: ShapeModel | None, source: str, fit: dict) -> QcModel:
    """The logistic model and its operating point from :func:`fit_examples`' output (``fit``: ``l2``,
    ``target_recall`` and what to record)."""
    if good.all() or not good.any():
        raise ValueError("quality calibration: the validation images and their degraded copies are all "
                         f"{'good' if good.all() else 'bad'}; cannot fit")
    real = np.asarray(kind) == "real"
    center = {f: float(np.median([r[f] for r, k in zip(rows, real) if k])) for f in feats}
    T = np.array([[transform_signal(f, float(r[f]), center[f]) for f in feats] for r in rows])
    mean, std = T.mean(0), np.maximum(T.std(0), 1e-6)
    Z = np.clip((T - mean) / std, -Z_CLIP, Z_CLIP)
    w, b = fit_logistic(Z, good, fit["l2"], np.array([good_sign(f) for f in feats]))
    from scipy.special import expit

    scores = expit(Z @ w + b)
    line = operating_point(scores, ~good, fit["target_recall"], real, fit.get("max_flagged", DEFAULT_MAX_FLAGGED))
    flagged = scores < line
    fit = {**fit, "examples": int(len(rows)), "bad_examples": int((~good).sum()),
           "real_bad": int((~good & real).sum()), "recall": float(flagged[~good].mean()),
           "real_flagged_share": float(flagged[real].mean())}
    return QcModel(features=feats, mean=dict(zip(feats, map(float, mean))), std=dict(zip(feats, map(float, std))),
                   weights=dict(zip(feats, map(float, w))), bias=b, flag_below=line, center=center, shape=shape,
                   n=int(real.sum()), n_degraded=int((~real).sum()), source=source, fit=fit)


def add_jitter_term(model: QcModel, rows: list[dict], good: np.ndarray, shift: float, variants,
                    weight: float = DEFAULT_JITTER_WEIGHT, min_scale: float = JITTER_MIN_SCALE) -> QcModel:
    """``model`` with its prompt-jitter term (:class:`lungsam.qc.JitterTerm`) calibrated on the real validation
    images' signals ``rows`` (:meth:`QcModel.signals` with the variants' maps, so each has :data:`JITTER`) and
    their labels ``good`` ``(N,)`` bool (F1 >= ``bad_below``). The degraded copies cannot carry the term (no
    embedding to rerun), so the fit's recall is left as it was; the operating point is lowered where the term
    would flag more than ``fit["max_flagged"]`` of the good real images, the same cap the fit applies.
    ``fit`` records ``flag_below_without_jitter`` and the new ``real_flagged_share``. ``min_scale``: the floor of
    the term's tail scale (:data:`lungsam.qc.JITTER_MIN_SCALE`)."""
    term = JitterTerm.calibrate([r[JITTER] for r in rows], shift, variants, weight, min_scale)
    m = replace(model, jitter=term)
    scores = np.asarray([m.assess(r).score for r in rows])
    line = model.flag_below
    if good.any():
        line = min(line, float(np.quantile(scores[good], model.fit.get("max_flagged", DEFAULT_MAX_FLAGGED))))
    line = float(np.clip(line, 1e-6, 1 - 1e-6))
    fit = {**model.fit, "flag_below_without_jitter": model.flag_below,
           "real_flagged_share": float((scores < line).mean())}
    return replace(m, flag_below=line, fit=fit)
