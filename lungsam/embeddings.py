"""On-disk cache of frozen image-encoder outputs.

The encoder runs once per (backbone, weights, preprocessing, working image); the embedding is
stored as float16 ``.npy`` under ``$LUNGSAM_CACHE/embeddings/<backbone>-<weights sha>-<prep sha>/``
named by the sha256 of the working image, and reused across epochs, folds, prompts and runs.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .artifacts import sha256_file, write_bytes_atomic
from .data import Sample
from .preprocess import PreprocessSpec, encoder_input


def embeddings_root() -> Path:
    root = os.environ.get("LUNGSAM_CACHE") or Path.home() / ".cache" / "lungsam"
    return Path(root) / "embeddings"


def weights_fingerprint(backbone: str, checkpoint: str | Path | None) -> str:
    """sha256 of the checkpoint file, or a fixed tag for weights built from a seed (``tiny``)."""
    if checkpoint is None:
        return hashlib.sha256(f"{backbone}:seeded-random".encode()).hexdigest()
    return sha256_file(checkpoint)


@dataclass
class EmbeddingCache:
    """Cache for one backbone + weights + preprocessing.

    Attributes:
        backbone: registry name.
        weights_sha256: see :func:`weights_fingerprint`.
        spec: the backbone's preprocessing.
        root: cache root (default :func:`embeddings_root`).
    """

    backbone: str
    weights_sha256: str
    spec: PreprocessSpec
    root: Path = field(default_factory=embeddings_root)
    hits: int = 0
    misses: int = 0

    @property
    def directory(self) -> Path:
        prep = hashlib.sha256(json.dumps(self.spec.to_dict(), sort_keys=True).encode()).hexdigest()
        return Path(self.root) / f"{self.backbone}-{self.weights_sha256[:16]}-{prep[:12]}"

    def path_for(self, sample: Sample) -> Path:
        return self.directory / f"{sample.content_hash}.npy"

    def load(self, sample: Sample) -> np.ndarray | None:
        p = self.path_for(sample)
        if not p.exists():
            return None
        try:
            return np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError):  # a damaged entry is recomputed
            return None

    def store(self, sample: Sample, embedding: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, embedding.astype(np.float16), allow_pickle=False)
        write_bytes_atomic(self.path_for(sample), buf.getvalue())

    @torch.no_grad()
    def embed(self, encoder: torch.nn.Module, samples: Sequence[Sample], *, device: str = "cpu", batch_size: int = 4,
              progress: bool = True) -> np.ndarray:
        """``(N, C, E, E)`` float16 embeddings of ``samples``, computing only the missing ones."""
        out: list[np.ndarray | None] = [self.load(s) for s in samples]
        todo = [i for i, e in enumerate(out) if e is None]
        self.hits += len(samples) - len(todo)
        self.misses += len(todo)
        if todo:
            encoder = encoder.to(device).eval()
            bar = tqdm(total=len(todo), desc=f"encoding ({self.backbone})", unit="img", disable=not progress)
            for start in range(0, len(todo), batch_size):
                idx = todo[start:start + batch_size]
                x = torch.from_numpy(np.stack([encoder_input(samples[i].image, self.spec) for i in idx])).to(device)
                emb = encoder(x).float().cpu().numpy()
                for i, e in zip(idx, emb):
                    self.store(samples[i], e)
                    out[i] = e.astype(np.float16)
                bar.update(len(idx))
            bar.close()
        return np.stack(out)
