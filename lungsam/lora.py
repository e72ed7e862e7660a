"""Low-rank adapters (LoRA) on the image encoder, through PEFT (``pip install 'lungsam[lora]'``).

An opt-in beyond the paper's decoder-only recipe: the encoder's weights stay frozen and rank-``r``
updates ``W + (alpha / r) B A`` are learned on the named linear layers (default ``qkv``: the attention
projections of TinyViT and of SAM's ViT). Adapters are saved on their own (a few hundred kB) and merged
into the encoder weights for evaluation and export, so exported models have the plain architecture.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import sha256_file
from .errors import ArgumentError, LungsamError

ADAPTER_NAME = "default"


class LoraUnavailableError(LungsamError, RuntimeError):
    """PEFT is not installed."""


@dataclass(frozen=True)
class LoraSpec:
    """``rank`` r, ``alpha`` (scale alpha / r), ``targets``: names (suffixes) of the encoder's linear layers."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = ("qkv",)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ArgumentError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ArgumentError("LoRA needs at least one target layer name")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise LoraUnavailableError("LoRA needs PEFT: pip install 'lungsam[lora]' (or pip install peft)") from e
    return peft


def add_lora(encoder: torch.nn.Module, spec: LoraSpec) -> list[torch.nn.Parameter]:
    """Inject adapters into ``encoder`` in place (base weights frozen); returns the adapter parameters."""
    peft = _peft()
    linear = [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    if not any(n == t or n.endswith("." + t) for n in linear for t in spec.targets):
        raise ArgumentError(f"no linear layer of the encoder is named {', '.join(spec.targets)}; "
                         f"its linear layers end in: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in linear}))}")
    cfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0,
                          bias="none")
    peft.inject_adapter_in_model(cfg, encoder, adapter_name=ADAPTER_NAME)
    params = []
    for n, p in encoder.named_parameters():
        is_lora = "lora_" in n
        p.requires_grad_(is_lora)
        if is_lora:
            params.append(p)
    return params


def lora_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (CPU, contiguous)."""
    peft = _peft()
    sd = peft.get_peft_model_state_dict(encoder, adapter_name=ADAPTER_NAME)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def load_lora_state(encoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights saved by :func:`lora_state`; every adapter weight must be matched."""
    peft = _peft()
    res = peft.set_peft_model_state_dict(encoder, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(res, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(res, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"adapter weights do not fit the encoder (unexpected {unexpected[:3]}, missing {missing[:3]})")


def merge_lora(encoder: torch.nn.Module) -> int:
    """Fold every adapter into its base layer's weight and put the plain layer back. Returns the count."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(encoder.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = encoder.get_submodule(parent_name) if parent_name else encoder
            setattr(parent, child, module.get_base_layer())
            merged += 1
    for p in encoder.parameters():
        p.requires_grad_(False)
    return merged


def encoder_fingerprint(base_fingerprint: str, adapter_file: Path | None) -> str:
    """Key of the embedding cache: the base weights' fingerprint, combined with the adapter file's
    sha256 when the encoder carries a merged adapter."""
    if adapter_file is None:
        return base_fingerprint
    return hashlib.sha256(f"{base_fingerprint}+lora:{sha256_file(adapter_file)}".encode()).hexdigest()
