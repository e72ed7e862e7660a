"""Mask clean-up: keep the lungs, fill their holes. Torch-free (scipy.ndimage), shared by evaluation and the runtime.

A thresholded lung mask ``(H, W)`` bool may carry specks outside the body, more than two blobs, or holes
where a lung is opacified. :func:`clean_mask` keeps at most :attr:`CleanupSpec.max_components` connected
components (4-connectivity), the largest ones, each at least :attr:`CleanupSpec.min_component_fraction` of the
field (``H * W``) and, after the largest, at least :attr:`CleanupSpec.min_relative_size` of the largest; then it
fills the holes of each kept component. Size rules are fractions, so the same spec works in the working frame
(S x S) and in the original frame. The largest component is always kept (a mask never becomes empty by
clean-up alone; an empty mask stays empty).

Whether clean-up is on is chosen on a run's validation images beside the threshold
(:mod:`lungsam.train.run`), recorded in each fold's ``metrics.json`` (``"postprocess"``) and in the bundle
manifest's optional section ``"postprocess"`` (:meth:`CleanupSpec.to_dict`), which the runtime applies.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import LungsamError

FORMAT = "lungsam-postprocess/1"


class PostprocessError(LungsamError, ValueError):
    """A ``postprocess`` section that is not a valid :class:`CleanupSpec`."""


@dataclass(frozen=True)
class CleanupSpec:
    """How masks are cleaned.

    Attributes:
        enabled: apply :func:`clean_mask` (``False``: the thresholded mask as it is).
        max_components: lungs kept at most (2: left and right).
        min_component_fraction: a component smaller than this fraction of the field is dropped (except the largest).
        min_relative_size: a component after the largest is kept only if at least this fraction of the largest.
        fill_holes: fill holes inside the kept components.
    """

    enabled: bool = False
    max_components: int = 2
    min_component_fraction: float = 0.005
    min_relative_size: float = 0.05
    fill_holes: bool = True

    def __post_init__(self):
        if not isinstance(self.enabled, bool) or not isinstance(self.fill_holes, bool):
            raise PostprocessError("postprocess: 'enabled' and 'fill_holes' must be true or false")
        if not isinstance(self.max_components, int) or isinstance(self.max_components, bool) or self.max_components < 1:
            raise PostprocessError("postprocess: 'max_components' must be an integer >= 1, "
                                   f"got {self.max_components!r}")
        for name in ("min_component_fraction", "min_relative_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
                raise PostprocessError(f"postprocess: {name!r} must be a number in [0, 1), got {v!r}")

    def to_dict(self) -> dict:
        """The manifest / metrics section: ``{"format": "lungsam-postprocess/1", "enabled", "max_components",
        "min_component_fraction", "min_relative_size", "fill_holes"}``."""
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "CleanupSpec":
        """Inverse of :meth:`to_dict`; ``None`` (a run or bundle made before clean-up existed) means off.

        Raises:
            PostprocessError: not an object, another format, an unknown key or a bad value.
        """
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise PostprocessError(f"postprocess must be a JSON object, got {type(d).__name__}")
        if d.get("format", FORMAT) != FORMAT:
            raise PostprocessError(f"postprocess: format {d.get('format')!r} is not {FORMAT!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"format"})
        if unknown:
            raise PostprocessError(f"postprocess: unknown key(s) {', '.join(unknown)}")
        return cls(**{k: d[k] for k in known if k in d})


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (4-connectivity) of a boolean mask ``(H, W)``: ``(labels (H, W) int32,
    sizes (n,) int64)`` where component ``i`` (1-based in ``labels``) has ``sizes[i - 1]`` pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(mask, bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64)
    return labels.astype(np.int32), sizes


def kept_components(sizes: np.ndarray, field_px: int, spec: CleanupSpec) -> list[int]:
    """1-based labels of the components :func:`clean_mask` keeps, largest first (see the module docstring)."""
    if sizes.size == 0:
        return []
    order = np.argsort(-sizes, kind="stable")
    largest = int(sizes[order[0]])
    keep = [int(order[0]) + 1]
    for i in order[1:spec.max_components]:
        s = int(sizes[i])
        if s >= spec.min_component_fraction * field_px and s >= spec.min_relative_size * largest:
            keep.append(int(i) + 1)
    return keep


def clean_mask(mask: np.ndarray, spec: CleanupSpec) -> np.ndarray:
    """``(H, W)`` bool -> ``(H, W)`` bool: the lungs kept by ``spec`` with their holes filled (a copy of
    ``mask`` when ``spec.enabled`` is false)."""
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"clean_mask takes one (H, W) mask, got shape {m.shape}")
    if not spec.enabled or not m.any():
        return m.copy()
    labels, sizes = components(m)
    keep = kept_components(sizes, m.size, spec)
    if not spec.fill_holes:
        return np.isin(labels, keep)
    from scipy import ndimage

    out = np.zeros_like(m)
    for k in keep:  # each lung on its own: the gap between two lungs is never a hole
        out |= ndimage.binary_fill_holes(labels == k)
    return out


def clean_masks(masks, spec: CleanupSpec) -> list[np.ndarray]:
    """:func:`clean_mask` of each ``(H, W)`` mask of a sequence or ``(N, H, W)`` array."""
    return [clean_mask(m, spec) for m in masks]
