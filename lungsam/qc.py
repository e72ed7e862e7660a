"""A quality flag for every mask, from what a runtime has without ground truth. Torch-free (numpy, scipy).

Signals (:func:`qc_features`, all in the working frame S x S, from the lung probability ``(S, S)``, the
threshold, the clean-up spec and the decoder's predicted IoU):

* ``pred_iou``: the decoder's own score (low is bad).
* ``area_fraction``: lung pixels / field (too small or too large is bad: a blank image came back 97 % lung).
* ``components``: connected components of the thresholded mask (more than two lungs is bad).
* ``stray_fraction``: share of the mask outside the two lungs the clean-up keeps (blobs outside the body).
* ``hole_fraction``: holes inside the kept lungs / lung area (the mask stops short of opacified lung).
* ``balance``: smaller / larger of the mask's areas in the left and right halves of the field (one lung missing).
* ``uncertain_fraction``: pixels with probability in (0.1, 0.9) / lung area (a soft, unsure border).
* ``mean_probability``: mean probability over the mask (low is bad).

Calibration (:func:`calibrate`) learns each signal's normal range on a run's validation images: its median
and the spread of its bad-side tail (:func:`tail_scale`: the 90th (or 10th) percentile's distance from the
median / 1.2816, floored at :data:`MIN_SCALE`). An image's
deviation on a signal is ``z`` = how many scales it lies beyond the median on the signal's bad side
(:data:`BAD_SIDE`); its score is ``1 / (1 + (max z / z_flag)^2)`` (1 = typical of validation, 0.5 at the flag
line) and it is flagged when ``max z > z_flag`` or the mask is empty. ``reasons`` name the signals beyond
``z_flag``. The calibration lives in the run (each fold's ``metrics.json``, key ``qc``) and in the bundle
manifest's optional section ``qc`` (:meth:`QcCalibration.to_dict`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import LungsamError
from .postprocess import CleanupSpec, components, kept_components

FORMAT = "lungsam-qc/1"
FEATURES = ("pred_iou", "area_fraction", "components", "stray_fraction", "hole_fraction", "balance",
            "uncertain_fraction", "mean_probability")
BAD_SIDE = {"pred_iou": "low", "area_fraction": "both", "components": "high", "stray_fraction": "high",
            "hole_fraction": "high", "balance": "low", "uncertain_fraction": "high", "mean_probability": "low"}
MIN_SCALE = {"pred_iou": 0.005, "area_fraction": 0.01, "components": 1.0, "stray_fraction": 0.002,
             "hole_fraction": 0.002, "balance": 0.02, "uncertain_fraction": 0.005, "mean_probability": 0.005}
DEFAULT_Z_FLAG = 4.0
UNCERTAIN = (0.1, 0.9)


class QcError(LungsamError, ValueError):
    """A ``qc`` section that is not a valid :class:`QcCalibration`."""


def qc_features(prob: np.ndarray, threshold: float, pred_iou: float, cleanup: CleanupSpec | None = None) -> dict:
    """The signals of one image (see the module docstring) from its working-frame probability ``(S, S)``
    float, the probability ``threshold``, the decoder's predicted IoU and the clean-up size rules (``cleanup``;
    its ``enabled`` does not matter here: the rules say which components are lungs). Plain floats."""
    p = np.asarray(prob, np.float32)
    if p.ndim != 2:
        raise ValueError(f"qc_features takes one (S, S) probability map, got shape {p.shape}")
    rules = cleanup or CleanupSpec()
    mask = p > threshold
    area = int(np.count_nonzero(mask))
    labels, sizes = components(mask)
    kept = kept_components(sizes, mask.size, rules)
    lungs = np.isin(labels, kept) if kept else np.zeros_like(mask)
    n_lungs = int(np.count_nonzero(lungs))
    from scipy import ndimage

    filled = np.zeros_like(mask)
    for k in kept:
        filled |= ndimage.binary_fill_holes(labels == k)
    half = mask.shape[1] // 2
    left, right = int(np.count_nonzero(mask[:, :half])), int(np.count_nonzero(mask[:, half:]))
    uncertain = int(np.count_nonzero((p > UNCERTAIN[0]) & (p < UNCERTAIN[1])))
    return {
        "pred_iou": float(pred_iou),
        "area_fraction": area / mask.size,
        "components": float(len(sizes)),
        "stray_fraction": (area - n_lungs) / area if area else 0.0,
        "hole_fraction": (int(np.count_nonzero(filled)) - n_lungs) / max(n_lungs, 1),
        "balance": min(left, right) / max(left, right) if max(left, right) else 0.0,
        "uncertain_fraction": uncertain / max(area, 1),
        "mean_probability": float(p[mask].mean()) if area else 0.0,
    }


@dataclass(frozen=True)
class QcResult:
    """``score`` 0..1 (higher is better), ``flag`` (a human should look), ``reasons`` (signals out of their
    validation range, as text), ``features`` (:func:`qc_features`) and ``z`` (deviation per signal)."""

    score: float
    flag: bool
    reasons: list[str]
    features: dict = field(default_factory=dict)
    z: dict = field(default_factory=dict)

    def to_dict(self, details: bool = False) -> dict:
        """``{"score", "flag", "reasons"}`` (strict JSON), with ``features`` and ``z`` when ``details``."""
        d = {"score": round(float(self.score), 6), "flag": bool(self.flag), "reasons": list(self.reasons)}
        if details:
            d.update(features={k: round(float(v), 6) for k, v in self.features.items()},
                     z={k: round(float(v), 4) for k, v in self.z.items()})
        return d


@dataclass(frozen=True)
class QcCalibration:
    """Normal ranges of the signals on validation images.

    Attributes:
        center, scale: ``{signal: median}`` and ``{signal: robust scale}`` (see the module docstring).
        z_flag: deviation (in scales) beyond which an image is flagged.
        features: the signals used (a subset of :data:`FEATURES`).
        n: validation images calibrated on; source: where they came from (text).
    """

    center: dict
    scale: dict
    z_flag: float = DEFAULT_Z_FLAG
    features: tuple[str, ...] = FEATURES
    n: int = 0
    source: str = "validation"

    def __post_init__(self):
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise QcError(f"qc: unknown signal(s) {', '.join(unknown)} (known: {', '.join(FEATURES)})")
        for f in self.features:
            for name, d in (("center", self.center), ("scale", self.scale)):
                v = d.get(f)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                    raise QcError(f"qc: {name}[{f!r}] must be a finite number, got {v!r}")
            if not self.scale[f] > 0:
                raise QcError(f"qc: scale[{f!r}] must be > 0, got {self.scale[f]!r}")
        if isinstance(self.z_flag, bool) or not isinstance(self.z_flag, (int, float)) or not self.z_flag > 0:
            raise QcError(f"qc: z_flag must be a number > 0, got {self.z_flag!r}")

    def to_dict(self) -> dict:
        """The manifest / metrics section: ``{"format": "lungsam-qc/1", "features", "center", "scale", "bad_side",
        "z_flag", "n", "source", "uncertain_band"}`` (strict JSON)."""
        return {"format": FORMAT, "features": list(self.features),
                "center": {f: float(self.center[f]) for f in self.features},
                "scale": {f: float(self.scale[f]) for f in self.features},
                "bad_side": {f: BAD_SIDE[f] for f in self.features}, "z_flag": float(self.z_flag),
                "n": int(self.n), "source": self.source, "uncertain_band": list(UNCERTAIN)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "QcCalibration | None":
        """Inverse of :meth:`to_dict`; ``None`` (a run or bundle without quality calibration) gives ``None``.

        Raises:
            QcError: not an object, another format, a missing or bad value, or ``bad_side`` that differs from
                this version's :data:`BAD_SIDE` (another version's rule).
        """
        if d is None:
            return None
        if not isinstance(d, dict):
            raise QcError(f"qc must be a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise QcError(f"qc: format {d.get('format')!r} is not {FORMAT!r}")
        known = {"format", "features", "center", "scale", "bad_side", "z_flag", "n", "source", "uncertain_band"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QcError(f"qc: unknown key(s) {', '.join(unknown)}")
        try:
            feats = tuple(d["features"])
            center, scale = dict(d["center"]), dict(d["scale"])
        except (KeyError, TypeError) as e:
            raise QcError(f"qc: missing or malformed {e}") from None
        sides = d.get("bad_side", {})
        wrong = [f for f in feats if f in BAD_SIDE and sides.get(f, BAD_SIDE[f]) != BAD_SIDE[f]]
        if wrong:
            raise QcError(f"qc: bad_side of {', '.join(wrong)} differs from this version's rule")
        if list(d.get("uncertain_band", UNCERTAIN)) != list(UNCERTAIN):
            raise QcError(f"qc: uncertain_band {d.get('uncertain_band')} differs from this version's {list(UNCERTAIN)}")
        return cls(center=center, scale=scale, z_flag=d.get("z_flag", DEFAULT_Z_FLAG), features=feats,
                   n=int(d.get("n", 0)), source=str(d.get("source", "validation")))

    def deviations(self, features: dict) -> dict:
        """``{signal: z}``: scales beyond the validation median on the signal's bad side (0 inside)."""
        z = {}
        for f in self.features:
            d = (features[f] - self.center[f]) / self.scale[f]
            side = BAD_SIDE[f]
            z[f] = max(0.0, d if side == "high" else -d if side == "low" else abs(d))
        return z

    def assess(self, features: dict) -> QcResult:
        """:class:`QcResult` of one image's :func:`qc_features`."""
        z = self.deviations(features)
        worst = max(z.values()) if z else 0.0
        reasons = [f"{f} {features[f]:.3g} outside validation's range (median {self.center[f]:.3g}, {z[f]:.1f} scales)"
                   for f in sorted(z, key=lambda k: -z[k]) if z[f] > self.z_flag]
        empty = features.get("area_fraction", 1.0) == 0.0
        if empty:
            reasons.insert(0, "empty mask")
        score = 0.0 if empty else 1.0 / (1.0 + (worst / self.z_flag) ** 2)
        return QcResult(score=score, flag=bool(reasons), reasons=reasons, features=dict(features), z=z)


def tail_scale(values: np.ndarray, median: float, side: str) -> float:
    """The spread of ``values`` on their bad ``side``: (90th percentile - median) / 1.2816 for ``high``,
    (median - 10th percentile) / 1.2816 for ``low``, the larger of the two for ``both`` (a normal
    distribution's standard deviation; measured on the tail that matters, so heavy tails widen the range)."""
    hi = (float(np.quantile(values, 0.9)) - median) / 1.2816
    lo = (median - float(np.quantile(values, 0.1))) / 1.2816
    return hi if side == "high" else lo if side == "low" else max(hi, lo)


def calibrate(features: list[dict], z_flag: float = DEFAULT_Z_FLAG, signals: tuple[str, ...] = FEATURES,
              source: str = "validation") -> QcCalibration:
    """Normal ranges of ``signals`` from validation images' :func:`qc_features` (at least 3 images)."""
    if len(features) < 3:
        raise ValueError(f"quality calibration needs at least 3 validation images, got {len(features)}")
    center, scale = {}, {}
    for f in signals:
        v = np.asarray([x[f] for x in features], np.float64)
        med = float(np.median(v))
        center[f] = med
        scale[f] = max(tail_scale(v, med, BAD_SIDE[f]), MIN_SCALE[f])
    return QcCalibration(center=center, scale=scale, z_flag=z_flag, features=tuple(signals), n=len(features),
                         source=source)


def auroc(scores: list[float], bad: list[bool]) -> float | None:
    """Area under the ROC curve of ``1 - score`` as a detector of ``bad`` (ties count half); ``None`` when
    ``bad`` is all true or all false."""
    s = -np.asarray(scores, np.float64)  # low score = likely bad
    b = np.asarray(bad, bool)
    pos, neg = s[b], s[~b]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def detection_summary(results: list[QcResult], f1: list[float], bad_below: float = 0.90) -> dict:
    """How well the flag finds bad masks (F1 < ``bad_below``): ``{"n", "bad", "auroc", "flagged", "flagged_share",
    "bad_caught", "bad_caught_share", "precision", "bad_below"}`` (strict JSON: ``None`` where undefined)."""
    bad = [x < bad_below for x in f1]
    flags = [r.flag for r in results]
    n_bad, n_flag = sum(bad), sum(flags)
    caught = sum(b and f for b, f in zip(bad, flags))
    return {"n": len(f1), "bad_below": bad_below, "bad": n_bad, "auroc": auroc([r.score for r in results], bad),
            "flagged": n_flag, "flagged_share": n_flag / len(f1) if f1 else None,
            "bad_caught": caught, "bad_caught_share": caught / n_bad if n_bad else None,
            "precision": caught / n_flag if n_flag else None}
