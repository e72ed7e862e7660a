"""A fold's weight files and its resume state: ``<part>_best/last.safetensors`` and ``train_state.pt``
(named by :class:`lungsam.layout.FoldLayout`)."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from ..artifacts import atomic_path


def save_weights(state: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    """A trained part's state dict (mask decoder, encoder LoRA adapter, U-Net) as safetensors, atomically, with
    ``meta`` (format, run config, fold, epoch, validation F1) in its metadata."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``*.safetensors`` file written by :func:`save_weights` (tensors on the CPU)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def save_train_state(path: Path, optimizer: torch.optim.Optimizer, state: dict,
                     weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Atomically write ``train_state.pt``: the optimiser's state, ``state`` (plain values) and the trained
    ``weights`` (``{part: state dict}``) of the same epoch, everything a killed fold needs to go on, in one
    file, so a kill between two writes cannot pair one epoch's weights with another's optimiser. Loadable
    with ``torch.load(..., weights_only=True)``."""
    buf = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), **state,
                "weights": {part: {k: v.detach().cpu() for k, v in sd.items()} for part, sd in weights.items()}}, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_train_state(path: Path) -> dict:
    """A ``train_state.pt`` written by :func:`save_train_state` (tensors on the CPU, plain values only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def train_state_weights(st: dict, part: str, older_file: Path) -> dict[str, torch.Tensor]:
    """The ``part`` weights of a loaded ``train_state.pt``; states written before they were kept there
    take them from ``older_file`` (the ``*_last.safetensors`` written beside them)."""
    if "weights" in st:
        return st["weights"][part]
    return load_weights(older_file)
