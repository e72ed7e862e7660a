"""``torchrun --nproc-per-node N -m lungsam train ...``: data-parallel decoder (and LoRA) training.

Under torchrun (``WORLD_SIZE`` > 1 in the environment) :func:`from_env` joins the process group (gloo on CPU,
NCCL on CUDA, one GPU per local rank) and :func:`attach` wraps the trainer's trainable modules in
``DistributedDataParallel``. Every rank draws the same permutation (the trainer's seeded generator) and takes
the slice ``rank::N`` of each *global* batch of ``--batch-size`` images, so N processes see exactly the batches
one process sees; each rank's loss is weighted by its share of the batch, so DDP's gradient average is the
gradient of the global batch's mean loss (the same update as one process, up to float summation order).
torch's ``DistributedSampler`` is not used because it splits the epoch, not each batch: its updates would not be
those of one process with the same global batch.

Validation, threshold choice and test scoring run on every rank on identical weights (so early stopping agrees
without messages); only rank 0 writes into ``--out`` (ranks > 0 write into a private copy, removed at the end),
logs and shows progress. Embeddings are computed by rank 0 first, then read from the cache by the others.
``run.json`` records ``distributed.world_size``; ``--resume`` with another world size is refused.
Box-jitter draws (``box``/``both`` prompts) come from a per-rank generator, so only those draws differ from a
one-process run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def record(self) -> dict:
        """What ``run.json`` keeps under ``distributed``."""
        return {"world_size": self.world_size, "backend": self.backend,
                "sharding": "each global batch split rank::world_size; DDP gradient average"}

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        return log if self.is_writer else (lambda m: None)

    @contextlib.contextmanager
    def output_dir(self, out: Path) -> Iterator[Path]:
        """``out`` on rank 0; elsewhere a private copy of it (so a resumed run reads the same state), deleted
        afterwards."""
        if self.is_writer:
            yield out
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"lungsam-rank{self.rank}-"))
        try:
            private = tmp / out.name
            if out.exists():
                shutil.copytree(out, private)
            yield private
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills the embedding cache); the others then run it (cache hits)."""
        if not self.is_writer:
            dist.barrier()
        yield
        if self.is_writer:
            dist.barrier()

    def check_resume(self, old_run: dict | None) -> None:
        """Refuse ``--resume`` of a run trained with another world size."""
        if old_run is None:
            return
        before = int((old_run.get("distributed") or {}).get("world_size", 1))
        if before != self.world_size:
            raise ValueError(f"--resume: the run was trained with {before} process(es) and this job has "
                             f"{self.world_size}; resume it with --nproc-per-node {before} (the optimiser state and "
                             "batch sharding are per world size)")


def from_env() -> Distributed | None:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; ``None`` for a plain one-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("LUNGSAM_DDP_BACKEND", "") != "gloo" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Distributed(rank=rank, world_size=world, local_rank=local, backend=backend)


def check_resume_world_size(old_run: dict | None, d: Distributed | None) -> None:
    """A one-process ``--resume`` of a run trained under torchrun (or the reverse) is refused too."""
    if d is not None:
        d.check_resume(old_run)
    elif old_run is not None and int((old_run.get("distributed") or {}).get("world_size", 1)) != 1:
        Distributed(0, 1, 0, "none").check_resume(old_run)


def shutdown(d: Distributed | None) -> None:
    if d is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _BatchLoss(torch.nn.Module):
    """The trainer's loss as a module DDP can wrap: it owns the trainable parts of the SAM model."""

    def __init__(self, trainer):
        super().__init__()
        self.mask_decoder = trainer.sam.mask_decoder
        if any(p.requires_grad for p in trainer.sam.image_encoder.parameters()):  # LoRA adapters
            self.image_encoder = trainer.sam.image_encoder
        self._trainer = [trainer]  # not a submodule

    def forward(self, embeddings: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator) -> torch.Tensor:
        return self._trainer[0]._logits_and_loss(embeddings, masks, rng)[1]


class DistributedStep:
    """Replaces :meth:`DecoderTrainer.step` under torchrun (see the module docstring)."""

    def __init__(self, trainer, d: Distributed, seed: int):
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.d = d
        self.ddp = DDP(_BatchLoss(trainer), find_unused_parameters=True,
                       device_ids=[d.local_rank] if d.backend == "nccl" else None)
        self.jitter_rng = np.random.default_rng([seed, d.rank])

    def step(self, trainer, embeddings: np.ndarray, masks: list[np.ndarray]) -> float:
        """One update on a global batch; this rank computes its slice ``rank::world_size``. Returns the global
        batch's mean loss."""
        n = len(masks)
        mine = list(range(self.d.rank, n, self.d.world_size))
        trainer.sam.mask_decoder.train()
        trainer.optimizer.zero_grad(set_to_none=True)
        if mine:
            loss = self.ddp(embeddings[mine], [masks[i] for i in mine], self.jitter_rng)
            weighted = loss * (len(mine) * self.d.world_size / n)  # DDP averages over ranks: this gives the global mean
        else:  # fewer images than ranks in the last batch: join with a zero gradient
            loss = self.ddp(embeddings[:1], [masks[0]], self.jitter_rng)
            weighted = loss * 0.0
        trainer.backward_and_step(weighted)
        total = torch.tensor([float(loss.detach()) * len(mine)], dtype=torch.float64,
                             device=f"cuda:{self.d.local_rank}" if self.d.backend == "nccl" else "cpu")
        dist.all_reduce(total)
        return float(total.item()) / n


def attach(trainer, d: Distributed | None, seed: int) -> None:
    """Make ``trainer.step`` data-parallel under torchrun (no-op for a one-process run)."""
    if d is not None:
        trainer.distributed = DistributedStep(trainer, d, seed)
