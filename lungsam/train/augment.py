"""Offline augmentation for decoder fine-tuning with a frozen image encoder.

The encoder is frozen, so its embeddings are cached; augmenting on the fly would mean one encoder
pass per step and lose the cache. Instead each training image gets ``views`` augmented copies, made
once with MONAI transforms (deterministic per ``(seed, sample id, view)``), encoded once into the same
content-addressed embedding cache, and each epoch draws, per image, the original or one of its views.

Transforms (chest X-rays; no flips: the anatomy is not left/right symmetric), by ``policy``:
  * ``affine`` (the default, unchanged since it was added): a random affine applied jointly to image
    (bilinear) and mask (nearest): rotation up to ``rotate_deg``, scale in ``scale`` (drawn per axis),
    translation up to ``translate`` of the side; uncovered pixels are 0 (black, as a collimated border);
    then a random gamma on the image in ``gamma`` (exposure / contrast differences between machines).
  * ``acquisition``: what differs between hospitals' machines and habits, on top of ``affine`` with the
    wider scale ``fov_scale`` (crop/zoom of the field of view): a smooth exposure gradient (MONAI
    ``RandBiasField``), a random non-linear contrast curve (``RandHistogramShift``), histogram
    equalisation blended in by a random weight (``HistogramNormalize``; a global stand-in for CLAHE,
    which no installed library provides), text, tubes and ECG electrodes burnt in
    (:mod:`lungsam.train.burnin`), then blur (``RandGaussianSmooth``) and detector noise
    (``RandGaussianNoise``). The mask only moves with the affine.
  * independently of the policy, with probability ``opacity`` a view gets synthetic opacities inside its
    lung fields (:mod:`lungsam.train.opacity`), the mask unchanged.
Each stage draws from its own seed derived from the view's, so adding a stage does not change another's draw.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..data import Sample
from .burnin import BurnInSpec, burn_in
from .config import AUGMENT_POLICIES
from .opacity import OpacitySpec, add_opacities


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of the random transforms (see the module docstring). ``policy`` is one of
    :data:`AUGMENT_POLICIES`; ``opacity`` the probability in ``[0, 1]`` that a view gets synthetic opacities;
    the ``acquisition`` policy's ranges are used by it alone."""

    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06
    gamma: tuple[float, float] = (0.7, 1.5)
    policy: str = "affine"
    opacity: float = 0.0
    fov_scale: tuple[float, float] = (0.8, 1.2)
    bias_coeff: tuple[float, float] = (0.0, 0.15)
    contrast_points: tuple[int, int] = (5, 10)
    equalise_weight: tuple[float, float] = (0.0, 0.6)
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise_std: float = 0.03
    burn_in_prob: float = 0.5
    opacities: OpacitySpec = field(default_factory=OpacitySpec)
    burn: BurnInSpec = field(default_factory=BurnInSpec)

    def __post_init__(self) -> None:
        if self.policy not in AUGMENT_POLICIES:
            raise ValueError(f"augment policy {self.policy!r}: choose one of {', '.join(AUGMENT_POLICIES)}")
        if not 0.0 <= self.opacity <= 1.0:
            raise ValueError(f"opacity probability {self.opacity!r}: must be in [0, 1]")

    @classmethod
    def of(cls, cfg) -> "AugmentSpec":
        """The views' spec of a training config (``augment_policy``, ``opacity_prob``: TrainConfig or UNetConfig)."""
        return cls(policy=cfg.augment_policy, opacity=cfg.opacity_prob)

    def to_dict(self) -> dict:
        """What ``run.json`` records: the policy's own ranges only (the ``affine`` policy without opacities
        records exactly what it did before the other policies existed)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("opacities", "burn")}
        if self.policy == "affine":
            d = {k: d[k] for k in ("rotate_deg", "scale", "translate", "gamma", "policy", "opacity")}
        else:
            d["burn_in"] = self.burn.to_dict()
        if self.opacity > 0:
            d["opacities"] = self.opacities.to_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def view_seed(seed: int, sample_id: str, view: int) -> int:
    """A 32-bit seed for one view that does not depend on sample order or fold."""
    h = hashlib.sha256(f"{seed}/{sample_id}/{view}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def stage_seed(seed: int, stage: str) -> int:
    """A 32-bit seed for one stage (``"opacity"``, ``"burn-in"``, ...) of the view whose seed is ``seed``."""
    h = hashlib.sha256(f"{seed}/{stage}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _transforms(spec: AugmentSpec, size: int):
    """The geometric + exposure stage: joint affine, gamma; ``acquisition`` adds bias field and contrast."""
    from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandBiasFieldd, RandHistogramShiftd

    rot = math.radians(spec.rotate_deg)
    scale = spec.scale if spec.policy == "affine" else spec.fov_scale
    steps = [
        RandAffined(keys=("image", "mask"), prob=1.0, rotate_range=(rot,),
                    scale_range=((scale[0] - 1.0, scale[1] - 1.0),) * 2,
                    translate_range=(spec.translate * size, spec.translate * size),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandAdjustContrastd(keys=("image",), prob=1.0, gamma=spec.gamma),
    ]
    if spec.policy == "acquisition":
        steps += [RandBiasFieldd(keys=("image",), prob=0.5, degree=3, coeff_range=spec.bias_coeff),
                  RandHistogramShiftd(keys=("image",), prob=0.3, num_control_points=spec.contrast_points)]
    return Compose(steps)


def _degrade(spec: AugmentSpec):
    """The ``acquisition`` policy's last stage: blur and detector noise."""
    from monai.transforms import Compose, RandGaussianNoised, RandGaussianSmoothd

    return Compose([RandGaussianSmoothd(keys=("image",), prob=0.3, sigma_x=spec.blur_sigma, sigma_y=spec.blur_sigma),
                    RandGaussianNoised(keys=("image",), prob=0.5, mean=0.0, std=spec.noise_std)])


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _grey(img8: np.ndarray) -> np.ndarray:
    """``(S, S, 3)`` uint8 -> ``(1, S, S)`` float32 in [0, 1] (the three channels are equal)."""
    return img8[..., :1].astype(np.float32).transpose(2, 0, 1) / 255.0


def _rgb8(grey: np.ndarray) -> np.ndarray:
    """``(1, S, S)`` float in [0, 1] -> ``(S, S, 3)`` uint8."""
    img8 = np.clip(np.rint(grey[0] * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(img8[..., None], 3, axis=2)


def _equalise(grey: np.ndarray, seed: int, spec: AugmentSpec) -> np.ndarray:
    """Blend the histogram-equalised image in by a weight drawn from ``spec.equalise_weight``."""
    from monai.transforms import HistogramNormalize

    w = float(np.random.default_rng(seed).uniform(*spec.equalise_weight))
    eq = _to_numpy(HistogramNormalize(min=0.0, max=1.0)(grey)).astype(np.float32)
    return (1.0 - w) * grey + w * eq


def _acquisition_tail(img8: np.ndarray, seed: int, spec: AugmentSpec) -> np.ndarray:
    """Equalisation, burn-in (with probability ``spec.burn_in_prob``), blur and noise on an ``(S, S, 3)``
    uint8 image; returns the same shape and dtype."""
    grey = np.clip(_equalise(_grey(img8), stage_seed(seed, "equalise"), spec), 0.0, 1.0)
    img8 = _rgb8(grey)
    if np.random.default_rng(stage_seed(seed, "burn-in?")).random() < spec.burn_in_prob:
        img8 = burn_in(img8, stage_seed(seed, "burn-in"), spec.burn)
    t = _degrade(spec)
    t.set_random_state(seed=stage_seed(seed, "degrade"))
    return _rgb8(np.clip(_to_numpy(t({"image": _grey(img8)})["image"]), 0.0, 1.0))


def augment_pair(image: np.ndarray, mask: np.ndarray, seed: int, spec: AugmentSpec = AugmentSpec()
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One augmented copy of a working-frame pair.

    Args:
        image: ``(S, S, 3)`` uint8; mask: ``(S, S)`` bool; seed: 32-bit seed of this view.
    Returns:
        ``(S, S, 3)`` uint8 image and ``(S, S)`` bool mask, in the same frame.
    """
    if image.ndim != 3 or image.shape[:2] != mask.shape or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (S, S, 3) image and (S, S) mask, got {image.shape} and {mask.shape}")
    t = _transforms(spec, image.shape[0])
    t.set_random_state(seed=seed)
    out = t({"image": _grey(image), "mask": mask[None].astype(np.float32)})
    img8, msk = _rgb8(_to_numpy(out["image"])), _to_numpy(out["mask"])[0] > 0.5
    if spec.opacity > 0 and np.random.default_rng(stage_seed(seed, "opacity?")).random() < spec.opacity:
        img8 = add_opacities(img8, msk, stage_seed(seed, "opacity"), spec.opacities)
    if spec.policy == "acquisition":
        img8 = _acquisition_tail(img8, seed, spec)
    return img8, msk


def draw_views(rng: np.random.Generator, n_images: int, views: int) -> np.ndarray:
    """One epoch's draw over ``views`` augmented copies: ``(n_images,)`` int, per image ``0`` for the original
    or ``v`` in ``1..views`` for its view ``v - 1``, uniform over the ``views + 1`` choices. The one rule of the
    SAM and the U-Net trainings (the same draw from the same generator state gives the same epoch)."""
    return rng.integers(0, views + 1, size=n_images)


def augmented_views(samples: list[Sample], views: int, seed: int, spec: AugmentSpec = AugmentSpec()
                    ) -> list[list[Sample]]:
    """``views`` augmented copies of each sample: ``out[v][i]`` is view ``v`` of ``samples[i]``
    (id ``<id>#aug<v>``; same paths and original size as the source)."""
    out: list[list[Sample]] = [[] for _ in range(views)]
    for s in samples:
        for v in range(views):
            img, msk = augment_pair(s.image, s.mask, view_seed(seed, s.id, v), spec)
            out[v].append(replace(s, id=f"{s.id}#aug{v}", image=img, mask=msk))
    return out
