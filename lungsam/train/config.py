"""Training configurations (:class:`TrainConfig`, :class:`UNetConfig`), saved with every run (``run.json``) and
checkpoint. Torch-free: ``lungsam train --help`` builds its options from these fields (:func:`lungsam.options.option`
metadata: help, flag, range, choices), so a setting's default and its help live here, once."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..options import option
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


def format_thresholds(values: tuple[float, ...]) -> str:
    """The ``--thresholds`` text of a sweep: ``LO:HI:STEP`` when evenly spaced (3 or more), else a comma list;
    :func:`parse_thresholds` reads it back to ``values``."""
    vals = sorted(values)
    if len(vals) >= 3:
        step = round(vals[1] - vals[0], 6)
        if step > 0 and all(abs(b - a - step) < 1e-9 for a, b in zip(vals, vals[1:])):
            return f"{vals[0]:g}:{vals[-1]:g}:{step:g}"
    return ",".join(f"{v:g}" for v in vals)


def parse_names(text: str) -> tuple[str, ...]:
    """``"qkv, proj"`` -> ``("qkv", "proj")`` (blank items dropped)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parse_ints(text: str) -> tuple[int, ...]:
    """``"16,32,64"`` -> ``(16, 32, 64)``; ``ValueError`` naming the text when an item is not an integer."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def join(values: tuple) -> str:
    """A tuple field's default as typed on the command line: ``a,b,c``."""
    return ",".join(str(v) for v in values)


#: How a run's masks are cleaned (:mod:`lungsam.postprocess`: keep the two lungs, fill holes).
CLEANUP_CHOICES = ("validation", "off")

# Help sentences the SAM and U-Net options share.
DATA_HELP = "Data set folder with images/ and masks/ (repeat to pool sets); demo:montgomery is the packaged sample."
FOLDS_HELP = "1 = one 60/20/20 split; k>=3 = k-fold cross-validation."
SIZE_HELP = "Working resolution (images and masks resized to SxS)."
SEED_HELP = "Seed of the splits and of training."
EPOCHS_HELP = "Maximum training epochs per fold."
PATIENCE_HELP = "Early stopping: epochs allowed without a val F1 gain of --min-delta."
MIN_DELTA_HELP = "Smallest val F1 gain that counts for early stopping."
LR_HELP = "Adam learning rate."
WD_HELP = "Adam weight decay."
THRESHOLDS_HELP = ("Probability thresholds swept on validation: LO:HI:STEP or a comma list (a choice at an edge is "
                   "warned about).")
BF16_HELP = ("CPU only: train in bfloat16 autocast (needs AVX512-BF16 or AMX; an error elsewhere). About {x} faster "
             "{what} on such CPUs; thresholds and test scores stay float32.")


AUGMENT_POLICIES = ("affine", "acquisition")  # the --augment-policy choices (lungsam.train.augment)
AUGMENT_HELP = "Augmented copies per training image (affine + gamma by default, made once; 0 = none)."
AUGMENT_POLICY_HELP = ("Transforms of the --augment views: affine (geometry + gamma) or acquisition (also exposure, "
                       "contrast, equalisation, burnt-in text/tubes, blur, noise; docs/generalisation.md).")
OPACITY_HELP = "Probability that an --augment view gets synthetic opacities inside its lungs (mask unchanged)."


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
        if hasattr(self, "cleanup"):
            check_choice("cleanup", self.cleanup, CLEANUP_CHOICES, owner)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        return cls(**{f.name: tuple(d[f.name]) if isinstance(f.default, tuple) else d[f.name]
                      for f in fields(cls) if f.name in d})


def parse_channels(text: str) -> tuple[int, ...]:
    """``--channels`` text -> U-Net feature maps per level, each within ``RANGES["channels"]``."""
    values = parse_ints(text)
    for v in values:
        if why := RANGES["channels"].problem(v):
            raise ValueError(f"every item {why}")
    return values


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
        cleanup: ``validation``: the mask clean-up (:mod:`lungsam.postprocess`) is on when it raises the best
            validation F1 (recorded in each fold's metrics); ``off``: never (the paper's thresholded masks).
        device: ``auto`` | ``cpu`` | ``cuda``; amp: mixed precision on cuda.
        cpu_bf16: on the CPU, train (and validate between epochs) in bfloat16 autocast; needs a CPU with
            native bfloat16 (AVX512-BF16 or AMX), an error elsewhere. The threshold sweep and test scores
            are computed in float32 either way.
        recipe, recipe_values: the ``--recipe`` the run was built from (``None``: none) and the values it
            set, the fields the user did not give (:mod:`lungsam.train.recipes`); a record, not a setting.
    """

    data: list[str] = field(default_factory=lambda: ["demo:montgomery"],
                            metadata=option(DATA_HELP, multiple=True))
    backbone: str = field(default="mobile_sam", metadata=option("mobile_sam, lite_medsam, vit_b, vit_l, vit_h, tiny."))
    checkpoint: str | None = field(default=None, metadata=option(
        "Backbone weights (default: official weights, downloaded once).", path="file"))
    prompt: str = field(default="points", metadata=option(
        "Prompt the decoder is tuned with: learned points, a ground-truth box, both, or automatic boxes.",
        choices=PROMPT_MODES))
    points_per_lung: int = field(default=3, metadata=option(
        "Learned point prompts per lung (points, both, auto-both).", range="points_per_lung"))
    size: int = field(default=256, metadata=option(SIZE_HELP, range="size"))
    encoder_size: int | None = field(default=None, metadata=option(
        "Image encoder input side (default: the backbone's native size, 1024 MobileSAM/SAM, 256 LiteMedSAM); "
        "smaller is cheaper at inference: the same weights, the decoder tuned at that size.", range="encoder_size"))
    folds: int = field(default=5, metadata=option(FOLDS_HELP, range="folds"))
    epochs: int = field(default=100, metadata=option(EPOCHS_HELP, range="epochs"))
    patience: int = field(default=10, metadata=option(PATIENCE_HELP, range="patience"))
    min_delta: float = field(default=1e-3, metadata=option(MIN_DELTA_HELP, range="min_delta"))
    lr: float = field(default=1e-5, metadata=option(LR_HELP, range="lr"))
    weight_decay: float = field(default=0.0, metadata=option(WD_HELP, range="weight_decay"))
    batch_size: int = field(default=4, metadata=option("Images per step (one prompt each).", range="batch_size"))
    box_jitter: float = 0.05
    augment_views: int = field(default=0, metadata=option(AUGMENT_HELP, flag="--augment", range="augment_views"))
    augment_policy: str = field(default="affine", metadata=option(AUGMENT_POLICY_HELP, choices=AUGMENT_POLICIES))
    opacity_prob: float = field(default=0.0, metadata=option(OPACITY_HELP, range="opacity_prob"))
    lora_rank: int = field(default=0, metadata=option(
        "Also train LoRA adapters of this rank on the image encoder (0 = off, the paper's decoder-only recipe; "
        "needs pip install 'lungsam[lora]'; the encoder then runs every step).", range="lora_rank"))
    lora_alpha: float = field(default=8.0, metadata=option(
        "LoRA scale numerator (scale = alpha / rank).", range="lora_alpha"))
    lora_targets: tuple[str, ...] = field(default=("qkv",), metadata=option(
        "Comma-separated names of the encoder's linear layers to adapt (qkv, proj, fc1, fc2, ...).",
        parse=parse_names, text=join))
    thresholds: tuple[float, ...] = field(default=DEFAULT_THRESHOLDS, metadata=option(
        THRESHOLDS_HELP, parse=parse_thresholds, text=format_thresholds))
    cleanup: str = field(default="validation", metadata=option(
        "Mask clean-up (keep the two lungs, fill holes): validation = on when it raises the best validation F1 "
        "(the choice is recorded per fold); off = never, the plain thresholded masks (the paper's).",
        choices=CLEANUP_CHOICES))
    seed: int = field(default=0, metadata=option(SEED_HELP, range="seed"))
    device: str = field(default="auto", metadata=option(
        "auto: cuda when torch sees a GPU, else cpu (cuda: mixed precision).", choices=TRAIN_DEVICES))
    amp: bool = True
    cpu_bf16: bool = field(default=False, metadata=option(BF16_HELP.format(x="1.5x", what="training")))
    embed_batch_size: int = 4
    recipe: str | None = None
    recipe_values: dict = field(default_factory=dict)

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
        """The settings that must match for ``--resume`` to continue a run (how they were given, by a recipe
        or by hand, does not matter)."""
        d = self.to_dict()
        for k in ("device", "embed_batch_size", "recipe", "recipe_values"):
            d.pop(k, None)
        return d


@dataclass
class UNetConfig(DictConfig):
    """U-Net baseline settings (saved in ``run.json`` and with every checkpoint).

    Attributes:
        data, size, folds, seed: as :class:`TrainConfig` (they fix the test images).
        channels: feature maps per level of MONAI's UNet (each level after the first halves the resolution).
        res_units: residual units per level.
        epochs, patience, min_delta, lr, weight_decay, batch_size, thresholds, device, cpu_bf16: as for SAM runs
            (there is no CUDA mixed precision for the U-Net: it trains in float32 unless ``cpu_bf16``).
        augment_views, augment_policy, opacity_prob: as for SAM runs: the same views of the same images for the
            same seed (:func:`lungsam.train.augment.augmented_views`), kept in memory; each epoch draws per image
            the original or one view.
    """

    data: list[str] = field(default_factory=lambda: ["demo:montgomery"], metadata=option(
        "Data set folder(s), as for lungsam train (the same --data/--folds/--seed/--size give the same test images).",
        multiple=True))
    size: int = field(default=256, metadata=option(SIZE_HELP, range="size"))
    folds: int = field(default=5, metadata=option(FOLDS_HELP, range="folds"))
    seed: int = field(default=0, metadata=option(SEED_HELP, range="seed"))
    channels: tuple[int, ...] = field(default=(16, 32, 64, 128, 256), metadata=option(
        "Feature maps per U-Net level (comma-separated, at least two levels).", parse=parse_channels, text=join))
    res_units: int = field(default=2, metadata=option("Residual units per level.", range="res_units"))
    epochs: int = field(default=100, metadata=option(EPOCHS_HELP, range="epochs"))
    patience: int = field(default=10, metadata=option(PATIENCE_HELP, range="patience"))
    min_delta: float = field(default=1e-3, metadata=option(MIN_DELTA_HELP, range="min_delta"))
    lr: float = field(default=1e-3, metadata=option(LR_HELP, range="lr"))
    weight_decay: float = field(default=0.0, metadata=option(WD_HELP, range="weight_decay"))
    batch_size: int = field(default=8, metadata=option("Images per step.", range="batch_size"))
    augment_views: int = field(default=0, metadata=option(AUGMENT_HELP, flag="--augment", range="augment_views"))
    augment_policy: str = field(default="affine", metadata=option(AUGMENT_POLICY_HELP, choices=AUGMENT_POLICIES))
    opacity_prob: float = field(default=0.0, metadata=option(OPACITY_HELP, range="opacity_prob"))
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    device: str = field(default="auto", metadata=option(
        "auto: cuda when torch sees a GPU, else cpu.", choices=TRAIN_DEVICES))
    cpu_bf16: bool = field(default=False, metadata=option(BF16_HELP.format(x="1.3x", what="U-Net epochs")))
    model: str = "unet"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_augment_options(self)

    def comparable(self) -> dict:
        d = self.to_dict()
        d.pop("device")
        return d
