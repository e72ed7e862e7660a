"""A finished fold decoded again on cached embeddings, as training decoded it.

For the tools that re-derive or re-score a fold's quality calibration without retraining
(``scripts/quality_recalibrate.py``, ``scripts/quality_dump.py``, ``results/quality/*.py``) and for ``lungsam
eval``: the encoder settings the run was trained with (so the embedding cache key matches), its split's samples, and
their working-frame probabilities, predicted IoU and, where asked, the quality flag's prompt-variant maps.
Frames: everything in the working frame ``S x S`` (``run.json`` ``config.size``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..data import Sample
from ..errors import ArgumentError
from ..qc import DEFAULT_JITTER_SHIFT, QcModel, load_calibration
from ..runs import RunModel
from ..samples import embed_samples, load_data
from .config import TrainConfig
from .engine import predict_with_iou
from .folds import PromptJitter, prompt_jitter_of

#: ``(shift, variant names)`` of prompt variants to decode; names ``None``: the prompt mode's defaults
#: (:func:`lungsam.prompts.default_jitter_names`).
JitterRequest = tuple[float, "tuple[str, ...] | None"]

#: The variants ``lungsam train`` calibrates a new fold's jitter term with.
DEFAULT_JITTER: JitterRequest = (DEFAULT_JITTER_SHIFT, None)


def encoder_config(rm: RunModel, size: int | None = None) -> TrainConfig:
    """The :class:`TrainConfig` that re-encodes images as fold ``rm`` was trained: its backbone, checkpoint and
    encoder size (the embedding cache key), at working size ``size`` (default the run's ``config.size``)."""
    c = rm.run["config"]
    return TrainConfig(backbone=rm.backbone, checkpoint=c.get("checkpoint"),
                       size=int(c["size"]) if size is None else int(size), encoder_size=c.get("encoder_size"))


def fold_parts(rm: RunModel, data_paths: list[str] | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, list[Sample]]:
    """``{"train", "val", "test"}``: the samples of each part of the fold's split, in the split's order, from
    ``data_paths`` (default the run's own ``config.data``) loaded once at the run's working size (``log``: where
    loading reports skipped pairs, default the ``lungsam`` logger). Raises
    :class:`~lungsam.errors.ArgumentError` naming an id of the split that the data lacks."""
    by_id = load_data(list(data_paths or rm.run["config"]["data"]), int(rm.run["config"]["size"]), log).by_id()
    parts = {}
    for part in ("train", "val", "test"):
        missing = [i for i in rm.split[part] if i not in by_id]
        if missing:
            raise ArgumentError(f"fold {rm.fold} {part}: {len(missing)} ids not in the data (first: {missing[0]})")
        parts[part] = [by_id[i] for i in rm.split[part]]
    return parts


def calibrated_jitter(rm: RunModel) -> JitterRequest | None:
    """``(shift, variants)`` of the fold's calibrated prompt-jitter term (``metrics.json`` ``qc.jitter``), or
    ``None`` when its calibration has none."""
    cal = load_calibration(rm.metrics.get("qc"))
    term = cal.jitter if isinstance(cal, QcModel) else None
    return None if term is None else (term.shift, tuple(term.variants))


@dataclass
class Decoded:
    """What the fold's model gives on some samples.

    Attributes:
        samples: the inputs, in order. probs: ``(N, S, S)`` float32 working-frame probabilities. iou: ``(N,)``
        float32 predicted IoU. jitter: the prompt variants (:class:`~lungsam.train.folds.PromptJitter`, maps on
        demand), ``None`` when not asked for or for a prompt mode without variants.
    """

    samples: list[Sample]
    probs: np.ndarray
    iou: np.ndarray
    jitter: PromptJitter | None = None

    @property
    def masks(self) -> list[np.ndarray]:
        """Ground-truth masks ``(S, S)`` bool."""
        return [s.mask for s in self.samples]

    @property
    def images(self) -> list[np.ndarray]:
        """Working-frame images ``(S, S, 3)`` uint8."""
        return [s.image for s in self.samples]


def decode_samples(rm: RunModel, samples: list[Sample], jitter: JitterRequest | None = None,
                   device: str = "cpu", progress: bool = False) -> Decoded:
    """Encode ``samples`` (through the embedding cache, keyed by the fold's encoder) and decode them with the
    fold's learned prompt; with ``jitter`` also its prompt variants (:func:`calibrated_jitter` for the fold's own,
    :data:`DEFAULT_JITTER` for what training would calibrate)."""
    cfg = encoder_config(rm)
    emb, _ = embed_samples(rm.sam, cfg, cfg.checkpoint, samples, device, progress, fingerprint=rm.encoder_fingerprint)
    masks = [s.mask for s in samples]
    probs, iou = predict_with_iou(rm.sam, emb, masks, rm.prompt, rm.spec, cfg.size, device)
    variants = None
    if jitter is not None:
        shift, names = jitter
        variants = prompt_jitter_of(rm.sam, emb, masks, rm.prompt, rm.spec, cfg.size, device, shift, names)
    return Decoded(list(samples), probs, iou, variants)
