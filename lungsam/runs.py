"""Reading training runs (shared by eval, export, benchmarks; never imports :mod:`lungsam.train`).

The run folder ``lungsam train`` and ``lungsam train-unet`` write is named, file by file, by
:class:`lungsam.layout.RunLayout` and :class:`lungsam.layout.FoldLayout` (the tree is in :mod:`lungsam.layout`).
"""
from __future__ import annotations

import contextlib
import errno
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from segment_anything.modeling import Sam

from .artifacts import read_json, sha256_file
from .backbones import build_backbone, get_backbone, preprocess_for
from .errors import ArgumentError, LungsamError
from .layout import FoldLayout, RunLayout
from .preprocess import PreprocessSpec
from .prompts import LearnedPrompt


class RunError(LungsamError, ValueError):
    pass


class CheckpointError(ArgumentError, RunError):
    """A ``--checkpoint`` that is not a checkpoint of its backbone (unreadable, not a state dict, other keys
    or shapes): an option value this run cannot take (exit 2)."""


class RunFolderError(RunError):
    """A run or evaluation folder that cannot be written (read-only, disk full, no permission)."""


#: errors of torch.load / load_state_dict on a file that is not a checkpoint of the backbone
_CHECKPOINT_ERRORS = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError, KeyError,
                      OSError)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def load_backbone_checked(backbone: str, checkpoint: str | Path | None, encoder_size: int | None = None) -> Sam:
    """:func:`lungsam.backbones.build_backbone`, with a :class:`CheckpointError` naming the file when
    ``checkpoint`` is not a valid checkpoint of ``backbone`` (call it before creating any output folder)."""
    try:
        return build_backbone(backbone, checkpoint, encoder_size=encoder_size)
    except _CHECKPOINT_ERRORS as e:
        if checkpoint is None:
            raise
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__
        raise CheckpointError(f"--checkpoint {checkpoint}: not a valid {backbone} checkpoint ({why})") from None


def checkpoint_info(backbone: str, checkpoint: str | Path | None, sha256: str) -> dict:
    """The record of the backbone weights a run or evaluation used (path, sha256, official yes/no; see
    :func:`lungsam.weights.checkpoint_record`)."""
    from .weights import checkpoint_record

    return checkpoint_record(get_backbone(backbone).weights, checkpoint, sha256)


def checkpoint_warning(backbone: str, record: dict) -> str | None:
    """The warning for weights that are not the official file of ``backbone`` (``None`` when they are, or
    when it has none)."""
    from .weights import checkpoint_warning as warning

    return warning(record, get_backbone(backbone).weights)


@contextlib.contextmanager
def run_folder_errors(folder: Path, what: str = "the run folder") -> Iterator[None]:
    """Turn a write failure (read-only folder, disk full, no permission) under ``folder`` into a
    :class:`RunFolderError` naming the path; other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise RunFolderError(f"cannot write {what} {folder}: {e.filename or folder}: {e.strerror or e}") from None


@dataclass
class RunModel:
    """A tuned model ready to predict.

    Attributes:
        sam: backbone with the tuned mask decoder loaded (eval mode, CPU).
        spec: preprocessing of the backbone.
        prompt: the fold's learned prompt.
        threshold: probability threshold chosen on validation.
        working_size: S of the working frame.
        run: contents of ``run.json``.
        fold: fold index; ``fold_dir`` its folder; ``split`` its split lists; ``metrics`` its metrics.json.
        encoder_fingerprint: key of the embedding cache for this model's encoder (the backbone weights'
            sha256, combined with the adapter file's when the run trained LoRA adapters, which are
            merged into ``sam.image_encoder``).
    """

    sam: Sam
    spec: PreprocessSpec
    prompt: LearnedPrompt
    threshold: float
    working_size: int
    run: dict
    fold: int
    fold_dir: Path
    split: dict
    metrics: dict
    encoder_fingerprint: str = ""
    checkpoint: dict = field(default_factory=dict)

    @property
    def backbone(self) -> str:
        return self.run["config"]["backbone"]


def fold_dirs(run_dir: Path) -> list[Path]:
    """A run's fold folders, in fold order."""
    return [f.root for f in RunLayout(run_dir).existing_folds()]


def finished_fold_dirs(run_dir: Path) -> list[Path]:
    """Fold folders of a run that hold their ``metrics.json`` (training finished), in fold order."""
    return [f.root for f in RunLayout(run_dir).existing_folds() if f.metrics_json.exists()]


def pick_fold(run_dir: Path, fold: int | None) -> Path:
    """The requested fold, or the only/complete fold with the best validation F1."""
    dirs = finished_fold_dirs(run_dir)
    if not dirs:
        raise RunError(f"{run_dir}: no finished fold (folds/fold_*/metrics.json); did training complete?")
    if fold is not None:
        d = RunLayout(run_dir).fold(fold).root
        if d not in dirs:
            raise RunError(f"{run_dir}: fold {fold} not found or unfinished; finished: {[x.name for x in dirs]}")
        return d
    return max(dirs, key=lambda d: read_json(FoldLayout(d).metrics_json)["val"]["f1"]["mean"])


def resolve_checkpoint(run: dict) -> str | None:
    """The backbone checkpoint recorded in ``run.json`` (verified by sha256), or the official cache copy."""
    cfg = run["config"]
    ckpt, want = cfg.get("checkpoint"), run.get("weights_sha256")
    if cfg["backbone"] == "tiny" and ckpt is None:
        return None
    if ckpt and Path(ckpt).exists():
        if want and sha256_file(ckpt) != want:
            raise RunError(f"backbone checkpoint {ckpt} changed since training (sha256 differs from run.json)")
        return ckpt
    spec = get_backbone(cfg["backbone"])
    if spec.weights:
        from .weights import ensure_weights

        p = ensure_weights(spec.weights)
        if want and sha256_file(p) != want:
            raise RunError(f"official {spec.weights} weights differ from the run's (sha256)")
        return str(p)
    raise RunError(f"backbone checkpoint {ckpt} not found; pass it with --checkpoint")


def load_run(run_dir: str | Path, fold: int | None = None, checkpoint: str | None = None,
             which: str = "best") -> RunModel:
    """Rebuild the tuned model of a run (``which`` = ``best`` or ``last`` decoder weights)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if not layout.run_json.exists():
        raise RunError(f"{run_dir}: not a lungsam run (no {layout.run_json.name})")
    run = read_json(layout.run_json)
    fd = FoldLayout(pick_fold(run_dir, fold))
    ckpt = checkpoint or resolve_checkpoint(run)
    encoder_size = run["config"].get("encoder_size")
    sam = load_backbone_checked(run["config"]["backbone"], ckpt, encoder_size=encoder_size)
    sam.mask_decoder.load_state_dict(load_file(str(fd.weights("decoder", which))), strict=True)
    adapter = _merge_adapter(sam, run["config"], fd.weights("encoder_lora", which))
    from .embeddings import weights_fingerprint
    from .lora import encoder_fingerprint

    weights_sha = run.get("weights_sha256") or weights_fingerprint(run["config"]["backbone"], ckpt)
    fingerprint = encoder_fingerprint(weights_sha, adapter)
    metrics = read_json(fd.metrics_json)
    return RunModel(sam=sam.eval(), spec=preprocess_for(run["config"]["backbone"], encoder_size),
                    prompt=LearnedPrompt.from_dict(read_json(fd.prompt_json)), threshold=float(metrics["threshold"]),
                    working_size=int(run["config"]["size"]), run=run, fold=fd.index, fold_dir=fd.root,
                    split=read_json(fd.split_json), metrics=metrics, encoder_fingerprint=fingerprint,
                    checkpoint=checkpoint_info(run["config"]["backbone"], ckpt,
                                               sha256_file(ckpt) if ckpt else weights_sha))


def _merge_adapter(sam: Sam, cfg: dict, path: Path) -> Path | None:
    """Load and merge the run's encoder adapter (runs trained with ``--lora-rank``); returns its file."""
    if int(cfg.get("lora_rank") or 0) <= 0:
        return None
    from safetensors.torch import load_file

    from .lora import LoraSpec, add_lora, load_lora_state, merge_lora

    if not path.exists():
        raise RunError(f"{path.parent}: the run trained LoRA adapters but {path.name} is missing")
    add_lora(sam.image_encoder, LoraSpec(int(cfg["lora_rank"]), float(cfg["lora_alpha"]), tuple(cfg["lora_targets"])))
    load_lora_state(sam.image_encoder, load_file(str(path)))
    merge_lora(sam.image_encoder)
    return path
