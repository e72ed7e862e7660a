"""What training, evaluation, benchmarks and reproduce share before any model trains: the data at working size,
the backbone weights file a run uses, the backbone loaded and checked, and cached embeddings of samples.

These take any settings object with the named attributes (:class:`lungsam.train.config.TrainConfig` has them all),
so the shared layer never imports :mod:`lungsam.train`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .backbones import get_backbone, preprocess_for
from .data import Dataset, Sample, load_dataset, pool
from .embeddings import EmbeddingCache, weights_fingerprint
from .errors import ArgumentError

Log = Callable[[str], None]
logger = logging.getLogger(__name__)


class BackboneChoice(Protocol):
    """The backbone settings of a run: its registry name, a weights file (``None``: the official one)."""

    backbone: str
    checkpoint: str | None


class EncoderChoice(Protocol):
    """The encoder settings embeddings depend on: backbone, encoder input side (``None``: native), batch."""

    backbone: str
    encoder_size: int | None
    embed_batch_size: int


def load_data(paths: list[str], size: int, log: Log | None = None) -> Dataset:
    """Load and pool data sets at working resolution ``size`` (bad pairs are logged and skipped)."""
    return pool([load_dataset(p, size, log=log or logger.info) for p in paths])


def checkpoint_for(cfg: BackboneChoice) -> str | None:
    """The weights file a run uses: the user's path, the official cache copy, or ``None`` for ``tiny``."""
    if cfg.checkpoint:
        if not Path(cfg.checkpoint).exists():
            raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no such file")
        return str(Path(cfg.checkpoint).resolve())
    spec = get_backbone(cfg.backbone)
    if spec.weights is None:
        if cfg.backbone == "tiny":
            return None
        raise ArgumentError(f"backbone {cfg.backbone!r} has no downloadable weights: pass --checkpoint PATH")
    from .weights import ensure_weights

    return str(ensure_weights(spec.weights))


def checked_backbone(backbone: str, encoder_size: int | None, ckpt: str | None, sha256: str,
                     log: Log | None = None) -> tuple[object, dict]:
    """The backbone with its weights (a clear error when ``ckpt`` is not a checkpoint of it) and the record
    of those weights (path, sha256, official yes/no); warns when they are not the official file."""
    from .runs import checkpoint_info, checkpoint_warning, load_backbone_checked

    sam = load_backbone_checked(backbone, ckpt, encoder_size)
    record = checkpoint_info(backbone, ckpt, sha256)
    if warning := checkpoint_warning(backbone, record):
        (log or logger.warning)(warning)
    return sam, record


def embed_samples(sam, cfg: EncoderChoice, ckpt: str | None, samples: list[Sample], device: str,
                  progress: bool = True, fingerprint: str | None = None) -> tuple[np.ndarray, EmbeddingCache]:
    """Cached ``(N, C, E, E)`` float16 embeddings of ``samples``; ``fingerprint`` keys the cache (default:
    the weights file's, see :func:`lungsam.embeddings.weights_fingerprint`; a run whose encoder carries a
    merged adapter passes its own)."""
    spec = preprocess_for(cfg.backbone, cfg.encoder_size)
    cache = EmbeddingCache(cfg.backbone, fingerprint or weights_fingerprint(cfg.backbone, ckpt), spec)
    emb = cache.embed(sam.image_encoder, samples, device=device, batch_size=cfg.embed_batch_size, progress=progress)
    return emb, cache
