"""The allowed range of every numeric setting, defined once (torch-free, no click).

The click options (:func:`lungsam.options.ranged`) and the config dataclasses (``__post_init__`` through
:func:`check_fields`) both read :data:`RANGES`, so ``lungsam train --lr 0`` and ``TrainConfig(lr=0)`` are
refused with the same rule before any work (no run folder is made). Floats must also be finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import ConfigError


@dataclass(frozen=True)
class Range:
    """An int or float range: ``low``/``high`` bounds (``None``: unbounded), each closed unless ``*_open``;
    ``optional``: ``None`` is allowed (the setting's "default" value)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        """The rule in words, e.g. ``a number > 0`` or ``an integer in [32, 2048]``."""
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {lo}{_fmt(self.low)}, {_fmt(self.high)}{hi}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return what

    def problem(self, value: Any) -> str | None:
        """``None`` when ``value`` is allowed, else the reason (``must be ..., got ...``)."""
        if value is None and self.optional:
            return None
        ok_type = isinstance(value, bool) is False and (
            isinstance(value, int) if self.kind is int else isinstance(value, (int, float)))
        if not ok_type:
            return f"must be {self.describe()}, got {value!r}"
        if self.kind is float and not math.isfinite(value):
            return f"must be {self.describe()}, got {value!r}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            return f"must be {self.describe()}, got {_fmt(value)}"
        return None


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


INT_POS = Range(int, 1)                      # counts: epochs, batch sizes, images, jobs
INT_NONNEG = Range(int, 0)                   # seeds, fold numbers, counts that may be zero
PROBABILITY_OPEN = Range(float, 0.0, 1.0, low_open=True, high_open=True)

#: Setting name (a config field, or the option's name without ``--``) -> its range.
RANGES: dict[str, Range] = {
    # working resolution: images and masks are resized to S x S; below 32 the lungs are a few pixels wide,
    # above 2048 the per-image arrays outgrow a radiograph's native size (and the bundle manifest's limit)
    "size": Range(int, 32, 2048),
    "encoder_size": Range(int, 16, 4096, optional=True),  # each backbone checks its own grid multiple
    "points_per_lung": Range(int, 1, 64),
    "folds": Range(int, 1, 100),  # 1 = one 60/20/20 split, k >= 3 = k-fold (data.kfold_splits refuses 2)
    "epochs": INT_POS,
    "patience": INT_POS,
    "min_delta": Range(float, 0.0),
    "lr": Range(float, 0.0, low_open=True),
    "weight_decay": Range(float, 0.0),
    "batch_size": INT_POS,
    "embed_batch_size": INT_POS,
    "box_jitter": Range(float, 0.0, 0.5),
    "augment_views": INT_NONNEG,
    "opacity_prob": Range(float, 0.0, 1.0),
    "lora_rank": INT_NONNEG,
    "lora_alpha": Range(float, 0.0, low_open=True),
    "seed": INT_NONNEG,
    "threshold": PROBABILITY_OPEN,           # a probability threshold; 0 or 1 makes every pixel one class
    "min_agreement": Range(float, 0.0, 1.0),  # the export parity gate (mask F1 vs torch)
    "max_int8_f1_drop": Range(float, 0.0),   # the export INT8 gate (F1 against ground truth vs torch FP32)
    "max_jitter_log_odds_shift": Range(float, 0.0, 100.0),  # the export gate at the quality flag's prompt variants
    "calibration_images": INT_POS,
    "opset": Range(int, 13, 23),             # ONNX opsets the exporter and onnxruntime both take
    "max_batch": INT_POS,
    "res_units": INT_NONNEG,
    "channels": INT_POS,                     # each U-Net level's feature maps
    "images": INT_POS,
    "subset": Range(int, 1, optional=True),
    "fold": Range(int, 0, optional=True),
    "jobs": INT_POS,
}

#: Devices a training-side command takes (``auto``: cuda when torch sees one, else cpu).
TRAIN_DEVICES = ("auto", "cpu", "cuda")


def check(name: str, value: Any, owner: str = "") -> None:
    """Raise :class:`ConfigError` naming ``owner.name`` when ``value`` is outside ``RANGES[name]``."""
    why = RANGES[name].problem(value)
    if why:
        raise ConfigError(f"{owner + '.' if owner else ''}{name} {why}")


def check_each(name: str, values: Iterable[Any], owner: str = "", rng: Range | None = None) -> None:
    """:func:`check` for every item of a sequence field (``thresholds``, ``channels``)."""
    rule = rng or RANGES[name]
    for v in values:
        why = rule.problem(v)
        if why:
            raise ConfigError(f"{owner + '.' if owner else ''}{name}: every item {why}")


def check_fields(obj: Any, names: Iterable[str]) -> None:
    """Check the dataclass ``obj``'s fields ``names`` against :data:`RANGES` (for ``__post_init__``)."""
    for n in names:
        check(n, getattr(obj, n), type(obj).__name__)


def check_choice(name: str, value: Any, choices: Iterable[str], owner: str = "") -> None:
    """Raise :class:`ConfigError` when ``value`` is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        where = f"{owner}.{name}" if owner else name
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
