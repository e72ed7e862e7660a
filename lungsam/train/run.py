"""``lungsam train``: the SAM decoder (and, with ``--lora-rank``, the encoder's adapters) fine-tuned over k folds.

The fold loop and the run's orchestration are :mod:`lungsam.train.folds`; this module is SAM's side of them
(:class:`SamFoldTrainer`: cached embeddings or, with LoRA, images in; the learned prompt; best/last weights of the
decoder and the adapter) and what a SAM run prepares once (backbone, embeddings, augmented views). ``lungsam eval``
is :mod:`lungsam.train.evaluate`; the files written are named by :class:`lungsam.layout.RunLayout`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..artifacts import package_versions, utc_now, write_json_atomic
from ..backbones import preprocess_for
from ..data import Dataset, Sample, kfold_splits
from ..embeddings import EmbeddingCache
from ..errors import ArgumentError
from ..layout import FoldLayout, RunLayout
from ..prompts import learn_prompt
from ..samples import checked_backbone, embed_samples, load_data
from . import distributed, report
from .augment import draw_views
from .checkpoints import load_weights
from .config import TrainConfig
from .engine import DecoderTrainer, EncoderLoraTrainer, predict_with_iou
from .folds import (
    FoldData,
    FoldScoring,
    PromptJitter,
    check_resumed_splits,
    config_differences,
    open_run,
    prompt_jitter_of,
    refuse_changed_settings,
    start_run,
    train_all_folds,
)
from .resolve import resolve

Log = Callable[[str], None]
logger = logging.getLogger(__name__)


@dataclass
class AugmentedViews:
    """Cached augmented copies of training images (:mod:`lungsam.train.augment`).

    Attributes:
        embeddings: ``{sample id: (V, C, E, E) float16}``; masks: ``{sample id: [V x (S, S) bool]}``.
        record: what ``run.json`` stores (views, transform ranges, seconds, cache use).
    """

    embeddings: dict[str, np.ndarray]
    masks: dict[str, list[np.ndarray]]
    record: dict


def embed_augmented_views(sam, cfg: TrainConfig, ckpt: str | None, samples: list[Sample], splits: list[dict],
                          device: str, log: Log, progress: bool = True) -> AugmentedViews | None:
    """``cfg.augment_views`` augmented copies of every sample that some fold trains on, encoded through
    the embedding cache (``None`` when augmentation is off)."""
    if cfg.augment_views <= 0:
        return None
    from .augment import AugmentSpec, augmented_views

    t0 = time.perf_counter()
    train_ids = {i for split in splits for i in split["train"]}
    todo = [s for s in samples if s.id in train_ids]
    spec = AugmentSpec.of(cfg)
    views = augmented_views(todo, cfg.augment_views, cfg.seed, spec)
    t1 = time.perf_counter()
    flat = [v for view in views for v in view]
    emb, cache = embed_samples(sam, cfg, ckpt, flat, device, progress)
    emb = emb.reshape(cfg.augment_views, len(todo), *emb.shape[1:])
    record = {"views": cfg.augment_views, "transforms": spec.to_dict(), "images": len(todo),
              "make_s": t1 - t0, "encode_s": time.perf_counter() - t1, "cache_hits": cache.hits,
              "computed": cache.misses}
    log(f"augmentation: {cfg.augment_views} views of {len(todo)} training images "
        f"({cache.misses} encoded, {cache.hits} from the cache)")
    return AugmentedViews(embeddings={s.id: emb[:, i] for i, s in enumerate(todo)},
                          masks={s.id: [views[v][i].mask for v in range(cfg.augment_views)]
                                 for i, s in enumerate(todo)},
                          record=record)


def epoch_views(rng: np.random.Generator, ids: list[str], E: np.ndarray, M: list[np.ndarray],
                aug: AugmentedViews | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """This epoch's training data: per image the original (``E[i]``, ``M[i]``) or one augmented view,
    drawn uniformly. Without ``aug`` returns ``(E, M)`` and draws nothing from ``rng``."""
    if aug is None:
        return E, M
    pick = draw_views(rng, len(ids), aug.record["views"])
    e = np.stack([E[i] if v == 0 else aug.embeddings[sid][v - 1] for i, (sid, v) in enumerate(zip(ids, pick))])
    m = [M[i] if v == 0 else aug.masks[sid][v - 1] for i, (sid, v) in enumerate(zip(ids, pick))]
    return e, m


class SamFoldTrainer:
    """SAM's side of one fold (:class:`lungsam.train.folds.FoldTrainer`): the prompt learned from the fold's
    training masks (``prompt.json``), the mask decoder trained on cached embeddings ``(N, C, E, E)`` or, with
    LoRA, the decoder and the encoder's adapters on working images ``(N, S, S, 3)`` uint8.

    ``weights_sha256`` (the backbone weights' fingerprint) keys the embedding cache of a LoRA run's adapted
    encoder, combined with the best adapter file, as :func:`lungsam.runs.load_run` does."""

    keep_last = True
    scoring = FoldScoring(cleanup=True, quality=True, boundary=True)

    def __init__(self, cfg: TrainConfig, fold: int, data: FoldData, layout: FoldLayout, sam,
                 emb: dict[str, np.ndarray], device: str, aug: AugmentedViews | None = None,
                 weights_sha256: str = "", dist_ctx=None):
        self.cfg, self.fold, self.sam, self.device, self.aug = cfg, fold, sam, device, aug
        self.weights_sha256 = weights_sha256
        if cfg.cleanup == "off":  # --cleanup off: both sweeps recorded, the clean-up never on
            self.scoring = replace(self.scoring, allow_cleanup=False)
        self.spec = preprocess_for(cfg.backbone, cfg.encoder_size)
        self.prompt = learn_prompt(data.masks["train"], cfg.prompt, cfg.points_per_lung)
        write_json_atomic(layout.prompt_json, self.prompt.to_dict())
        self.lora = cfg.lora_spec() is not None
        self.train_ids = [s.id for s in data.samples["train"]]
        # training inputs: cached embeddings, or (LoRA: the encoder changes) the working images themselves
        self.X = {k: np.stack([s.image for s in v]) if self.lora else np.stack([emb[s.id] for s in v])
                  for k, v in data.samples.items()}
        self.E, self.M, self.val_test = self.X, data.masks, {k: data.samples[k] for k in ("val", "test")}
        self.initial = {k: v.clone() for k, v in sam.mask_decoder.state_dict().items()}
        kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, box_jitter=cfg.box_jitter,
                  device=device, amp=cfg.amp, cpu_bf16=cfg.cpu_bf16, seed=cfg.seed + fold)
        if self.lora:
            from ..lora import lora_state

            self.initial_adapter = lora_state(sam.image_encoder)
            lora_params = [p for n, p in sam.image_encoder.named_parameters() if "lora_" in n]
            self.trainer = EncoderLoraTrainer(sam, self.spec, cfg.size, self.prompt, **kw, lora_params=lora_params)
        else:
            self.trainer = DecoderTrainer(sam, self.spec, cfg.size, self.prompt, **kw)
        distributed.attach(self.trainer, dist_ctx, cfg.seed + fold)  # torchrun: data-parallel steps (else no-op)
        self.optimizer = self.trainer.optimizer
        self.label, self.title = f"fold {fold}", f"{cfg.backbone} / {cfg.prompt} / fold {fold}"
        self.weight_names = ("decoder", "encoder_lora") if self.lora else ("decoder",)
        self.prompt_uses_ground_truth = self.prompt.needs_ground_truth

    def train_epoch(self) -> tuple[float, float]:
        e, m = epoch_views(self.trainer.rng, self.train_ids, self.X["train"], self.M["train"], self.aug)
        return self.trainer.train_epoch(e, m)

    def validate(self) -> dict[str, float]:
        return self.trainer.validate(self.X["val"], self.M["val"])

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        weights = {"decoder": self.sam.mask_decoder.state_dict()}
        if self.lora:
            from ..lora import lora_state

            weights["encoder_lora"] = lora_state(self.sam.image_encoder)
        return weights

    def weights_meta(self, epoch: int, val_f1: float) -> dict[str, str]:
        return {"format": "lungsam-decoder/1", "config": json.dumps(self.cfg.to_dict()), "fold": str(self.fold),
                "epoch": str(epoch), "val_f1": f"{val_f1:.6f}", "backbone": self.cfg.backbone}

    def load_state_dicts(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        self.sam.mask_decoder.load_state_dict(weights["decoder"], strict=True)
        if self.lora:
            from ..lora import load_lora_state

            load_lora_state(self.sam.image_encoder, weights["encoder_lora"])

    def loop_state(self) -> dict:
        return self.trainer.loop_state()

    def restore_loop_state(self, st: dict) -> None:
        self.trainer.restore_loop_state(st)

    def load_best(self, fold: FoldLayout) -> None:
        """The best decoder (and adapter: then the val/test embeddings of the adapted encoder, through the cache
        a later eval of this run reads)."""
        best = {"decoder": load_weights(fold.weights("decoder", "best"))}
        if self.lora:
            best["encoder_lora"] = load_weights(fold.weights("encoder_lora", "best"))
        self.load_state_dicts(best)
        if self.lora:
            from ..lora import encoder_fingerprint

            fingerprint = encoder_fingerprint(self.weights_sha256, fold.weights("encoder_lora", "best"))
            cache = EmbeddingCache(self.cfg.backbone, fingerprint, self.spec)
            self.E = {k: cache.embed(self.sam.image_encoder, v, device=self.device,
                                     batch_size=self.cfg.embed_batch_size, progress=False)
                      for k, v in self.val_test.items()}

    def predict(self, part: str) -> tuple[np.ndarray, np.ndarray | None]:
        return predict_with_iou(self.sam, self.E[part], self.M[part], self.prompt, self.spec, self.cfg.size,
                                self.device, self.cfg.batch_size)

    def prompt_jitter(self, part: str) -> PromptJitter | None:
        """The learned points' variants (:func:`lungsam.prompts.jitter_prompts`) on the part's cached embeddings;
        ``None`` unless the prompt is ``points`` (box prompts have no calibrated jitter)."""
        return prompt_jitter_of(self.sam, self.E[part], self.M[part], self.prompt, self.spec, self.cfg.size,
                                self.device, batch_size=self.cfg.batch_size)

    def release(self) -> None:
        """The next fold starts from the pretrained decoder (and the untrained adapter)."""
        self.sam.mask_decoder.load_state_dict(self.initial)
        if self.lora:
            from ..lora import load_lora_state

            load_lora_state(self.sam.image_encoder, self.initial_adapter)


def resume_differences(old_run: dict, cfg: TrainConfig, weights_sha256: str) -> list[str]:
    """What stops ``cfg`` from continuing the run recorded in ``old_run`` (its ``run.json``), as
    ``"name: old -> new"`` lines; empty when it may resume. The weights are compared by sha256, so the
    same checkpoint given by another path (relative, moved, the download cache) resumes."""
    differ = config_differences(TrainConfig.from_dict(old_run["config"]).comparable(), cfg.comparable())
    if old_run.get("weights_sha256") != weights_sha256:
        differ.append(f"weights sha256: {str(old_run.get('weights_sha256'))[:12]}… -> {weights_sha256[:12]}…")
    return differ


def train_run(cfg: TrainConfig, out: str | Path, *, resume: bool = False, only_folds: tuple[int, ...] | None = None,
              log: Log | None = None, progress: bool = True) -> dict:
    """:func:`_train_run`, data-parallel under torchrun (``lungsam.train.distributed``; rank 0 writes ``out``).
    ``log``: progress lines (default: INFO on this module's logger)."""
    log = log or logger.info
    d = distributed.from_env()
    if d is None:
        return _train_run(cfg, out, resume=resume, only_folds=only_folds, log=log, progress=progress)
    try:
        with d.output_dir(Path(out)) as here:
            return _train_run(cfg, here, resume=resume, only_folds=only_folds, log=d.log(log),
                              progress=progress and d.is_writer, dist_ctx=d)
    finally:
        distributed.shutdown(d)


def _train_run(cfg: TrainConfig, out: str | Path, *, resume: bool, only_folds: tuple[int, ...] | None, log: Log,
               progress: bool, dist_ctx=None) -> dict:
    """Train the folds of a run into ``out``; returns the run's aggregate metrics.

    ``only_folds`` trains just those folds now (a long cross-validation done in sittings); folds
    already finished are always reused. Until every fold is finished, ``metrics.json`` and
    ``report.md`` summarise the finished ones and say so (``"partial"``); ``--resume`` completes them.

    The backbone checkpoint is loaded (:class:`lungsam.runs.CheckpointError` when it is not one) before
    the run folder is created; a folder that cannot be written raises :class:`lungsam.runs.RunFolderError`.
    """
    from ..runs import run_folder_errors

    with run_folder_errors(Path(out)):
        return _train_folds(cfg, RunLayout(out), resume=resume, only_folds=only_folds, log=log, progress=progress,
                            dist_ctx=dist_ctx)


def _train_folds(cfg: TrainConfig, layout: RunLayout, *, resume: bool, only_folds: tuple[int, ...] | None, log: Log,
                 progress: bool, dist_ctx=None) -> dict:
    resolved = resolve(cfg)  # device, precision, preprocessing, weights: what cannot run fails before any work
    t0 = time.perf_counter()
    old = open_run(layout, resume, only_folds, cfg.folds)
    distributed.check_resume_world_size(old, dist_ctx)
    if cfg.lora_rank > 0 and cfg.augment_views > 0:
        raise ArgumentError("--augment works on cached embeddings and --lora-rank trains the encoder; use one of them")
    ckpt, weights_sha256 = resolved.checkpoint, resolved.weights_sha256
    sam, ckpt_record = checked_backbone(cfg.backbone, cfg.encoder_size, ckpt, weights_sha256, log)  # before any folder
    if old is not None:
        refuse_changed_settings(layout, resume_differences(old, cfg, weights_sha256))
    device = resolved.device
    data = load_data(cfg.data, cfg.size, log)
    log(f"data: {len(data.samples)} pairs from {', '.join(cfg.data)} ({len(data.skipped)} skipped)")
    splits = kfold_splits([s.id for s in data.samples], cfg.folds, cfg.seed)
    if old is not None:
        check_resumed_splits(layout, splits)
    run = {
        "format": "lungsam-run/1", "config": {**cfg.to_dict(), "checkpoint": ckpt},
        "weights_sha256": weights_sha256, "checkpoint": ckpt_record, "device": device,
        "n_samples": len(data.samples), "n_skipped": len(data.skipped), "skipped": data.skipped,
        "started": utc_now(), "versions": package_versions(),
    }
    if dist_ctx is not None:
        run["distributed"] = dist_ctx.record()
    start_run(layout, run, old, splits)
    emb, aug = prepare_inputs(sam, cfg, ckpt, data, splits, device, run, log, progress, dist_ctx)
    make = lambda fold, fold_data, fold_layout: SamFoldTrainer(
        cfg, fold, fold_data, fold_layout, sam, emb, device, aug, weights_sha256=weights_sha256, dist_ctx=dist_ctx)
    return train_all_folds(layout, run, splits, only_folds, data.by_id(), cfg, make, report.run_report, t0, log,
                           progress)


def prepare_inputs(sam, cfg: TrainConfig, ckpt: str | None, data: Dataset, splits: list[dict], device: str, run: dict,
                   log: Log, progress: bool, dist_ctx=None) -> tuple[dict[str, np.ndarray], AugmentedViews | None]:
    """What every fold trains on, prepared once: ``{sample id: (C, E, E) float16}`` cached embeddings (empty with
    LoRA, which adds its adapters to the encoder here) and the augmented views; records them in ``run``."""
    t_emb = time.perf_counter()
    lora = cfg.lora_spec()
    if lora is not None:  # the encoder is trained: no cached embeddings
        from ..lora import add_lora

        n_params = sum(p.numel() for p in add_lora(sam.image_encoder, lora))
        run["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets), "parameters": n_params}
        log(f"LoRA: rank {lora.rank} on the encoder's {', '.join(lora.targets)} layers ({n_params} parameters)")
        emb = {}
    else:
        with dist_ctx.rank_zero_first() if dist_ctx is not None else contextlib.nullcontext():
            emb_arr, cache = embed_samples(sam, cfg, ckpt, data.samples, device, progress)
        emb = {s.id: e for s, e in zip(data.samples, emb_arr)}
        run["embedding"] = {"cache_dir": str(cache.directory), "hits": cache.hits, "computed": cache.misses,
                            "seconds": time.perf_counter() - t_emb}
    aug = embed_augmented_views(sam, cfg, ckpt, data.samples, splits, device, log, progress)
    if aug is not None:
        run["augmentation"] = aug.record
    if lora is None:
        sam.image_encoder.to("cpu")  # the decoder trains on cached embeddings only
    return emb, aug
