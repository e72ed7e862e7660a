"""A hospital's own operating point for the quality flag (format ``lungsam-qc-site/1``, ``lungsam qc-site``).

A bundle's flag line (``manifest.qc.flag_below``, :class:`lungsam.qc.QcModel`) is set on the training
hospital's validation images. Its ranking of good and bad masks carries to another hospital (AUROC 0.79-0.86
on Shenzhen for five Montgomery folds), its line does not: the same line flagged 12-37 % of Shenzhen's images
(results/quality/README.md). A site therefore sets its own line from a batch of its own radiographs, without
ground truth: the score below which the share of that batch it can afford to review falls (``flag_share``).

The site file binds the line to one bundle (its digest, the sha256 of ``manifest.json``) and records where the
scores came from (the ``lungsam predict`` run, the sha256 of its ``predictions.jsonl``, the backend and precision
that ran) and what the bundle's own line would have flagged on the same batch, so an auditor can see both.
Applying it (:func:`site_quality_model`) changes only ``flag_below``; the score of every image is unchanged.

This module names, writes, reads and validates the file (torch-free; the runtime reads it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .artifacts import loads_json_strict, package_versions, utc_now, write_json_atomic
from .qc import QcError, QcModel

FORMAT = "lungsam-qc-site/1"
#: Fewest images a line is set from by default: the 10th percentile of 50 scores rests on 5 of them.
DEFAULT_MIN_IMAGES = 50
#: Quantiles of the batch's scores the file records (an auditor sees the distribution the line was cut from).
QUANTILES = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)
_HEX = set("0123456789abcdef")


class SiteQcError(QcError):
    """A site operating point that cannot be made, read or applied (the message says why)."""


def choose_line(scores: Sequence[float], flag_share: float, min_images: int = DEFAULT_MIN_IMAGES) -> float:
    """The flag line that flags ``floor(flag_share * n)`` of ``scores`` (flag = score < line): midway between
    the k-th and (k+1)-th lowest score, so the count on this batch is exact unless those two are tied (then fewer
    are flagged; :attr:`SiteOperatingPoint.flagged` records the count reached).

    Raises :class:`SiteQcError` for fewer than ``min_images`` scores, a share outside (0, 1), a share that
    flags no image of this batch, or a line outside (0, 1) (the batch's scores at the cut are all 0: empty masks).
    """
    s = np.sort(np.asarray(list(scores), np.float64))
    if not 0.0 < flag_share < 1.0:
        raise SiteQcError(f"flag share {flag_share!r}: expected a number in (0, 1)")
    if len(s) < min_images:
        raise SiteQcError(f"{len(s)} scored images: a site line needs at least {min_images} (the share's cut rests "
                          f"on floor(share x n) of them); score a larger batch")
    if not np.all(np.isfinite(s)) or s[0] < 0.0 or s[-1] > 1.0:
        raise SiteQcError("quality scores must be finite numbers in [0, 1]")
    k = math.floor(flag_share * len(s))
    if k < 1:
        raise SiteQcError(f"flag share {flag_share:g} of {len(s)} images flags none of them; raise the share or "
                          "score more images")
    line = float((s[k - 1] + s[k]) / 2.0)
    if not 0.0 < line < 1.0:
        raise SiteQcError(f"the line at share {flag_share:g} would be {line:g} (scores at the cut: {s[k - 1]:g}, "
                          f"{s[k]:g}); a line must lie in (0, 1)")
    return line


@dataclass(frozen=True)
class SiteOperatingPoint:
    """One site's flag line for one bundle (the file ``lungsam qc-site`` writes).

    Attributes:
        bundle_digest: sha256 (64 lowercase hex) of the bundle's ``manifest.json``; the line applies to it only.
        flag_below: the site's line in (0, 1) (flag = score < line, or an empty mask).
        flag_share: the share of the batch asked to be flagged.
        n: images scored; flagged: of them flagged at the site's line (empty masks included).
        bundle_flag_below: the bundle's own line; bundle_flagged: what it flagged on the same batch.
        score_quantiles: ``{"p05": ..., ..., "p95": ...}`` of the batch's scores.
        source: where the scores came from (``predict_run``, ``predictions_sha256``, ``segmenter``: backend, device,
            precision).
        created, versions: when and with what it was made.
    """

    bundle_digest: str
    flag_below: float
    flag_share: float
    n: int
    flagged: int
    bundle_flag_below: float
    bundle_flagged: int
    score_quantiles: dict
    source: dict = field(default_factory=dict)
    created: str = ""
    versions: dict = field(default_factory=dict)

    def __post_init__(self):
        d = self.bundle_digest
        if not isinstance(d, str) or len(d) != 64 or not set(d) <= _HEX:
            raise SiteQcError(f"bundle_digest: expected 64 lowercase hex digits, got {d!r}")
        for name in ("flag_below", "flag_share", "bundle_flag_below"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
                raise SiteQcError(f"{name}: expected a number in (0, 1), got {v!r}")
        for name in ("n", "flagged", "bundle_flagged"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SiteQcError(f"{name}: expected a whole number >= 0, got {v!r}")
        if self.flagged > self.n or self.bundle_flagged > self.n:
            raise SiteQcError(f"flagged counts ({self.flagged}, {self.bundle_flagged}) exceed n = {self.n}")
        want = {quantile_key(q) for q in QUANTILES}
        if not isinstance(self.score_quantiles, dict) or set(self.score_quantiles) != want:
            raise SiteQcError(f"score_quantiles: expected the keys {', '.join(sorted(want))}")
        for k, v in self.score_quantiles.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise SiteQcError(f"score_quantiles.{k}: expected a number in [0, 1], got {v!r}")
        if not isinstance(self.source, dict) or not isinstance(self.versions, dict):
            raise SiteQcError("source and versions must be objects")

    def to_dict(self) -> dict[str, Any]:
        """The file's content (strict JSON, ``format`` first)."""
        return {"format": FORMAT, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, d: Any) -> "SiteOperatingPoint":
        """Inverse of :meth:`to_dict`; another format, a missing or unknown key, or a bad value is refused."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise SiteQcError(f"not a site operating point (expected format {FORMAT!r})")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names) - {"format"})
        if unknown:
            raise SiteQcError(f"unknown key(s) {', '.join(unknown)}")
        missing = [k for k in names[:8] if k not in d]
        if missing:
            raise SiteQcError(f"missing key(s) {', '.join(missing)}")
        return cls(**{k: d[k] for k in names if k in d})


def quantile_key(q: float) -> str:
    """``0.05 -> "p05"``, ``0.5 -> "p50"``."""
    return f"p{round(q * 100):02d}"


def site_operating_point(scores: Sequence[float], flag_share: float, *, bundle_digest: str,
                         bundle_flag_below: float, source: dict,
                         min_images: int = DEFAULT_MIN_IMAGES) -> SiteOperatingPoint:
    """The site line for a batch's quality ``scores`` (one per segmented image; an empty mask scores 0,
    :func:`choose_line`), beside what the bundle's own line flags of them (score < ``bundle_flag_below``, as
    :meth:`lungsam.qc.QcModel.assess` flags)."""
    s = np.asarray(list(scores), np.float64)
    line = choose_line(s, flag_share, min_images)
    return SiteOperatingPoint(
        bundle_digest=bundle_digest, flag_below=line, flag_share=float(flag_share), n=int(len(s)),
        flagged=int(np.sum(s < line)), bundle_flag_below=float(bundle_flag_below),
        bundle_flagged=int(np.sum(s < bundle_flag_below)),
        score_quantiles={quantile_key(q): float(np.quantile(s, q)) for q in QUANTILES},
        source=dict(source), created=utc_now(), versions=package_versions(("lungsam", "numpy")))


def write_site_file(path: str | Path, op: SiteOperatingPoint) -> None:
    """Write ``op`` atomically as strict JSON."""
    write_json_atomic(path, op.to_dict(), nonfinite="error")


def read_site_file(path: str | Path) -> tuple[SiteOperatingPoint, str]:
    """Read and validate a site file: ``(operating point, sha256 of the bytes read)``; raises
    :class:`SiteQcError` naming the file and the problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SiteQcError(f"{path}: cannot read the site operating point: {e.strerror or e}") from e
    try:
        return SiteOperatingPoint.from_dict(loads_json_strict(data.decode("utf-8"))), hashlib.sha256(data).hexdigest()
    except ValueError as e:  # JSON syntax or encoding, or SiteQcError (a ValueError) from the checks
        raise SiteQcError(f"{path}: {e}") from None


def score_line_model(model: object, bundle: str = "this bundle") -> QcModel:
    """``model`` (a bundle's :func:`lungsam.qc.load_calibration`) when it has a score line a site can move: a
    :class:`lungsam.qc.QcModel`; :class:`SiteQcError` for no quality model or a version 1 calibration."""
    if model is None:
        raise SiteQcError(f"{bundle} has no quality model (manifest section qc): a site line has nothing to move")
    if not isinstance(model, QcModel):
        raise SiteQcError(f"{bundle}'s quality flag is version 1 (lungsam-qc/1, ranges per signal, no score line); "
                          "a site line needs a bundle exported since lungsam-qc/2")
    return model


def site_quality_model(model: object, op: SiteOperatingPoint, bundle_digest: str | None) -> QcModel:
    """``model`` (the bundle's :class:`lungsam.qc.QcModel`) with the site's line; refused for another bundle, a
    bundle without a digest or a quality model, or a version 1 calibration (which has no score line)."""
    model = score_line_model(model)
    if bundle_digest != op.bundle_digest:
        raise SiteQcError(f"the site operating point was made for bundle {op.bundle_digest[:16]}..., not this one "
                          f"({(bundle_digest or 'no digest')[:16]}...); make one for this bundle with lungsam qc-site")
    return dataclasses.replace(model, flag_below=float(op.flag_below),
                               source=f"{model.source}; site line {op.flag_below:.4f} (share {op.flag_share:g} of "
                                      f"{op.n} site images)")
