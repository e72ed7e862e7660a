"""Training configuration, saved with every run (``run.json``) and checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

DEFAULT_THRESHOLDS = (0.50, 0.55, 0.60, 0.65, 0.70)


@dataclass
class TrainConfig:
    """Decoder fine-tuning settings (defaults follow Carvalho & Almeida, CIARP 2024).

    Attributes:
        data: data set folders (pooled), or ``demo:montgomery`` for the packaged sample.
        backbone: registry name; checkpoint: weights path (``None``: official weights from the cache).
        prompt: ``points`` | ``box`` | ``both`` | ``auto-box``; points_per_lung: k.
        size: working resolution S (images and masks are resized to S x S; metrics are computed there).
        folds: 1 = one 60/20/20 split; k >= 3 = k-fold cross-validation.
        epochs, patience, min_delta: maximum epochs; training stops once the best validation F1 has not
            risen by at least ``min_delta`` for ``patience`` epochs.
        lr, weight_decay: Adam settings. batch_size: images per step (one prompt each).
        box_jitter: training-time box perturbation, as a fraction of the box side.
        thresholds: probability thresholds swept on validation.
        device: ``auto`` | ``cpu`` | ``cuda``; amp: mixed precision on cuda.
    """

    data: list[str] = field(default_factory=lambda: ["demo:montgomery"])
    backbone: str = "mobile_sam"
    checkpoint: str | None = None
    prompt: str = "points"
    points_per_lung: int = 3
    size: int = 256
    folds: int = 5
    epochs: int = 100
    patience: int = 10
    min_delta: float = 1e-3
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 4
    box_jitter: float = 0.05
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    embed_batch_size: int = 4

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = list(self.thresholds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "thresholds" in kw:
            kw["thresholds"] = tuple(kw["thresholds"])
        return cls(**kw)

    def comparable(self) -> dict:
        """The settings that must match for ``--resume`` to continue a run."""
        d = self.to_dict()
        d.pop("device", None)
        d.pop("embed_batch_size", None)
        return d
