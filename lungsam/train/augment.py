"""Offline augmentation for decoder fine-tuning with a frozen image encoder.

The encoder is frozen, so its embeddings are cached; augmenting on the fly would mean one encoder
pass per step and lose the cache. Instead each training image gets ``views`` augmented copies, made
once with MONAI transforms (deterministic per ``(seed, sample id, view)``), encoded once into the same
content-addressed embedding cache, and each epoch draws, per image, the original or one of its views.

Transforms (chest X-rays; no flips: the anatomy is not left/right symmetric):
  * random affine, applied jointly to image (bilinear) and mask (nearest): rotation up to
    ``rotate_deg``, scale in ``scale`` (drawn per axis), translation up to ``translate`` of the side;
    uncovered pixels are 0 (black, as a collimated border);
  * random gamma on the image in ``gamma`` (exposure / contrast differences between machines).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..data import Sample


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of the random transforms (see the module docstring)."""

    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06
    gamma: tuple[float, float] = (0.7, 1.5)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def view_seed(seed: int, sample_id: str, view: int) -> int:
    """A 32-bit seed for one view that does not depend on sample order or fold."""
    h = hashlib.sha256(f"{seed}/{sample_id}/{view}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _transforms(spec: AugmentSpec, size: int):
    from monai.transforms import Compose, RandAdjustContrastd, RandAffined

    rot = math.radians(spec.rotate_deg)
    return Compose([
        RandAffined(keys=("image", "mask"), prob=1.0, rotate_range=(rot,),
                    scale_range=((spec.scale[0] - 1.0, spec.scale[1] - 1.0),) * 2,
                    translate_range=(spec.translate * size, spec.translate * size),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandAdjustContrastd(keys=("image",), prob=1.0, gamma=spec.gamma),
    ])


def augment_pair(image: np.ndarray, mask: np.ndarray, seed: int, spec: AugmentSpec = AugmentSpec()
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One augmented copy of a working-frame pair.

    Args:
        image: ``(S, S, 3)`` uint8; mask: ``(S, S)`` bool; seed: 32-bit seed of this view.
    Returns:
        ``(S, S, 3)`` uint8 image and ``(S, S)`` bool mask, in the same frame.
    """
    import torch

    if image.ndim != 3 or image.shape[:2] != mask.shape or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (S, S, 3) image and (S, S) mask, got {image.shape} and {mask.shape}")
    t = _transforms(spec, image.shape[0])
    t.set_random_state(seed=seed)
    grey = image[..., :1].astype(np.float32).transpose(2, 0, 1) / 255.0  # (1, S, S), the three channels are equal
    out = t({"image": grey, "mask": mask[None].astype(np.float32)})
    img = out["image"].numpy() if isinstance(out["image"], torch.Tensor) else np.asarray(out["image"])
    msk = out["mask"].numpy() if isinstance(out["mask"], torch.Tensor) else np.asarray(out["mask"])
    img8 = np.clip(np.rint(img[0] * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(img8[..., None], 3, axis=2), msk[0] > 0.5


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
