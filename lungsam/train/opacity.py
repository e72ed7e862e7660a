"""Synthetic opacities inside the lung fields, the mask unchanged (torch-free; numpy + scipy.ndimage).

A model trained only on clear lungs stops its masks where the lung is opacified (consolidation, effusion,
dense tuberculosis): it learns "dark is lung". Painting smooth, whiter regions into the lung fields of
training images while keeping their masks teaches it that opaque lung is still lung.

Each opacity is an alpha map in ``[0, 1]``, zero outside the mask, blended towards a soft-tissue level:
  * **patchy** blobs: white Gaussian noise smoothed with ``scipy.ndimage.gaussian_filter`` (sigma a
    fraction ``smoothness`` of the side), thresholded at the quantile inside the lungs that leaves a
    fraction ``coverage`` of the lung field covered, with soft edges (consolidation, TB infiltrates);
  * **basal** (with probability ``basal_prob``): per lung (connected component of the mask) a ramp
    rising towards its lowest row over a fraction ``basal_height`` of its height (effusion, the bases
    behind the diaphragm).

The image is raised, never lowered: ``out = img + strength * alpha * max(level - img, 0)``, where ``level``
is the image's ``level_percentile`` (its bright soft tissue and bone). Everything is drawn from
``numpy.random.default_rng(seed)``: the same seed gives the same opacity.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class OpacitySpec:
    """Ranges of the synthetic opacities (see the module docstring); each ``(lo, hi)`` is drawn uniformly."""

    strength: tuple[float, float] = (0.3, 0.75)
    coverage: tuple[float, float] = (0.1, 0.5)
    smoothness: tuple[float, float] = (0.03, 0.08)
    edge: float = 0.5
    basal_prob: float = 0.5
    basal_height: tuple[float, float] = (0.15, 0.4)
    level_percentile: float = 97.0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def patchy_alpha(mask: np.ndarray, rng: np.random.Generator, spec: OpacitySpec) -> np.ndarray:
    """Smooth random blobs covering about ``spec.coverage`` of the lung field.

    Args:
        mask: ``(S, S)`` bool lung mask (at least one pixel).
    Returns:
        ``(S, S)`` float32 alpha in ``[0, 1]``, 0 outside ``mask``.
    """
    from scipy.ndimage import gaussian_filter

    side = mask.shape[0]
    field = gaussian_filter(rng.standard_normal(mask.shape), sigma=_uniform(rng, spec.smoothness) * side)
    inside = field[mask]
    std = float(inside.std()) or 1.0
    cut = float(np.quantile(inside, 1.0 - _uniform(rng, spec.coverage)))
    alpha = np.clip((field - cut) / (spec.edge * std), 0.0, 1.0)
    return (alpha * mask).astype(np.float32)


def basal_alpha(mask: np.ndarray, rng: np.random.Generator, spec: OpacitySpec) -> np.ndarray:
    """Per lung, a ramp from 0 to 1 over its lowest ``spec.basal_height`` fraction of rows.

    Args:
        mask: ``(S, S)`` bool lung mask. Returns: ``(S, S)`` float32 alpha in ``[0, 1]``, 0 outside ``mask``.
    """
    from scipy.ndimage import find_objects, label

    labels, _ = label(mask)
    rows = np.arange(mask.shape[0], dtype=np.float32)[:, None]
    alpha = np.zeros(mask.shape, np.float32)
    for k, box in enumerate(find_objects(labels), start=1):
        top, bottom = box[0].start, box[0].stop - 1
        ramp = max(1.0, _uniform(rng, spec.basal_height) * (bottom - top + 1))
        lung = np.clip((rows - (bottom - ramp)) / ramp, 0.0, 1.0) * (labels == k)
        alpha = np.maximum(alpha, lung.astype(np.float32))
    return alpha


def opacity_alpha(mask: np.ndarray, rng: np.random.Generator, spec: OpacitySpec) -> np.ndarray:
    """The union (pixel maximum) of a patchy opacity and, with probability ``spec.basal_prob``, a basal one.

    Returns: ``(S, S)`` float32 alpha in ``[0, 1]``, 0 outside ``mask`` (all 0 for an empty mask)."""
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    alpha = patchy_alpha(mask, rng, spec)
    if rng.random() < spec.basal_prob:
        alpha = np.maximum(alpha, basal_alpha(mask, rng, spec))
    return alpha


def add_opacities(image: np.ndarray, mask: np.ndarray, seed: int, spec: OpacitySpec = OpacitySpec()) -> np.ndarray:
    """The image with synthetic opacities painted inside the lung fields; the mask is not changed.

    Args:
        image: ``(S, S, 3)`` uint8 working-frame image (three equal channels); mask: ``(S, S)`` bool lungs;
        seed: the opacity's seed (the same seed gives the same output).
    Returns:
        ``(S, S, 3)`` uint8; equal to ``image`` outside ``mask`` and never darker inside it.
    """
    if image.ndim != 3 or image.shape[:2] != mask.shape:
        raise ValueError(f"expected an (S, S, 3) image and (S, S) mask, got {image.shape} and {mask.shape}")
    rng = np.random.default_rng(seed)
    mask = mask.astype(bool)
    alpha = opacity_alpha(mask, rng, spec)
    grey = image[..., 0].astype(np.float32)
    level = float(np.percentile(grey, spec.level_percentile))
    raised = grey + _uniform(rng, spec.strength) * alpha * np.maximum(level - grey, 0.0)
    out = np.where(mask, np.clip(np.rint(raised), 0, 255), grey).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=2)
