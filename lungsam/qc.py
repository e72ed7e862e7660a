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
* ``soft_fraction``: pixels with probability in (0.2, 0.8) / lung area (issue 22's uncertain band).
* ``border_entropy``: mean binary entropy (bits) of the probability over the mask's border band (pixels within
  :data:`BORDER_BAND` of the working frame's side of the mask's edge, inside or outside).
* ``two_pass_iou`` (only given a second probability map, :func:`qc_features`'s ``second``): IoU of the masks of
  the one-pass and the two-pass prediction (low is bad).

Shape plausibility (``shape_residual``, ``shape_distance``) needs the run's shape model
(:class:`ShapeModel`) and comes with the version 2 calibration (:class:`QcModel`).

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

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import LungsamError
from .metrics import iou_score
from .postprocess import CleanupSpec, clean_mask, components, kept_components

FORMAT = "lungsam-qc/1"
FEATURES = ("pred_iou", "area_fraction", "components", "stray_fraction", "hole_fraction", "balance",
            "uncertain_fraction", "mean_probability", "soft_fraction", "border_entropy")
TWO_PASS = "two_pass_iou"
BAD_SIDE = {"pred_iou": "low", "area_fraction": "both", "components": "high", "stray_fraction": "high",
            "hole_fraction": "high", "balance": "low", "uncertain_fraction": "high", "mean_probability": "low",
            "soft_fraction": "high", "border_entropy": "high"}
MIN_SCALE = {"pred_iou": 0.005, "area_fraction": 0.01, "components": 1.0, "stray_fraction": 0.002,
             "hole_fraction": 0.002, "balance": 0.02, "uncertain_fraction": 0.005, "mean_probability": 0.005,
             "soft_fraction": 0.005, "border_entropy": 0.01}
#: The signals version 1 calibrations (:class:`QcCalibration`) were made with.
V1_FEATURES = FEATURES[:8]
DEFAULT_Z_FLAG = 4.0
UNCERTAIN = (0.1, 0.9)
SOFT = (0.2, 0.8)
#: Half-width of the border band, as a fraction of the working frame's side (3 px at 256).
BORDER_BAND = 3 / 256


class QcError(LungsamError, ValueError):
    """A ``qc`` section that is not a valid :class:`QcCalibration`."""


def qc_features(prob: np.ndarray, threshold: float, pred_iou: float, cleanup: CleanupSpec | None = None,
                second: np.ndarray | None = None) -> dict:
    """The signals of one image (see the module docstring) from its working-frame probability ``(S, S)``
    float, the probability ``threshold``, the decoder's predicted IoU and the clean-up size rules (``cleanup``;
    its ``enabled`` does not matter here: the rules say which components are lungs). ``second``: the two-pass
    probability ``(S, S)`` of the same image, which adds ``two_pass_iou``. Plain floats."""
    p = np.asarray(prob, np.float32)
    if p.ndim != 2:
        raise ValueError(f"qc_features takes one (S, S) probability map, got shape {p.shape}")
    mask = p > threshold
    area = int(np.count_nonzero(mask))
    out = {"pred_iou": float(pred_iou), "area_fraction": area / mask.size, **_component_signals(mask, cleanup)}
    half = mask.shape[1] // 2
    left, right = int(np.count_nonzero(mask[:, :half])), int(np.count_nonzero(mask[:, half:]))
    out["balance"] = min(left, right) / max(left, right) if max(left, right) else 0.0
    out["uncertain_fraction"] = _band_count(p, UNCERTAIN) / max(area, 1)
    out["mean_probability"] = float(p[mask].mean()) if area else 0.0
    out["soft_fraction"] = _band_count(p, SOFT) / max(area, 1)
    out["border_entropy"] = border_entropy(p, mask)
    if second is not None:
        out[TWO_PASS] = iou_score(mask, np.asarray(second, np.float32) > threshold)
    return out


def _band_count(p: np.ndarray, band: tuple[float, float]) -> int:
    return int(np.count_nonzero((p > band[0]) & (p < band[1])))


def _component_signals(mask: np.ndarray, cleanup: CleanupSpec | None) -> dict:
    """``components``, ``stray_fraction`` and ``hole_fraction`` of a thresholded mask ``(S, S)`` bool."""
    from scipy import ndimage

    area = int(np.count_nonzero(mask))
    labels, sizes = components(mask)
    kept = kept_components(sizes, mask.size, cleanup or CleanupSpec())
    lungs = np.isin(labels, kept) if kept else np.zeros_like(mask)
    n_lungs = int(np.count_nonzero(lungs))
    filled = np.zeros_like(mask)
    for k in kept:
        filled |= ndimage.binary_fill_holes(labels == k)
    return {"components": float(len(sizes)), "stray_fraction": (area - n_lungs) / area if area else 0.0,
            "hole_fraction": (int(np.count_nonzero(filled)) - n_lungs) / max(n_lungs, 1)}


def border_entropy(p: np.ndarray, mask: np.ndarray) -> float:
    """Mean binary entropy (bits) of probabilities ``p`` ``(S, S)`` over the band of pixels within
    :data:`BORDER_BAND` (of S) of the edge of ``mask`` ``(S, S)`` bool; 1.0 (the most unsure) for an empty mask."""
    from scipy import ndimage

    if not mask.any():
        return 1.0
    r = max(1, int(round(BORDER_BAND * mask.shape[0])))
    band = ndimage.binary_dilation(mask, iterations=r) & ~ndimage.binary_erosion(mask, iterations=r)
    q = np.clip(p[band].astype(np.float64), 1e-6, 1 - 1e-6)
    return float(np.mean(-(q * np.log2(q) + (1 - q) * np.log2(1 - q))))


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

    def assess_map(self, prob: np.ndarray, threshold: float, pred_iou: float, cleanup: CleanupSpec | None = None,
                   second: np.ndarray | None = None, image: np.ndarray | None = None, variants=None) -> QcResult:
        """:class:`QcResult` of one image from its working-frame probability ``(S, S)`` (``second``, ``image``
        and ``variants`` are unused by this version's signals)."""
        return self.assess(qc_features(prob, threshold, pred_iou, cleanup))


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


# ---- version 2: shape model and a calibrated logistic model (issue 22) -----------------------------------------

FORMAT_V2 = "lungsam-qc/2"
SHAPE_FEATURES = ("shape_residual", "shape_distance")
IMAGE_FEATURES = ("edge_contrast", "edge_contrast_min")
#: The bands of :func:`image_signals`, as fractions of the working frame's side (at 256: outside 2..8 px, inside 6).
EDGE_OUT = (2 / 256, 8 / 256)
EDGE_IN = 6 / 256
SHAPE_SIZE = 32
SHAPE_COMPONENTS = 6
#: Standardised signals are clipped to +-Z_CLIP before the logistic model (one wild value cannot dominate).
Z_CLIP = 6.0
#: Signals the logistic model reads through ``log1p`` (counts and heavy-tailed fractions).
LOG_SIGNALS = ("components", "stray_fraction", "hole_fraction")


def working_gray(image: np.ndarray, size: int) -> np.ndarray:
    """An image ``(H, W)`` or ``(H, W, C)`` of any intensity range (the working-frame RGB ``(S, S, 3)`` uint8, or
    the runtime's resized model input) -> ``(size, size)`` float32 gray, its 2nd..98th percentiles mapped to 0..1."""
    from PIL import Image

    a = np.asarray(image, np.float32)
    if a.ndim == 3:
        a = a.mean(axis=2) if a.shape[2] in (1, 3, 4) else a.mean(axis=0)
    if a.ndim != 2:
        raise ValueError(f"the quality flag's image must be (H, W) or (H, W, C), got shape {np.shape(image)}")
    if a.shape != (size, size):
        a = np.asarray(Image.fromarray(a, mode="F").resize((size, size), Image.BILINEAR), np.float32)
    lo, hi = np.percentile(a, [2, 98])
    return (a - lo) / max(float(hi - lo), 1e-6)


def image_signals(image: np.ndarray, mask: np.ndarray) -> dict:
    """``edge_contrast`` and ``edge_contrast_min`` of a working-frame mask ``(S, S)`` bool on its image
    (:func:`working_gray`): mean normalised intensity of a band just outside the mask minus that of a band just
    inside (over the whole border, and the lowest of 8 angular sectors around the mask's centre). Lung is dark on a
    radiograph; a mask that stops short of the lung has lung (dark) outside its edge too: low contrast is bad."""
    from scipy import ndimage

    m = np.asarray(mask, bool)
    if not m.any():
        return {"edge_contrast": 0.0, "edge_contrast_min": 0.0}
    g = working_gray(image, m.shape[0])
    r = lambda f: max(1, round(f * m.shape[0]))  # noqa: E731
    outside = (ndimage.binary_dilation(m, iterations=r(EDGE_OUT[1]))
               & ~ndimage.binary_dilation(m, iterations=r(EDGE_OUT[0])))
    inside = m & ~ndimage.binary_erosion(m, iterations=r(EDGE_IN))
    if not outside.any() or not inside.any():
        return {"edge_contrast": 0.0, "edge_contrast_min": 0.0}
    cy, cx = (float(v.mean()) for v in np.nonzero(m))

    def sectors(band):
        y, x = np.nonzero(band)
        return y, x, ((np.arctan2(y - cy, x - cx) + np.pi) / (2 * np.pi) * 8).astype(int) % 8

    yo, xo, so = sectors(outside)
    yi, xi, si = sectors(inside)
    per = [g[yo[so == s], xo[so == s]].mean() - g[yi[si == s], xi[si == s]].mean()
           for s in range(8) if (so == s).sum() > 10 and (si == s).sum() > 10]
    whole = float(g[outside].mean() - g[inside].mean())
    return {"edge_contrast": whole, "edge_contrast_min": float(min(per)) if per else whole}


def good_sign(signal: str) -> float:
    """+1 where a higher (transformed) value of ``signal`` means a better mask, -1 where it means a worse one."""
    if signal == TWO_PASS or signal in IMAGE_FEATURES or BAD_SIDE.get(signal) == "low":
        return 1.0
    return -1.0  # "high", "both" (as a distance from the median) and the shape signals


def transform_signal(signal: str, x: float, center: float) -> float:
    """The value the logistic model reads (see :class:`QcModel`)."""
    if signal in LOG_SIGNALS:
        return float(np.log1p(max(x, 0.0)))
    if BAD_SIDE.get(signal) == "both":
        return abs(x - center)
    return x


def shape_vector(mask: np.ndarray, size: int = SHAPE_SIZE) -> np.ndarray:
    """A mask ``(S, S)`` bool -> ``(size * size,)`` float64: its area average at ``size x size`` (values 0..1)."""
    from PIL import Image

    m = Image.fromarray(np.asarray(mask, np.float32), mode="F")
    return np.asarray(m.resize((size, size), Image.BOX), np.float64).reshape(-1)


@dataclass(frozen=True)
class ShapeModel:
    """A low-dimensional model of plausible lung masks: PCA of the training masks at ``size x size``.

    Attributes:
        size: side of the shape frame (the working-frame mask is area-averaged to it).
        mean: ``(size * size,)`` mean training mask; components: ``(k, size * size)`` orthonormal rows;
        variances: ``(k,)`` variance of the training masks along each component (> 0).
    """

    size: int
    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray

    @classmethod
    def fit(cls, masks, size: int = SHAPE_SIZE, k: int = SHAPE_COMPONENTS) -> "ShapeModel":
        """PCA (numpy SVD) of training masks (a sequence of ``(S, S)`` bool, at least ``k + 1``)."""
        X = np.stack([shape_vector(m, size) for m in masks])
        if len(X) <= k:
            raise ValueError(f"a shape model of {k} components needs more than {k} training masks, got {len(X)}")
        mean = X.mean(0)
        _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
        var = np.maximum(s[:k] ** 2 / (len(X) - 1), 1e-6)
        return cls(size=size, mean=mean, components=vt[:k], variances=var)

    def signals(self, mask: np.ndarray) -> dict:
        """``shape_residual`` (RMS of the part of the mask the model cannot express, 0..1) and
        ``shape_distance`` (Mahalanobis distance of its coefficients) of a working-frame mask ``(S, S)`` bool."""
        d = shape_vector(mask, self.size) - self.mean
        c = self.components @ d
        resid = d - self.components.T @ c
        return {"shape_residual": float(np.sqrt(np.mean(resid ** 2))),
                "shape_distance": float(np.sqrt(np.sum(c ** 2 / self.variances)))}

    def to_dict(self) -> dict:
        return {"size": int(self.size), "mean": [round(float(x), 5) for x in self.mean],
                "components": [[round(float(x), 6) for x in row] for row in self.components],
                "variances": [float(x) for x in self.variances]}

    @classmethod
    def from_dict(cls, d) -> "ShapeModel":
        """Inverse of :meth:`to_dict`. Raises :class:`QcError` naming the key for a bad shape or value."""
        if not isinstance(d, dict) or sorted(d) != ["components", "mean", "size", "variances"]:
            raise QcError("qc.shape: expected an object with keys components, mean, size, variances")
        size = d["size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 4 <= size <= 128:
            raise QcError(f"qc.shape.size: expected an integer in 4..128, got {size!r}")
        try:
            mean, comp, var = (np.asarray(d[k], np.float64) for k in ("mean", "components", "variances"))
        except (TypeError, ValueError):
            raise QcError("qc.shape: mean, components and variances must be arrays of numbers") from None
        n = size * size
        if mean.shape != (n,) or comp.ndim != 2 or comp.shape[1] != n or var.shape != (comp.shape[0],):
            raise QcError(f"qc.shape: expected mean ({n},), components (k, {n}), variances (k,); got "
                          f"{mean.shape}, {comp.shape}, {var.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(comp)) and np.all(var > 0)):
            raise QcError("qc.shape: values must be finite and variances > 0")
        return cls(size=size, mean=mean, components=comp, variances=var)


def _finite(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise QcError(f"qc.{name}: expected a finite number, got {v!r}")
    return float(v)


#: The prompt-jitter signal: mean IoU of the masks of the decoder rerun with small prompt variants
#: (:func:`lungsam.prompts.jitter_prompts`) with the returned mask (low: the decoder is unsure where the lung is).
JITTER = "jitter_iou"
DEFAULT_JITTER_SHIFT = 0.03
#: Log-odds of a good mask lost per validation tail scale of jitter-agreement deficit (see :class:`JitterTerm`).
DEFAULT_JITTER_WEIGHT = 1.0
JITTER_MIN_SCALE = 0.005


def jitter_agreement(mask: np.ndarray, variants, threshold: float, cleanup: CleanupSpec | None = None) -> float:
    """Mean IoU of each variant's mask (probability ``(S, S)`` > ``threshold``, cleaned like the returned mask)
    with the returned ``mask`` ``(S, S)`` bool; ``variants``: the variants' working-frame probabilities."""
    spec = cleanup or CleanupSpec()
    return agreement_of_masks(mask, [clean_mask(np.asarray(v) > threshold, spec) for v in variants])


def agreement_of_masks(mask: np.ndarray, variant_masks) -> float:
    """:data:`JITTER` from masks already thresholded and cleaned: the mean IoU of each ``(S, S)`` bool variant mask
    with the returned ``mask``. The one definition the flag (:func:`jitter_agreement`) and the export's parity gate
    (:func:`lungsam.export.parity.compare_variants`) share."""
    masks = list(variant_masks)
    if not masks:
        raise QcError("prompt jitter: no variant maps")
    return float(np.mean([iou_score(m, mask) for m in masks]))


@dataclass(frozen=True)
class JitterTerm:
    """The prompt-jitter part of the version 2 flag, calibrated on a run's real validation images.

    The decoder is rerun on the image's embedding with each variant of the learned prompt (``variants``, made by
    :func:`lungsam.prompts.jitter_prompts` with ``shift``); :data:`JITTER` is the mean IoU of their masks with the
    returned mask. Its deficit ``d = clip((center - jitter_iou) / scale, 0, Z_CLIP)`` (``center``: the median over
    the validation images; ``scale``: the spread of their low tail, :func:`tail_scale`, floored at
    :data:`JITTER_MIN_SCALE`) lowers the flag's log-odds by ``weight * d``. The logistic model cannot learn this
    weight: its degraded copies are probability maps with no embedding to rerun, so it is a fixed rule.

    Attributes:
        shift: the prompt move, fraction of the working frame; variants: the variant names, in order.
        center, scale: from the validation images' jitter IoU; weight: log-odds per scale; n: images.
    """

    shift: float
    variants: tuple[str, ...]
    center: float
    scale: float
    weight: float = DEFAULT_JITTER_WEIGHT
    n: int = 0

    def __post_init__(self):
        if not 0.0 < _finite("jitter.shift", self.shift) <= 0.25:
            raise QcError(f"qc.jitter.shift: expected a number in (0, 0.25], got {self.shift!r}")
        if not self.variants or not all(isinstance(v, str) for v in self.variants):
            raise QcError("qc.jitter.variants: expected a non-empty list of names")
        if not 0.0 <= _finite("jitter.center", self.center) <= 1.0:
            raise QcError(f"qc.jitter.center: expected an IoU in [0, 1], got {self.center!r}")
        if not _finite("jitter.scale", self.scale) > 0:
            raise QcError(f"qc.jitter.scale: expected a number > 0, got {self.scale!r}")
        if not _finite("jitter.weight", self.weight) >= 0:
            raise QcError(f"qc.jitter.weight: expected a number >= 0, got {self.weight!r}")

    @classmethod
    def calibrate(cls, values, shift: float, variants, weight: float = DEFAULT_JITTER_WEIGHT,
                  min_scale: float = JITTER_MIN_SCALE) -> "JitterTerm":
        """From the validation images' :data:`JITTER` values (at least 3); ``scale`` at least ``min_scale``."""
        v = np.asarray(list(values), np.float64)
        if len(v) < 3:
            raise ValueError(f"prompt-jitter calibration needs at least 3 validation images, got {len(v)}")
        med = float(np.median(v))
        return cls(shift=float(shift), variants=tuple(variants), center=med,
                   scale=max(tail_scale(v, med, "low"), float(min_scale)), weight=float(weight), n=len(v))

    def contribution(self, value: float) -> float:
        """Its term of the log-odds of a good mask (<= 0)."""
        return -self.weight * float(np.clip((self.center - value) / self.scale, 0.0, Z_CLIP))

    def to_dict(self) -> dict:
        return {"signal": JITTER, "shift": float(self.shift), "variants": list(self.variants),
                "center": float(self.center), "scale": float(self.scale), "weight": float(self.weight),
                "n": int(self.n), "z_clip": Z_CLIP}

    @classmethod
    def from_dict(cls, d) -> "JitterTerm":
        """Inverse of :meth:`to_dict`; :class:`QcError` naming the key otherwise."""
        keys = {"signal", "shift", "variants", "center", "scale", "weight", "n", "z_clip"}
        if not isinstance(d, dict) or set(d) != keys:
            raise QcError(f"qc.jitter: expected an object with keys {', '.join(sorted(keys))}")
        if d["signal"] != JITTER or d["z_clip"] != Z_CLIP:
            raise QcError(f"qc.jitter: signal {d['signal']!r} / z_clip {d['z_clip']!r} differ from this version's "
                          f"{JITTER!r} / {Z_CLIP!r}")
        if not isinstance(d["variants"], list) or isinstance(d["n"], bool) or not isinstance(d["n"], int):
            raise QcError("qc.jitter: variants must be a list and n an integer")
        return cls(shift=d["shift"], variants=tuple(d["variants"]), center=d["center"], scale=d["scale"],
                   weight=d["weight"], n=d["n"])


@dataclass(frozen=True)
class QcModel:
    """The version 2 quality flag: a logistic model of P(good mask) on standardised signals.

    ``score = sigmoid(bias + sum_f weights[f] * clip((t(x_f) - mean[f]) / std[f], +-Z_CLIP))`` where ``t`` is
    ``log1p`` for :data:`LOG_SIGNALS`, the distance from the validation median ``|x - center[f]|`` for signals
    bad on both sides (``area_fraction``) and the identity otherwise; flagged when ``score < flag_below`` or the
    mask is empty. Each weight has the sign of its signal's good side (:func:`good_sign`), so a signal can only
    lower the score on its bad side. Fitted by :func:`lungsam.qc_fit.fit_quality_model` on a run's validation images and
    deterministically degraded copies of them.

    Attributes:
        features: signals used (:data:`FEATURES`, :data:`SHAPE_FEATURES`, optionally :data:`TWO_PASS`).
        mean, std, weights: ``{signal: float}``; bias: float; flag_below: the operating point (0..1).
        center: ``{signal: median over the real validation images}`` (for the reasons' text).
        shape: the :class:`ShapeModel` (needed when a shape signal is used).
        n: real validation images; n_degraded: degraded copies; source: where they came from (text).
        fit: how it was fitted (degradations, regularisation, target recall, figures on the fit set).
        jitter: the prompt-jitter term (:class:`JitterTerm`), or ``None``. A model with one reads :data:`JITTER`
            when the caller passes the variants' maps (``variants=``); a result without them (an interactive prompt,
            which the term was not calibrated for) is scored by the logistic model alone.
    """

    features: tuple[str, ...]
    mean: dict
    std: dict
    weights: dict
    bias: float
    flag_below: float
    center: dict
    shape: ShapeModel | None = None
    n: int = 0
    n_degraded: int = 0
    source: str = "validation"
    fit: dict = field(default_factory=dict)
    jitter: JitterTerm | None = None

    def __post_init__(self):
        known = FEATURES + SHAPE_FEATURES + IMAGE_FEATURES + (TWO_PASS,)
        unknown = [f for f in self.features if f not in known]
        if unknown or not self.features:
            raise QcError(f"qc.features: unknown or no signal(s) {unknown} (known: {', '.join(known)})")
        for name in ("mean", "std", "weights", "center"):
            d = getattr(self, name)
            if not isinstance(d, dict):
                raise QcError(f"qc.{name}: expected an object")
            for f in self.features:
                _finite(f"{name}[{f!r}]", d.get(f))
        if any(not self.std[f] > 0 for f in self.features):
            raise QcError("qc.std: every value must be > 0")
        _finite("bias", self.bias)
        if not 0.0 < _finite("flag_below", self.flag_below) < 1.0:
            raise QcError(f"qc.flag_below: expected a number in (0, 1), got {self.flag_below!r}")
        if self.shape is None and any(f in SHAPE_FEATURES for f in self.features):
            raise QcError("qc.shape: the shape signals need a shape model")

    @property
    def two_pass(self) -> bool:
        """Whether the model reads :data:`TWO_PASS` (the caller then passes the two-pass probability)."""
        return TWO_PASS in self.features

    @property
    def needs_image(self) -> bool:
        """Whether the model reads :data:`IMAGE_FEATURES` (the caller then passes the image)."""
        return any(f in IMAGE_FEATURES for f in self.features)

    def signals(self, prob: np.ndarray, threshold: float, pred_iou: float, cleanup: CleanupSpec | None = None,
                second: np.ndarray | None = None, image: np.ndarray | None = None, variants=None) -> dict:
        """:func:`qc_features` plus the shape signals, (given ``image``, see :func:`working_gray``) the image
        signals of the returned (cleaned) mask and (given ``variants``, the working-frame probabilities of the
        prompt variants named by :attr:`jitter`) :data:`JITTER`."""
        f = qc_features(prob, threshold, pred_iou, cleanup, second)
        mask = clean_mask(np.asarray(prob) > threshold, cleanup or CleanupSpec())
        if self.shape is not None:
            f.update(self.shape.signals(mask))
        if image is not None:
            f.update(image_signals(image, mask))
        elif self.needs_image:
            raise QcError("qc: this calibration reads the image (edge contrast); pass image=...")
        if variants is not None:
            maps = list(variants)
            if self.jitter is not None and len(maps) != len(self.jitter.variants):
                raise QcError(f"qc: {len(maps)} prompt-variant maps for the calibration's {len(self.jitter.variants)}")
            f[JITTER] = jitter_agreement(mask, maps, threshold, cleanup)
        return f

    def standardised(self, features: dict) -> dict:
        """``{signal: clipped standardised value}`` of one image's signals."""
        z = {}
        for f in self.features:
            x = transform_signal(f, float(features[f]), self.center[f])
            z[f] = float(np.clip((x - self.mean[f]) / self.std[f], -Z_CLIP, Z_CLIP))
        return z

    def assess(self, features: dict) -> QcResult:
        """:class:`QcResult` of one image's signals (:meth:`signals`); ``z`` holds each signal's contribution
        to the log-odds of a good mask (negative: towards a flag)."""
        if self.two_pass and TWO_PASS not in features:
            raise QcError("qc: this calibration reads two_pass_iou; pass the two-pass probability (second=...)")
        contrib = {f: self.weights[f] * v for f, v in self.standardised(features).items()}
        if self.jitter is not None and JITTER in features:
            contrib[JITTER] = self.jitter.contribution(float(features[JITTER]))
        logit = self.bias + sum(contrib.values())
        empty = features.get("area_fraction", 1.0) == 0.0
        score = 0.0 if empty else float(1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50))))
        flag = empty or score < self.flag_below
        reasons = ["empty mask"] if empty else []
        if flag and not empty:
            worst = sorted((f for f in contrib if contrib[f] < 0), key=lambda f: contrib[f])[:3]
            reasons += [f"{f} {features[f]:.3g} (validation median {self.median(f):.3g})" for f in worst]
        return QcResult(score=score, flag=bool(flag), reasons=reasons, features=dict(features), z=contrib)

    def without_jitter(self) -> "QcModel":
        """The model without its prompt-jitter term, flagging at the line it had before the term
        (``fit.flag_below_without_jitter``): what a site bound by latency runs (no variant decodes)."""
        if self.jitter is None:
            return self
        return replace(self, jitter=None, flag_below=float(self.fit.get("flag_below_without_jitter", self.flag_below)),
                       source=f"{self.source}; prompt jitter off")

    def median(self, signal: str) -> float:
        """The signal's median over the real validation images."""
        return self.jitter.center if signal == JITTER and self.jitter is not None else self.center[signal]

    def assess_map(self, prob: np.ndarray, threshold: float, pred_iou: float, cleanup: CleanupSpec | None = None,
                   second: np.ndarray | None = None, image: np.ndarray | None = None, variants=None) -> QcResult:
        """:class:`QcResult` of one image from its working-frame probability ``(S, S)`` (see :meth:`signals`)."""
        return self.assess(self.signals(prob, threshold, pred_iou, cleanup, second, image, variants))

    def to_dict(self) -> dict:
        """The manifest / metrics section (format ``lungsam-qc/2``, strict JSON)."""
        per = {k: {f: float(getattr(self, k)[f]) for f in self.features} for k in ("mean", "std", "weights", "center")}
        return {"format": FORMAT_V2, "features": list(self.features), **per, "bias": float(self.bias),
                "flag_below": float(self.flag_below), "log_signals": [f for f in LOG_SIGNALS if f in self.features],
                "z_clip": Z_CLIP, "uncertain_band": list(UNCERTAIN), "soft_band": list(SOFT),
                "border_band": BORDER_BAND, "edge_bands": [*EDGE_OUT, EDGE_IN],
                "shape": self.shape.to_dict() if self.shape is not None else None,
                "n": int(self.n), "n_degraded": int(self.n_degraded), "source": self.source, "fit": dict(self.fit),
                "jitter": self.jitter.to_dict() if self.jitter is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> "QcModel":
        """Inverse of :meth:`to_dict`. Raises :class:`QcError` naming the key (another format, an unknown key, a
        bad value, or a signal definition (bands, transforms) other than this version's)."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_V2:
            raise QcError(f"qc: expected an object of format {FORMAT_V2!r}")
        known = {"format", "features", "mean", "std", "weights", "center", "bias", "flag_below", "log_signals",
                 "z_clip", "uncertain_band", "soft_band", "border_band", "edge_bands", "shape", "n", "n_degraded",
                 "source", "fit", "jitter"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QcError(f"qc: unknown key(s) {', '.join(unknown)}")
        feats = tuple(d.get("features") or ())
        rules = {"log_signals": [f for f in LOG_SIGNALS if f in feats], "z_clip": Z_CLIP,
                 "uncertain_band": list(UNCERTAIN), "soft_band": list(SOFT), "border_band": BORDER_BAND,
                 "edge_bands": [*EDGE_OUT, EDGE_IN]}
        for k, v in rules.items():
            if k in d and d[k] != v:
                raise QcError(f"qc.{k}: {d[k]!r} differs from this version's {v!r}")
        try:
            return cls(features=feats, mean=d["mean"], std=d["std"], weights=d["weights"], bias=d["bias"],
                       flag_below=d["flag_below"], center=d["center"],
                       shape=None if d.get("shape") is None else ShapeModel.from_dict(d["shape"]),
                       n=int(d.get("n", 0)), n_degraded=int(d.get("n_degraded", 0)),
                       source=str(d.get("source", "validation")), fit=dict(d.get("fit") or {}),
                       jitter=None if d.get("jitter") is None else JitterTerm.from_dict(d["jitter"]))
        except KeyError as e:
            raise QcError(f"qc: missing key {e}") from None


def load_calibration(d: dict | None) -> "QcModel | QcCalibration | None":
    """A run's or bundle's ``qc`` section: :class:`QcModel` (``lungsam-qc/2``), :class:`QcCalibration` (an
    older ``lungsam-qc/1``), or ``None`` when absent. Both answer ``assess_map(prob, threshold, pred_iou,
    cleanup, second=None, image=None, variants=None)``. Raises :class:`QcError` for anything else."""
    if d is None:
        return None
    if isinstance(d, dict) and d.get("format") == FORMAT_V2:
        return QcModel.from_dict(d)
    return QcCalibration.from_dict(d)


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
