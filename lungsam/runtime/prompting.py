"""The runtime's prompt policy (where each image's box comes from) and the checks of a caller's prompts.

Torch-free. A :class:`PromptPolicy` is resolved once, when a segmenter loads: from the caller's ``box_source``
(or its boolean alias ``box_from_first_pass``), else the bundle's ``manifest.inference``
(:class:`lungsam.manifest.InferencePolicy`), else the prompt mode's own (``given`` for ``box``/``both``,
``learned`` otherwise). The box source of each image that ran is recorded in its result
(:attr:`~lungsam.runtime.segmenter.SegmentationResult.box_source`) and its ``predictions.jsonl`` line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArgumentError, LungsamError
from ..manifest import BOX_SOURCES, InferencePolicy
from ..prompts import AUTO_BOX_PROMPT_MODES, LearnedPrompt, first_pass_prompt
from .bundle import BundleError

FIRST_PASS = "first-pass"
BOX_LABELS = (2.0, 3.0)  # SAM's labels of a box's two corners in a point prompt

# what a result says about the prompt that ran (SegmentationResult.prompt)
LEARNED_KIND, INTERACTIVE_KIND, FIRST_PASS_KIND = "learned", "interactive", "first-pass box"


class PromptRequiredError(LungsamError, ValueError):
    """The bundle's prompt mode needs a ground-truth box, and none was given."""


@dataclass(frozen=True)
class PromptPolicy:
    """Where an image's box comes from when the caller gives no prompt for it.

    Attributes:
        box_source: one of :data:`lungsam.manifest.BOX_SOURCES`, or ``None``: the prompt mode's own
            (:meth:`source`).
    """

    box_source: str | None = None

    def __post_init__(self) -> None:
        if self.box_source is not None and self.box_source not in BOX_SOURCES:
            raise ArgumentError(f"box source {self.box_source!r}: expected one of {', '.join(BOX_SOURCES)}")

    def source(self, prompt: LearnedPrompt) -> str:
        """The box source in force for a bundle prompted with ``prompt``."""
        if self.box_source is not None:
            return self.box_source
        return "given" if prompt.needs_ground_truth else "learned"

    @property
    def first_pass(self) -> bool:
        return self.box_source == FIRST_PASS

    def to_dict(self, prompt: LearnedPrompt) -> dict:
        return {"box_source": self.source(prompt)}


def resolve_policy(bundle_policy: InferencePolicy | None, box_source: str | None = None,
                   box_from_first_pass: bool | None = None) -> PromptPolicy:
    """The policy a segmenter runs with: ``box_source`` if given, else the alias ``box_from_first_pass``
    (``True``: ``first-pass``; ``False``: the prompt mode's own), else the bundle's ``inference.box_source``.

    Raises:
        ArgumentError: an unknown ``box_source``, or one that contradicts ``box_from_first_pass``.
    """
    if box_source is not None and box_from_first_pass is not None and box_from_first_pass != (box_source == FIRST_PASS):
        raise ArgumentError(f"box source {box_source!r} contradicts box_from_first_pass={box_from_first_pass}")
    if box_source is None and box_from_first_pass is not None:
        return PromptPolicy(FIRST_PASS if box_from_first_pass else None)
    if box_source is None and bundle_policy is not None:
        return PromptPolicy(bundle_policy.box_source)
    return PromptPolicy(box_source)


def check_policy(policy: PromptPolicy, prompt: LearnedPrompt, models: tuple[str, ...] | list[str], root: Path) -> None:
    """Refuse a policy the bundle at ``root`` (prompted with ``prompt``, holding ``models``) cannot follow.

    Raises:
        BundleError: ``first-pass`` for a model trained without a box or without the prompted decoder;
            ``learned`` for a ``box``/``both`` model, which has no learned box.
    """
    if policy.first_pass:
        try:
            first_pass_prompt(prompt)
        except ValueError as e:
            raise BundleError(f"bundle {root}: {e}") from None
        if "decoder" not in models:
            raise BundleError(f"bundle {root}: a box from a first pass needs the prompted decoder; this "
                              f"bundle has {', '.join(models)}")
    if policy.box_source == "learned" and prompt.needs_ground_truth:
        raise BundleError(f"bundle {root}: box source 'learned': prompt mode {prompt.mode!r} has no learned box "
                          "(it needs each image's box: 'given' or 'first-pass')")


def box_required(prompt: LearnedPrompt) -> PromptRequiredError:
    """The error for an image without the box its policy asks the caller for."""
    if prompt.needs_ground_truth:
        return PromptRequiredError(
            f"this bundle's prompt mode is {prompt.mode!r}, which needs a lung bounding box per image "
            "(x0, y0, x1, y1 in original pixels): pass box=...; a bundle trained with --prompt points, "
            "auto-box or auto-both needs none")
    return PromptRequiredError("the prompt policy's box source is 'given', which needs a lung bounding box per "
                               "image (x0, y0, x1, y1 in original pixels): pass box=...")


def validated_box(box) -> np.ndarray:
    """A caller's box ``(x0, y0, x1, y1)`` as ``(4,)`` float32 (raises ``ValueError`` unless finite and ordered)."""
    bx = np.asarray(box, np.float32).reshape(-1)
    if bx.shape != (4,) or not np.all(np.isfinite(bx)) or bx[2] < bx[0] or bx[3] < bx[1]:
        raise ValueError(f"box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {box!r}")
    return bx


def validated_points(points, labels) -> tuple[np.ndarray, np.ndarray]:
    """A caller's ``(N, 2)`` points ``(x, y)`` and ``(N,)`` labels (1 lung, 0 background; default all 1) as float32
    arrays (raises ``ValueError`` for an empty, non-finite or misshapen prompt)."""
    pts = np.asarray(points, np.float32)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0 or not np.all(np.isfinite(pts)):
        raise ValueError(f"points must be a non-empty (N, 2) array of (x, y), got shape {pts.shape}")
    labs = np.ones(len(pts), np.float32) if labels is None else np.asarray(labels, np.float32).reshape(-1)
    if labs.shape != (len(pts),) or not np.all(np.isin(labs, (0.0, 1.0))):
        raise ValueError(f"labels must be ({len(pts)},) of 1 (lung) / 0 (background), got {labels!r}")
    return pts, labs


def result_box_source(kind: str, prompt: LearnedPrompt, labels: np.ndarray | None = None) -> str | None:
    """Where the box of one image's decoded prompt came from: ``first-pass``, ``given`` (a caller's box, seen
    in its model-frame ``labels``), ``learned`` (the learned mean-mask box), or ``None`` (the prompt had no box)."""
    if kind == FIRST_PASS_KIND:
        return FIRST_PASS
    if kind == INTERACTIVE_KIND:
        return "given" if labels is not None and bool(np.isin(labels, BOX_LABELS).any()) else None
    return "learned" if prompt.mode in AUTO_BOX_PROMPT_MODES else None
