"""Prompts for lung segmentation, in the **working** frame, stored as fractions of width/height.

Modes:

* ``points``: k positive points per lung, derived once from the mean of the training masks
  (no ground truth needed at inference).
* ``box``: the bounding box of the ground-truth mask (randomly perturbed during training, as in the
  paper). Needs ground truth: reports label it as such.
* ``both``: the learned points plus the ground-truth box.
* ``auto-box``: the bounding box of the mean training mask; needs no ground truth.
* ``auto-both``: the learned points plus the ``auto-box`` box, learned jointly by the decoder; needs no
  ground truth (the deployable counterpart of ``both``).

Point rule (documented in the README): threshold the mean training mask at 0.5 and keep the two
largest connected components (the two lungs; if they touch, the mask is split at the column
between their centres of mass). For each lung, the rows are cut into k bands holding equal numbers
of lung pixels, and in each band the pixel farthest from the lung border (Euclidean distance
transform) is the point. Points are thus deep inside the lung and spread from apex to base.

Fraction convention: a pixel index ``x`` in a frame of width ``W`` is stored as ``x / W``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from .errors import ArgumentError
from .preprocess import PreprocessSpec, boxes_to_model, coords_to_model, fractions_to_pixels

PromptMode = Literal["points", "box", "both", "auto-box", "auto-both"]
PROMPT_MODES: tuple[str, ...] = ("points", "box", "both", "auto-box", "auto-both")
POINT_PROMPT_MODES = ("points", "both", "auto-both")
AUTO_BOX_PROMPT_MODES = ("auto-box", "auto-both")
BOX_PROMPT_MODES = ("box", "both", "auto-box", "auto-both")
GT_PROMPT_MODES = ("box", "both")
#: Modes whose learned points the quality flag jitters (:func:`jitter_prompts`; a box prompt stays uncalibrated).
JITTER_PROMPT_MODES = ("points",)


@dataclass(frozen=True)
class LearnedPrompt:
    """The prompt learned from the training split.

    Attributes:
        mode: one of :data:`PROMPT_MODES`.
        points: ``(N, 2)`` float32 ``(x, y)`` fractions (``None`` for box-only modes).
        labels: ``(N,)`` int32 (1 = lung).
        box: ``(4,)`` float32 ``x0, y0, x1, y1`` fractions of the mean-mask box (used by ``auto-box``).
        points_per_lung: k.
    """

    mode: str
    points: np.ndarray | None
    labels: np.ndarray | None
    box: np.ndarray | None
    points_per_lung: int

    @property
    def uses_points(self) -> bool:
        return self.mode in POINT_PROMPT_MODES

    @property
    def needs_ground_truth(self) -> bool:
        return self.mode in GT_PROMPT_MODES

    def to_dict(self) -> dict:
        return {"mode": self.mode, "points_per_lung": self.points_per_lung,
                "points": None if self.points is None else self.points.tolist(),
                "labels": None if self.labels is None else self.labels.tolist(),
                "box": None if self.box is None else self.box.tolist(),
                "frame": "working-frame fractions (x / width, y / height)"}

    @classmethod
    def from_dict(cls, d: dict) -> "LearnedPrompt":
        arr = lambda v, t: None if v is None else np.asarray(v, t)  # noqa: E731
        return cls(mode=d["mode"], points=arr(d["points"], np.float32), labels=arr(d["labels"], np.int32),
                   box=arr(d["box"], np.float32), points_per_lung=int(d["points_per_lung"]))


def mean_mask(masks: list[np.ndarray]) -> np.ndarray:
    """``(S, S)`` float32 fraction of training masks covering each pixel."""
    return np.mean(np.stack([m.astype(np.float32) for m in masks]), axis=0)


def _lung_components(binary: np.ndarray) -> list[np.ndarray]:
    from scipy import ndimage

    labels, n = ndimage.label(binary)
    if n == 0:
        raise ValueError("mean training mask is empty at threshold 0.5")
    sizes = ndimage.sum(binary, labels, index=range(1, n + 1))
    order = np.argsort(sizes)[::-1]
    comps = [labels == (i + 1) for i in order[:2]]
    if len(comps) == 1:  # lungs touch: split at the column of the centre of mass
        cx = int(round(ndimage.center_of_mass(comps[0])[1]))
        left, right = comps[0].copy(), comps[0].copy()
        left[:, cx:] = False
        right[:, :cx] = False
        comps = [c for c in (left, right) if c.any()]
    return sorted(comps, key=lambda c: ndimage.center_of_mass(c)[1])


def interior_points(component: np.ndarray, k: int) -> np.ndarray:
    """``(k, 2)`` int ``(x, y)`` points deep inside ``component``, one per equal-pixel row band."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(component)
    rows = np.nonzero(component.any(axis=1))[0]
    counts = component.sum(axis=1)[rows]
    cum = np.cumsum(counts) / counts.sum()
    pts = []
    for b in range(k):
        lo, hi = b / k, (b + 1) / k
        band_rows = rows[(cum > lo) & (cum - counts / counts.sum() < hi)] if k > 1 else rows
        band = np.zeros_like(component)
        band[band_rows] = component[band_rows]
        d = np.where(band, dist, -1.0)
        y, x = np.unravel_index(int(np.argmax(d)), d.shape)
        pts.append((x, y))
    return np.asarray(pts, np.int64)


def learn_prompt(train_masks: list[np.ndarray], mode: str, points_per_lung: int = 3) -> LearnedPrompt:
    """Derive the prompt from the training split's masks (all ``(S, S)`` bool)."""
    if mode not in PROMPT_MODES:
        raise ArgumentError(f"unknown prompt {mode!r}; choose from {', '.join(PROMPT_MODES)}")
    mm = mean_mask(train_masks)
    h, w = mm.shape
    binary = mm >= 0.5
    ys, xs = np.nonzero(binary)
    box = np.asarray([xs.min() / w, ys.min() / h, xs.max() / w, ys.max() / h], np.float32)
    points = labels = None
    if mode in POINT_PROMPT_MODES:
        pix = np.concatenate([interior_points(c, points_per_lung) for c in _lung_components(binary)])
        points = (pix / np.asarray([w, h])).astype(np.float32)
        labels = np.ones(len(points), np.int32)
    return LearnedPrompt(mode=mode, points=points, labels=labels, box=box, points_per_lung=points_per_lung)


def first_pass_prompt(prompt: LearnedPrompt) -> LearnedPrompt:
    """The prompt of pass 1 when a box-prompted model predicts its own box: the learned points (if
    any) with the mean-mask box (``auto-both`` / ``auto-box``). Raises ``ValueError`` for a model
    trained without a box."""
    if prompt.mode not in BOX_PROMPT_MODES or prompt.box is None:
        raise ArgumentError("a box from a first pass needs a model prompted with a box (prompt "
                         f"{', '.join(BOX_PROMPT_MODES)}); this one was trained with {prompt.mode!r}")
    return replace(prompt, mode="auto-both" if prompt.uses_points else "auto-box")


def mask_box(mask: np.ndarray) -> np.ndarray:
    """``(4,)`` float32 ``x0, y0, x1, y1`` pixel box of a non-empty ``(H, W)`` mask."""
    ys, xs = np.nonzero(mask)
    return np.asarray([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def first_pass_box(mask: np.ndarray, fallback: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Pass 2's box when a box-prompted model predicts its own box.

    Args:
        mask: ``(S, S)`` bool, pass 1's mask in the working frame.
        fallback: ``(4,)`` float32 model-frame box used when ``mask`` is empty (the mean-mask box).
    Returns:
        ``(4,)`` float32 ``x0, y0, x1, y1`` in the model frame: the bounding box of ``mask``.
    """
    if not mask.any():
        return fallback
    return boxes_to_model(mask_box(mask), mask.shape, spec)


def perturb_box(box: np.ndarray, hw: tuple[int, int], rng: np.random.Generator, max_frac: float = 0.05) -> np.ndarray:
    """Shift each side of a pixel box by up to ``max_frac`` of the box's width/height (uniform),
    clipped to the image."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    jitter = rng.uniform(-max_frac, max_frac, 4) * np.asarray([bw, bh, bw, bh])
    b = box + jitter
    b[[0, 2]] = np.clip(b[[0, 2]], 0, hw[1] - 1)
    b[[1, 3]] = np.clip(b[[1, 3]], 0, hw[0] - 1)
    return np.asarray([min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])], np.float32)


def model_prompt(prompt: LearnedPrompt, spec: PreprocessSpec, image_hw: tuple[int, int],
                 gt_box: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The prompt for one image in SAM's **model** frame.

    Args:
        prompt: the learned prompt.
        spec: backbone preprocessing.
        image_hw: size of the frame the fractions refer to (the working frame).
        gt_box: ``(4,)`` pixel box in that frame, required for ``box`` / ``both``.
    Returns:
        ``(coords (N, 2) float32 | None, labels (N,) float32 | None, box (4,) float32 | None)``.
    """
    coords = labels = box = None
    if prompt.uses_points:
        coords = coords_to_model(fractions_to_pixels(prompt.points, image_hw), image_hw, spec)
        labels = prompt.labels.astype(np.float32)
    if prompt.needs_ground_truth:
        if gt_box is None:
            raise ValueError(f"prompt {prompt.mode!r} needs a ground-truth box")
        box = boxes_to_model(gt_box, image_hw, spec)
    elif prompt.mode in AUTO_BOX_PROMPT_MODES:
        box = boxes_to_model(fractions_to_pixels(prompt.box.reshape(2, 2), image_hw).reshape(4), image_hw, spec)
    return coords, labels, box


def labelled_points(coords: np.ndarray | None, labels: np.ndarray | None, box: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Fold points and an optional box into SAM's ONNX point convention (model frame).

    Points keep their labels (1 foreground, 0 background); a box becomes two corner points labelled
    2 (top-left) and 3 (bottom-right); without a box one padding point ``(0, 0)`` labelled -1 is
    appended. This is exactly what SAM's prompt encoder does with ``points`` and ``boxes``.

    Returns:
        ``coords (N', 2)`` float32 and ``labels (N',)`` float32.
    """
    c = [] if coords is None else [np.asarray(coords, np.float32).reshape(-1, 2)]
    lab = [] if labels is None else [np.asarray(labels, np.float32).reshape(-1)]
    if box is not None:
        c.append(np.asarray(box, np.float32).reshape(2, 2))
        lab.append(np.asarray([2.0, 3.0], np.float32))
    else:
        c.append(np.zeros((1, 2), np.float32))
        lab.append(np.asarray([-1.0], np.float32))
    return np.concatenate(c).astype(np.float32), np.concatenate(lab).astype(np.float32)


#: The moves of :func:`jitter_prompts`: name -> (dx, dy) in units of the shift (working-frame fractions).
JITTER_MOVES = {"up": (0.0, -1.0), "down": (0.0, 1.0), "left": (-1.0, 0.0), "right": (1.0, 0.0)}


def jitter_prompts(prompt: LearnedPrompt, shift: float) -> dict[str, LearnedPrompt]:
    """Small variants of a learned point prompt, for the quality flag's prompt-jitter agreement
    (:mod:`lungsam.qc`): ``up``, ``down``, ``left``, ``right`` (every point moved by ``shift``, a fraction of the
    working frame, clipped to the frame) and ``drop<i>`` (point ``i`` left out; only with more than one point per
    lung). Same mode and box as ``prompt``, so training's and the runtime's decoders see the same inputs
    (:func:`model_prompt`). Raises :class:`~lungsam.errors.ArgumentError` for a prompt without points or a
    ``shift`` outside (0, 0.25]."""
    if not prompt.uses_points or prompt.points is None:
        raise ArgumentError(f"prompt jitter needs learned points; prompt {prompt.mode!r} has none")
    if not 0.0 < shift <= 0.25:
        raise ArgumentError(f"prompt jitter shift must be in (0, 0.25] of the frame, got {shift!r}")
    out = {}
    for name, (dx, dy) in JITTER_MOVES.items():
        pts = np.clip(prompt.points + shift * np.asarray([dx, dy], np.float32), 0.0, 1.0).astype(np.float32)
        out[name] = replace(prompt, points=pts)
    if prompt.points_per_lung > 1:
        for i in range(len(prompt.points)):
            keep = np.arange(len(prompt.points)) != i
            out[f"drop{i}"] = replace(prompt, points=prompt.points[keep], labels=prompt.labels[keep])
    return out


def default_jitter_names(prompt: LearnedPrompt) -> tuple[str, ...]:
    """The variants of :func:`jitter_prompts` the quality flag runs by default: all of them (ten for 3 points per
    lung). The six dropped-point variants alone ranked bad masks slightly better for six decoder runs instead of
    ten, but their validation-calibrated line flagged 27 % of an unseen hospital's images against 14.5 %
    (results/quality/README.md): not the default. A calibration names its variants (``qc.jitter.variants``); the
    runtime runs those."""
    return tuple(jitter_prompts(prompt, 0.03))  # the names do not depend on the shift


def jitter_model_prompts(prompt: LearnedPrompt, spec: PreprocessSpec, size: int, shift: float,
                         names) -> list[tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]]:
    """The variants ``names`` of :func:`jitter_prompts` (in that order) in SAM's model frame for a working frame of
    ``size`` x ``size`` (:func:`model_prompt`: ``(coords (N, 2), labels (N,), box or None)``), as training's torch
    decoder takes them. Raises :class:`~lungsam.errors.ArgumentError` for a name :func:`jitter_prompts` does not
    make."""
    variants = jitter_prompts(prompt, shift)
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise ArgumentError(f"prompt jitter variants {unknown} cannot be made from the learned prompt (it makes "
                            f"{', '.join(variants)})")
    return [model_prompt(variants[n], spec, (size, size)) for n in names]


def jitter_point_inputs(prompt: LearnedPrompt, spec: PreprocessSpec, size: int, shift: float,
                        names) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`jitter_model_prompts` in SAM's ONNX point form (:func:`labelled_points`: ``[(coords (N', 2), labels
    (N',)) float32]``), what the runtime feeds its prompted decoder and the export's parity gate feeds the exported
    decoders."""
    return [labelled_points(*p) for p in jitter_model_prompts(prompt, spec, size, shift, names)]


def point_count_groups(prompts) -> dict[int | None, list[int]]:
    """Indices of ``prompts`` (ONNX point form ``(coords (N', 2), labels (N',))``, or ``None`` for the learned prompt
    baked into ``decoder_fixed``) grouped by point count, in first-seen order: prompts of equal count share one
    decoder call (SAM pads with one -1 point only). The runtime's decoder and the export's parity gate, which times
    the flag's variants as the runtime runs them, group alike."""
    groups: dict[int | None, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(None if p is None else len(p[1]), []).append(i)
    return groups
