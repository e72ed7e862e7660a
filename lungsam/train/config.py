"""Training configuration, saved with every run (``run.json``) and checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..prompts import PROMPT_MODES
from ..ranges import RANGES, TRAIN_DEVICES, check, check_choice, check_each

if TYPE_CHECKING:  # Python 3.11+ (annotations are not evaluated at run time here)
    from typing import Self

DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, 0.10, ..., 0.95


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``"LO:HI:STEP"`` (both ends included) or ``"a,b,c"`` -> sorted unique probabilities in (0, 1).

    Raises:
        ValueError: naming ``--thresholds`` and what is wrong.
    """
    try:
        if ":" in text:
            lo, hi, step = (float(x) for x in text.split(":"))
            if step <= 0 or hi < lo:
                raise ValueError
            vals = [round(lo + i * step, 6) for i in range(int(round((hi - lo) / step)) + 1)]
        else:
            vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--thresholds {text!r}: give LO:HI:STEP (e.g. 0.05:0.95:0.05) or a comma list") from None
    bad = [v for v in vals if not 0.0 < v < 1.0]
    if not vals or bad:
        raise ValueError(f"--thresholds {text!r}: thresholds must be probabilities in (0, 1)"
                         + (f" (got {bad[0]})" if bad else ""))
    return tuple(sorted(set(vals)))


AUGMENT_POLICIES = ("affine", "acquisition")  # the --augment-policy choices (lungsam.train.augment)


def check_augment_options(cfg) -> None:
    """``augment_policy`` is a known policy (``opacity_prob``'s range is checked with the others); either set
    away from its default needs ``augment_views > 0`` (they shape the augmented views; without views there are
    none to shape).

    Raises:
        ConfigError: naming the field.
    """
    owner = type(cfg).__name__
    check_choice("augment_policy", cfg.augment_policy, AUGMENT_POLICIES, owner)
    if cfg.augment_views <= 0 and (cfg.augment_policy != "affine" or cfg.opacity_prob > 0):
        raise ConfigError(f"{owner}.augment_views: --augment-policy/--opacity-prob shape the augmented views; "
                          "give --augment N (N >= 1) with them")


class DictConfig:
    """``to_dict``/``from_dict`` for the training config dataclasses: JSON-ready dicts (tuples as lists), read
    back with tuple fields restored and keys this version does not know ignored. A tuple field is one whose
    default is a tuple (a field typed ``tuple | None`` with default ``None`` would come back as a list).

    Built configs validate themselves (``__post_init__``): every field named in :data:`lungsam.ranges.RANGES`
    (each item of a tuple field), ``thresholds`` in (0, 1), ``device`` one of ``auto``/``cpu``/``cuda``; a
    value outside raises :class:`lungsam.errors.ConfigError` naming the class and field."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in RANGES:
                if isinstance(value, (tuple, list)):
                    check_each(f.name, value, owner)
                else:
                    check(f.name, value, owner)
        if hasattr(self, "thresholds"):
            check_each("thresholds", self.thresholds, owner, RANGES["threshold"])
        if hasattr(self, "device"):
            check_choice("device", self.device, TRAIN_DEVICES, owner)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        return cls(**{f.name: tuple(d[f.name]) if isinstance(f.default, tuple) else d[f.name]
                      for f in fields(cls) if f.name in d})


@dataclass
class TrainConfig(DictConfig):
    """Decoder fine-tuning settings (defaults follow Carvalho & Almeida, CIARP 2024).

    Attributes:
        data: data set folders (pooled), or ``demo:montgomery`` for the packaged sample.
        backbone: registry name; checkpoint: weights path (``None``: official weights from the cache).
        prompt: ``points`` | ``box`` | ``both`` | ``auto-box`` | ``auto-both``; points_per_lung: k.
        size: working resolution S (images and masks are resized to S x S; metrics are computed there).
        encoder_size: the image encoder's input side (``None``: the backbone's native one, 1024 for
            MobileSAM/SAM, 256 for LiteMedSAM); a smaller one runs the same weights at a lower cost
            (:func:`lungsam.backbones.resize_encoder`), and the decoder is tuned on those embeddings.
        folds: 1 = one 60/20/20 split; k >= 3 = k-fold cross-validation.
        epochs, patience, min_delta: maximum epochs; training stops once the best validation F1 has not
            risen by at least ``min_delta`` for ``patience`` epochs.
        lr, weight_decay: Adam settings. batch_size: images per step (one prompt each).
        box_jitter: training-time box perturbation, as a fraction of the box side.
        lora_rank, lora_alpha, lora_targets: low-rank adapters on the image encoder's linear layers named
            ``lora_targets`` (0 = off: the paper's decoder-only recipe); scale ``lora_alpha / lora_rank``.
            The encoder then runs in every step (no embedding cache for training) (:mod:`lungsam.lora`).
        augment_views: augmented copies per training image (0: none), made once and encoded into the
            embedding cache; each epoch draws the original or one copy per image (:mod:`lungsam.train.augment`).
        augment_policy: the views' transforms, ``affine`` (geometry + gamma) or ``acquisition`` (also exposure,
            contrast, equalisation, burnt-in text/tubes, blur, noise); opacity_prob: probability that a view gets
            synthetic opacities inside its lungs (:mod:`lungsam.train.opacity`). Both need ``augment_views > 0``.
        thresholds: probability thresholds swept on validation (default 0.05-0.95 in steps of 0.05; the
            choice at either edge is warned about and recorded as ``threshold_edge`` in the fold's metrics).
        device: ``auto`` | ``cpu`` | ``cuda``; amp: mixed precision on cuda.
        cpu_bf16: on the CPU, train (and validate between epochs) in bfloat16 autocast; needs a CPU with
            native bfloat16 (AVX512-BF16 or AMX), an error elsewhere. The threshold sweep and test scores
            are computed in float32 either way.
    """

    data: list[str] = field(default_factory=lambda: ["demo:montgomery"])
    backbone: str = "mobile_sam"
    checkpoint: str | None = None
    prompt: str = "points"
    points_per_lung: int = 3
    size: int = 256
    encoder_size: int | None = None
    folds: int = 5
    epochs: int = 100
    patience: int = 10
    min_delta: float = 1e-3
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 4
    box_jitter: float = 0.05
    augment_views: int = 0
    augment_policy: str = "affine"
    opacity_prob: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("qkv",)
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    cpu_bf16: bool = False
    embed_batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("prompt", self.prompt, PROMPT_MODES, type(self).__name__)
        check_augment_options(self)

    def lora_spec(self):
        """:class:`lungsam.lora.LoraSpec` of this run, or ``None`` when LoRA is off."""
        if self.lora_rank <= 0:
            return None
        from ..lora import LoraSpec

        return LoraSpec(self.lora_rank, self.lora_alpha, tuple(self.lora_targets))

    def comparable(self) -> dict:
        """The settings that must match for ``--resume`` to continue a run."""
        d = self.to_dict()
        d.pop("device", None)
        d.pop("embed_batch_size", None)
        return d
