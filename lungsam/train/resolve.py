"""One resolve step: a :class:`~lungsam.train.config.TrainConfig` -> what a run needs, derived once.

:func:`resolve` turns the config's choices (``device="auto"``, ``checkpoint=None``, ``encoder_size``, ``amp``,
``cpu_bf16``) into facts (the device, the weights file and its sha256, the preprocessing spec, whether the run
computes in mixed precision and in which dtype), and fails on what cannot run here before any work (an encoder size
that does not fit the backbone's grid, ``--cpu-bf16`` on a CPU without native bfloat16, ``--device cuda`` without
CUDA, a backbone without downloadable weights and no ``--checkpoint``). The training loop, export and bench read
the :class:`Resolved` instead of deriving each of these again.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..backbones import preprocess_for
from ..embeddings import weights_fingerprint
from ..preprocess import PreprocessSpec
from ..samples import checkpoint_for
from .config import TrainConfig
from .engine import mixed_precision, pick_device


@dataclass(frozen=True)
class Resolved:
    """What a :class:`TrainConfig` means on this machine.

    Attributes:
        device: ``cpu`` or ``cuda[:i]`` (``auto`` resolved).
        mixed: the run computes in mixed precision (:func:`lungsam.train.engine.mixed_precision`).
        precision: ``float32``, ``cpu-bfloat16`` (``--cpu-bf16``) or ``cuda-amp`` (bfloat16 where the GPU has it,
            else float16 with a gradient scaler); thresholds and test scores are float32 in every case.
        preprocess: the backbone's preprocessing at the config's encoder size (model frame, embedding grid).
        checkpoint: the weights file (absolute path; ``None`` for the seeded ``tiny`` backbone).
        weights_sha256: sha256 of that file (:func:`lungsam.embeddings.weights_fingerprint`).
    """

    device: str
    mixed: bool
    precision: str
    preprocess: PreprocessSpec
    checkpoint: str | None
    weights_sha256: str

    def record(self) -> dict:
        """JSON-ready: ``{device, mixed, precision, preprocess (its fields), checkpoint, weights_sha256}``."""
        return {"device": self.device, "mixed": self.mixed, "precision": self.precision,
                "preprocess": self.preprocess.to_dict(), "checkpoint": self.checkpoint,
                "weights_sha256": self.weights_sha256}


def resolve_checkpoint(backbone: str, checkpoint: str | None) -> str | None:
    """The weights file of ``backbone``: ``checkpoint`` (must exist; made absolute), else the official file from
    the cache (downloaded once, sha256 checked), else ``None`` for ``tiny`` (seeded weights); the one rule,
    :func:`lungsam.samples.checkpoint_for`, which other layers call too.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist. ArgumentError: the backbone has no official weights.
    """
    return checkpoint_for(_Choice(backbone, checkpoint))


@dataclass(frozen=True)
class _Choice:
    backbone: str
    checkpoint: str | None


def precision_name(device: str, mixed: bool) -> str:
    """``float32``, ``cpu-bfloat16`` or ``cuda-amp`` for a run on ``device`` whose mixed precision is ``mixed``."""
    if not mixed:
        return "float32"
    return "cuda-amp" if device.startswith("cuda") else "cpu-bfloat16"


def resolve(cfg: TrainConfig) -> Resolved:
    """Resolve ``cfg`` on this machine (see the module docstring); cheap except for a first download of the
    official weights and the sha256 of the weights file (about 1 s for SAM ViT-B)."""
    preprocess = preprocess_for(cfg.backbone, cfg.encoder_size)  # an encoder size that does not fit fails here
    device = pick_device(cfg.device)
    mixed = mixed_precision(device, cfg.amp, cfg.cpu_bf16)  # so does --cpu-bf16 where it cannot run
    checkpoint = resolve_checkpoint(cfg.backbone, cfg.checkpoint)
    return Resolved(device=device, mixed=mixed, precision=precision_name(device, mixed), preprocess=preprocess,
                    checkpoint=checkpoint, weights_sha256=weights_fingerprint(cfg.backbone, checkpoint))
