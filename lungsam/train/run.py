"""Training runs (k folds) and evaluations, writing self-describing artifacts (see :mod:`lungsam.runs`)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..artifacts import atomic_path, package_versions, read_json, utc_now, write_json_atomic, write_text_atomic
from ..backbones import get_backbone, preprocess_for
from ..boundary import boundary_scores
from ..data import Dataset, Sample, dataset_of, kfold_splits, load_dataset, pool
from ..embeddings import EmbeddingCache, weights_fingerprint
from ..errors import ArgumentError, OutputExistsError
from ..metrics import boundary_summary, summarize
from ..postprocess import CleanupSpec
from ..prompts import AUTO_BOX_PROMPT_MODES, learn_prompt
from ..qc import QcCalibration, QcModel, QcResult, calibrate, detection_summary, load_calibration, qc_features
from ..qc_fit import fit_quality_model
from . import distributed, report
from .config import TrainConfig
from .engine import (
    DecoderTrainer,
    EarlyStopping,
    EncoderLoraTrainer,
    binarize,
    choose_threshold_and_cleanup,
    mixed_precision,
    pick_device,
    predict_with_first_pass_box,
    predict_with_iou,
    score,
)

Log = Callable[[str], None]


def load_data(paths: list[str], size: int, log: Log) -> Dataset:
    """Load and pool data sets at working resolution ``size`` (bad pairs are logged and skipped)."""
    return pool([load_dataset(p, size, log=log) for p in paths])


def checkpoint_for(cfg: TrainConfig) -> str | None:
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
    from ..weights import ensure_weights

    return str(ensure_weights(spec.weights))


def checked_backbone(cfg: TrainConfig, ckpt: str | None, sha256: str, log: Log) -> tuple[object, dict]:
    """The backbone with its weights (a clear error when ``ckpt`` is not a checkpoint of it) and the record
    of those weights (path, sha256, official yes/no); warns when they are not the official file."""
    from ..runs import checkpoint_info, checkpoint_warning, load_backbone_checked

    sam = load_backbone_checked(cfg.backbone, ckpt, cfg.encoder_size)
    record = checkpoint_info(cfg.backbone, ckpt, sha256)
    if warning := checkpoint_warning(cfg.backbone, record):
        log(warning)
    return sam, record


def embed_samples(sam, cfg: TrainConfig, ckpt: str | None, samples: list[Sample], device: str,
                  progress: bool = True, fingerprint: str | None = None) -> tuple[np.ndarray, EmbeddingCache]:
    """Cached ``(N, C, E, E)`` float16 embeddings of ``samples``; ``fingerprint`` keys the cache (default:
    the weights file's, see :func:`lungsam.embeddings.weights_fingerprint`; a run whose encoder carries a
    merged adapter passes its own)."""
    spec = preprocess_for(cfg.backbone, cfg.encoder_size)
    cache = EmbeddingCache(cfg.backbone, fingerprint or weights_fingerprint(cfg.backbone, ckpt), spec)
    emb = cache.embed(sam.image_encoder, samples, device=device, batch_size=cfg.embed_batch_size, progress=progress)
    return emb, cache


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
    spec = AugmentSpec()
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
    pick = rng.integers(0, aug.record["views"] + 1, size=len(ids))
    e = np.stack([E[i] if v == 0 else aug.embeddings[sid][v - 1] for i, (sid, v) in enumerate(zip(ids, pick))])
    m = [M[i] if v == 0 else aug.masks[sid][v - 1] for i, (sid, v) in enumerate(zip(ids, pick))]
    return e, m


def _save_weights(state: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    """A trained part's state dict (mask decoder, or the encoder's LoRA adapter) as safetensors, with the run
    config and epoch in its metadata."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)


def _load_adapter(sam, path: Path) -> None:
    from safetensors.torch import load_file

    from ..lora import load_lora_state

    load_lora_state(sam.image_encoder, load_file(str(path)))


def _load_decoder(sam, path: Path) -> None:
    from safetensors.torch import load_file

    sam.mask_decoder.load_state_dict(load_file(str(path)), strict=True)


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


def train_state_weights(st: dict, part: str, older_file: Path) -> dict[str, torch.Tensor]:
    """The ``part`` weights of a loaded ``train_state.pt``; states written before they were kept there
    take them from ``older_file`` (the ``*_last.safetensors`` written beside them)."""
    if "weights" in st:
        return st["weights"][part]
    from safetensors.torch import load_file

    return load_file(str(older_file))


def record_sitting(run: dict, old: dict | None) -> None:
    """On ``--resume``, keep in ``run`` (the new ``run.json``) when the run began and record this sitting:
    ``resumed`` gets its start time, and package versions that changed since the last sitting are kept in
    ``versions_before`` (``{"until": time, **versions}``), so folds trained with other code stay traceable."""
    if old is None:
        return
    now = utc_now()
    run["started"] = old.get("started", run["started"])
    run["resumed"] = [*old.get("resumed", []), now]
    before = list(old.get("versions_before", []))
    if old.get("versions") and old["versions"] != run.get("versions"):
        before.append({"until": now, **old["versions"]})
    if before:
        run["versions_before"] = before


def check_resumed_splits(out: Path, splits: list[dict]) -> None:
    """Refuse to resume a run whose data no longer gives the splits it began with (a pair added, removed or
    skipped since): its finished folds would have tested other images than the folds still to come."""
    p = out / "splits.json"
    if not p.exists():
        return
    before = read_json(p)
    if before != splits:
        n_before = len({i for f in before for part in f.values() for i in part})
        n_now = len({i for f in splits for part in f.values() for i in part})
        raise ArgumentError(f"--resume: the data in {out}'s run gives other splits now ({n_now} images, {n_before} when "
                         "it began): its folds would test different images. Restore the data or start a new --out")


def epochs_wall_s(history: list[dict]) -> float:
    """Wall seconds of a fold's epochs: training, validation and the weight files of each epoch (``epoch_wall_s``;
    epochs recorded before it was kept count their training time ``epoch_s`` only)."""
    return float(sum(h.get("epoch_wall_s", h["epoch_s"]) for h in history))


def _write_history(path: Path, history: list[dict]) -> None:
    s = io.StringIO()
    w = csv.DictWriter(s, fieldnames=["epoch", "train_loss", "val_loss", "val_f1", "val_iou", "epoch_s"])
    w.writeheader()
    for h in history:
        w.writerow({k: h[k] for k in w.fieldnames})
    write_text_atomic(path, s.getvalue())


def train_fold(cfg: TrainConfig, fold: int, split: dict, samples: dict[str, Sample], emb: dict[str, np.ndarray],
               sam, device: str, fold_dir: Path, log: Log, progress: bool = True,
               aug: AugmentedViews | None = None, weights_sha256: str = "", dist_ctx=None) -> dict:
    """Train, select threshold and test one fold; resumable from ``train_state.pt``.

    ``weights_sha256`` (the backbone weights' fingerprint) keys the embedding cache of a LoRA run's
    adapted encoder, combined with the best adapter file, as :func:`lungsam.runs.load_run` does."""
    spec = preprocess_for(cfg.backbone, cfg.encoder_size)
    fold_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(fold_dir / "split.json", split)
    part = {k: [samples[i] for i in split[k]] for k in ("train", "val", "test")}
    prompt = learn_prompt([s.mask for s in part["train"]], cfg.prompt, cfg.points_per_lung)
    write_json_atomic(fold_dir / "prompt.json", prompt.to_dict())
    lora = cfg.lora_spec() is not None
    # training inputs: cached embeddings, or (LoRA: the encoder changes) the working images themselves
    X = {k: np.stack([s.image for s in v]) if lora else np.stack([emb[s.id] for s in v]) for k, v in part.items()}
    M = {k: [s.mask for s in v] for k, v in part.items()}

    initial = {k: v.clone() for k, v in sam.mask_decoder.state_dict().items()}
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, box_jitter=cfg.box_jitter,
              device=device, amp=cfg.amp, cpu_bf16=cfg.cpu_bf16, seed=cfg.seed + fold)
    if lora:
        from ..lora import encoder_fingerprint, load_lora_state, lora_state

        initial_adapter = lora_state(sam.image_encoder)
        trainer = EncoderLoraTrainer(sam, spec, cfg.size, prompt, **kw,
                                     lora_params=[p for n, p in sam.image_encoder.named_parameters() if "lora_" in n])
    else:
        trainer = DecoderTrainer(sam, spec, cfg.size, prompt, **kw)
    distributed.attach(trainer, dist_ctx, cfg.seed + fold)  # torchrun: data-parallel steps (no-op otherwise)
    state_path = fold_dir / "train_state.pt"
    history: list[dict] = []
    stop, start = EarlyStopping(cfg.patience, cfg.min_delta), 1
    wall_before = 0.0  # this fold's wall time in earlier sittings (a killed run resumed)
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        sam.mask_decoder.load_state_dict(train_state_weights(st, "decoder", fold_dir / "decoder_last.safetensors"),
                                         strict=True)
        if lora:
            load_lora_state(sam.image_encoder,
                            train_state_weights(st, "encoder_lora", fold_dir / "encoder_lora_last.safetensors"))
        trainer.optimizer.load_state_dict(st["optimizer"])
        trainer.restore_loop_state(st)
        history, start, wall_before = st["history"], st["epoch"] + 1, st.get("fold_wall_s", 0.0)
        stop = EarlyStopping.restore(cfg.patience, cfg.min_delta, st)
        log(f"fold {fold}: resuming after epoch {st['epoch']} (best val F1 {stop.best_f1:.4f} at epoch "
            f"{stop.best_epoch})")

    t_fold = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(range(start, cfg.epochs + 1), desc=f"fold {fold}", unit="epoch", disable=not progress)
    for epoch in bar:
        if stop.should_stop(epoch):
            log(f"fold {fold}: early stop after epoch {epoch - 1} (val F1 rose less than {cfg.min_delta:g} "
                f"in {cfg.patience} epochs; best {stop.best_f1:.4f} at epoch {stop.best_epoch})")
            break
        t_epoch = time.perf_counter()
        e_train, m_train = epoch_views(trainer.rng, split["train"], X["train"], M["train"], aug)
        train_loss, secs = trainer.train_epoch(e_train, m_train)
        val = trainer.validate(X["val"], M["val"])
        history.append({"epoch": epoch, "train_loss": train_loss, "epoch_s": secs, **val})
        meta = {"format": "lungsam-decoder/1", "config": json.dumps(cfg.to_dict()), "fold": str(fold),
                "epoch": str(epoch), "val_f1": f"{val['val_f1']:.6f}", "backbone": cfg.backbone}
        weights = {"decoder": sam.mask_decoder.state_dict()}
        if lora:
            weights["encoder_lora"] = lora_state(sam.image_encoder)
        best = stop.update(epoch, val["val_f1"])
        for name, sd in weights.items():  # files <part>_best / <part>_last.safetensors
            if best:
                _save_weights(sd, fold_dir / f"{name}_best.safetensors", meta)
            _save_weights(sd, fold_dir / f"{name}_last.safetensors", meta)
        history[-1]["epoch_wall_s"] = time.perf_counter() - t_epoch  # training, validation and weight files
        save_train_state(state_path, trainer.optimizer, {"epoch": epoch, "history": history, **stop.marks(),
                                                         "fold_wall_s": wall_before + time.perf_counter() - t_fold,
                                                         **trainer.loop_state()}, weights)
        bar.set_postfix(loss=f"{train_loss:.4f}", val_f1=f"{val['val_f1']:.4f}", best=stop.best_epoch)
    bar.close()
    _write_history(fold_dir / "history.csv", history)
    title = f"{cfg.backbone} / {cfg.prompt} / fold {fold}"
    report.learning_curve(history, fold_dir / "learning_curve.png", title)

    _load_decoder(sam, fold_dir / "decoder_best.safetensors")
    if lora:  # embeddings of the adapted encoder, through the cache a later eval of this run reads
        best_adapter = fold_dir / "encoder_lora_best.safetensors"
        _load_adapter(sam, best_adapter)
        cache = EmbeddingCache(cfg.backbone, encoder_fingerprint(weights_sha256, best_adapter), spec)
        E = {k: cache.embed(sam.image_encoder, part[k], device=device, batch_size=cfg.embed_batch_size,
                            progress=False) for k in ("val", "test")}
    else:
        E = X
    val_probs, val_iou = predict_with_iou(sam, E["val"], M["val"], prompt, spec, cfg.size, device, cfg.batch_size)
    choice = choose_threshold_and_cleanup(val_probs, M["val"], cfg.thresholds)
    thr, cleanup = choice.threshold, choice.cleanup
    if choice.edge_warning():
        log(f"fold {fold}: {choice.edge_warning()}")
    report.threshold_curve(choice.sweep, thr, fold_dir / "threshold_curve.png", title, cleanup.enabled)
    vf1, viou = score(val_probs, M["val"], thr, cleanup)
    qc_cal = calibrate_quality(val_probs, val_iou, thr, cleanup, f"fold {fold} validation images", M["val"],
                               M["train"], [s.image for s in part["val"]])
    test_probs, test_iou = predict_with_iou(sam, E["test"], M["test"], prompt, spec, cfg.size, device, cfg.batch_size)
    test_masks = binarize(test_probs, thr, cleanup)
    tf1, tiou = score(test_probs, M["test"], thr, cleanup)
    thd, tasd = boundary_scores(test_masks, M["test"])
    test_qc = assess_quality(qc_cal, test_probs, test_iou, thr, cleanup, [s.image for s in part["test"]])
    per_image = [{"id": s.id, "f1": a, "iou": b, "hd95": h, "asd": d, "qc": q.to_dict() if q else None}
                 for s, a, b, h, d, q in zip(part["test"], tf1, tiou, thd, tasd, test_qc)]
    order = np.argsort(tf1)
    report.overlays([{"label": f"{lab}: {part['test'][i].id.split('/')[-1]} F1 {tf1[i]:.3f}",
                      "image": part["test"][i].image, "gt": M["test"][i], "pred": test_masks[i]}
                     for lab, i in (("best", order[-1]), ("worst", order[0]))], fold_dir / "overlays.png", title)
    metrics = {
        "fold": fold, **choice.record(),
        "n": {k: len(v) for k, v in part.items()},
        "best_epoch": stop.best_epoch, "epochs_run": len(history),
        "train_time_s": sum(h["epoch_s"] for h in history), "epochs_wall_s": epochs_wall_s(history),
        "fold_wall_s": wall_before + time.perf_counter() - t_fold,
        "val": {"f1": summarize(vf1), "iou": summarize(viou)},
        "test": {"f1": summarize(tf1), "iou": summarize(tiou), **boundary_summary(thd, tasd)},
        "boundary_unit": "px (working frame)",
        "qc": qc_cal.to_dict() if qc_cal is not None else None,
        "test_qc_detection": detection_summary(test_qc, tf1) if qc_cal is not None else None,
        "prompt_uses_ground_truth": prompt.needs_ground_truth,
        "per_image": per_image,
    }
    write_json_atomic(fold_dir / "metrics.json", metrics)
    sam.mask_decoder.load_state_dict(initial)  # next fold starts from the pretrained decoder
    if lora:
        load_lora_state(sam.image_encoder, initial_adapter)
    log(f"fold {fold}: threshold {thr:.2f}{', clean-up on' if cleanup.enabled else ''}, val F1 {np.mean(vf1):.4f}, test F1 {np.mean(tf1):.4f} ± {np.std(tf1):.4f}, "
        f"IoU {np.mean(tiou):.4f}, HD95 {metrics['test']['hd95']['mean']:.2f} px")
    return metrics


def calibrate_quality(probs: np.ndarray, iou: np.ndarray, threshold: float, cleanup: CleanupSpec,
                      source: str, masks: list[np.ndarray] | None = None, train_masks: list[np.ndarray] | None = None,
                      images: list[np.ndarray] | None = None) -> QcModel | QcCalibration | None:
    """The quality flag from validation probabilities ``(N, S, S)`` and predicted IoU ``(N,)``: with their
    ground-truth ``masks``, the ``train_masks`` and the working-frame ``images`` the calibrated model
    (:func:`lungsam.qc_fit.fit_quality_model`), else the normal ranges (:func:`lungsam.qc.calibrate`); ``None``
    with fewer than 3 validation images (then no result carries a flag)."""
    if len(probs) < 3:
        return None
    if masks is not None and train_masks is not None:
        try:
            return fit_quality_model(probs, iou, masks, train_masks, threshold, cleanup, source, images=images)
        except ValueError as e:  # one class only (a model whose every mask is bad): the ranges, saying why
            source = f"{source} (normal ranges: {e})"
    return calibrate([qc_features(p, threshold, float(i), cleanup) for p, i in zip(probs, iou)], source=source)


def assess_quality(cal: QcModel | QcCalibration | None, probs: np.ndarray, iou: np.ndarray, threshold: float,
                   cleanup: CleanupSpec, images: list[np.ndarray] | None = None) -> list[QcResult | None]:
    """The quality flag of each image (``assess_map``; ``images`` the working-frame images ``(S, S, 3)``);
    ``None`` each without a calibration."""
    if cal is None:
        return [None] * len(probs)
    ims = images if images is not None else [None] * len(probs)
    return [cal.assess_map(p, threshold, float(i), cleanup, image=im) for p, i, im in zip(probs, iou, ims)]


def run_folds(out: Path, splits: list[dict], only_folds: tuple[int, ...] | None, log: Log,
              train: Callable[[int, dict, Path], dict]) -> list[dict]:
    """Fold metrics in order: a finished fold (``folds/fold_i/metrics.json``) is reused, the others are
    trained with ``train(i, split, fold_dir)`` unless ``only_folds`` leaves them for later."""
    folds = []
    for i, split in enumerate(splits):
        fd = out / "folds" / f"fold_{i}"
        if (fd / "metrics.json").exists():
            log(f"fold {i}: already finished, reusing")
            folds.append(read_json(fd / "metrics.json"))
        elif only_folds is None or i in only_folds:
            folds.append(train(i, split, fd))
    return folds


def per_dataset(folds: list[dict]) -> dict[str, dict]:
    """Pooled test F1 / IoU per source data set (``{name: {"f1", "iou"}}``), for runs on pooled sets."""
    groups: dict[str, list[dict]] = {}
    for f in folds:
        for r in f["per_image"]:
            groups.setdefault(dataset_of(r["id"]), []).append(r)
    return {k: {"f1": summarize([r["f1"] for r in v]), "iou": summarize([r["iou"] for r in v])}
            for k, v in sorted(groups.items())}


def aggregate_folds(folds: list[dict]) -> dict:
    """k-fold summary: mean ± std of fold means, pooled per-image statistics, and the pooled statistics
    per source data set."""
    pooled_f1 = [r["f1"] for f in folds for r in f["per_image"]]
    pooled_iou = [r["iou"] for f in folds for r in f["per_image"]]
    boundary = {}
    if all("hd95" in r for f in folds for r in f["per_image"]):  # folds scored before HD95 was kept have none
        b = boundary_summary([r["hd95"] for f in folds for r in f["per_image"]],
                             [r["asd"] for f in folds for r in f["per_image"]])
        boundary = {"test_hd95_pooled": b["hd95"], "test_asd_pooled": b["asd"]}
    return {
        "test_by_dataset": per_dataset(folds),
        "test_f1_across_folds": summarize([f["test"]["f1"]["mean"] for f in folds]),
        "test_iou_across_folds": summarize([f["test"]["iou"]["mean"] for f in folds]),
        "test_f1_pooled": summarize(pooled_f1),
        "test_iou_pooled": summarize(pooled_iou),
        **boundary,
        "thresholds": [f["threshold"] for f in folds],
        "threshold_edges": [f.get("threshold_edge") for f in folds],
        "postprocess_enabled": [bool((f.get("postprocess") or {}).get("enabled", False)) for f in folds],
        "prompt_uses_ground_truth": folds[0]["prompt_uses_ground_truth"],
    }


def resume_differences(old_run: dict, cfg: TrainConfig, weights_sha256: str) -> list[str]:
    """What stops ``cfg`` from continuing the run recorded in ``old_run`` (its ``run.json``), as
    ``"name: old -> new"`` lines; empty when it may resume. The weights are compared by sha256, so the
    same checkpoint given by another path (relative, moved, the download cache) resumes."""
    before = TrainConfig.from_dict(old_run["config"]).comparable()
    now = cfg.comparable()
    differ = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
              if k != "checkpoint" and before.get(k) != now.get(k)]
    if old_run.get("weights_sha256") != weights_sha256:
        differ.append(f"weights sha256: {str(old_run.get('weights_sha256'))[:12]}… -> {weights_sha256[:12]}…")
    return differ


def train_run(cfg: TrainConfig, out: str | Path, *, resume: bool = False, only_folds: tuple[int, ...] | None = None,
              log: Log = print, progress: bool = True) -> dict:
    """:func:`_train_run`, data-parallel under torchrun (``lungsam.train.distributed``; rank 0 writes ``out``)."""
    d = distributed.from_env()
    if d is None:
        return _train_run(cfg, out, resume=resume, only_folds=only_folds, log=log, progress=progress)
    try:
        with d.output_dir(Path(out)) as here:
            return _train_run(cfg, here, resume=resume, only_folds=only_folds, log=d.log(log),
                              progress=progress and d.is_writer, dist_ctx=d)
    finally:
        distributed.shutdown(d)


def _train_run(cfg: TrainConfig, out: str | Path, *, resume: bool = False, only_folds: tuple[int, ...] | None = None,
               log: Log = print, progress: bool = True, dist_ctx=None) -> dict:
    """Train the folds of a run into ``out``; returns the run's aggregate metrics.

    ``only_folds`` trains just those folds now (a long cross-validation done in sittings); folds
    already finished are always reused. Until every fold is finished, ``metrics.json`` and
    ``report.md`` summarise the finished ones and say so (``"partial"``); ``--resume`` completes them.

    The backbone checkpoint is loaded (:class:`lungsam.runs.CheckpointError` when it is not one) before
    the run folder is created; a folder that cannot be written raises :class:`lungsam.runs.RunFolderError`.
    """
    from ..runs import run_folder_errors

    with run_folder_errors(Path(out)):
        return _train_folds(cfg, Path(out), resume=resume, only_folds=only_folds, log=log, progress=progress,
                            dist_ctx=dist_ctx)


def _train_folds(cfg: TrainConfig, out: Path, *, resume: bool, only_folds: tuple[int, ...] | None, log: Log,
                 progress: bool, dist_ctx=None) -> dict:
    preprocess_for(cfg.backbone, cfg.encoder_size)  # an encoder size that does not fit fails before any work
    mixed_precision(pick_device(cfg.device), cfg.amp, cfg.cpu_bf16)  # so does --cpu-bf16 where it cannot run
    if only_folds is not None:
        bad = sorted(set(only_folds) - set(range(cfg.folds)))
        if bad:
            raise ArgumentError(f"--only-fold {bad[0]}: the run has folds 0-{cfg.folds - 1}")
    t0 = time.perf_counter()
    old = None
    if (out / "run.json").exists():
        if not resume:
            raise OutputExistsError(f"{out} already holds a run; use --resume to continue it or choose another --out")
        old = read_json(out / "run.json")
    distributed.check_resume_world_size(old, dist_ctx)
    if cfg.lora_rank > 0 and cfg.augment_views > 0:
        raise ArgumentError("--augment works on cached embeddings and --lora-rank trains the encoder; use one of them")
    ckpt = checkpoint_for(cfg)
    weights_sha256 = weights_fingerprint(cfg.backbone, ckpt)
    sam, ckpt_record = checked_backbone(cfg, ckpt, weights_sha256, log)  # before the run folder exists
    if old is not None:
        differ = resume_differences(old, cfg, weights_sha256)
        if differ:
            raise ArgumentError(f"--resume: the settings differ from the run in {out} ({'; '.join(differ)}); "
                             "start a new --out instead")
    device = pick_device(cfg.device)
    data = load_data(cfg.data, cfg.size, log)
    log(f"data: {len(data.samples)} pairs from {', '.join(cfg.data)} ({len(data.skipped)} skipped)")
    splits = kfold_splits([s.id for s in data.samples], cfg.folds, cfg.seed)
    if old is not None:
        check_resumed_splits(out, splits)
    run = {
        "format": "lungsam-run/1", "config": {**cfg.to_dict(), "checkpoint": ckpt},
        "weights_sha256": weights_sha256, "checkpoint": ckpt_record, "device": device,
        "n_samples": len(data.samples), "n_skipped": len(data.skipped), "skipped": data.skipped,
        "started": utc_now(), "versions": package_versions(),
    }
    if dist_ctx is not None:
        run["distributed"] = dist_ctx.record()
    record_sitting(run, old)
    write_json_atomic(out / "run.json", run)
    write_json_atomic(out / "splits.json", splits)
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
    samples = data.by_id()
    folds = run_folds(out, splits, only_folds, log, lambda i, split, fd: train_fold(
        cfg, i, split, samples, emb, sam, device, fd, log, progress, aug, weights_sha256=run["weights_sha256"],
        dist_ctx=dist_ctx))
    agg = aggregate_folds(folds)
    done = {f["fold"] for f in folds}
    pending = [i for i in range(len(splits)) if i not in done]
    if pending:
        run.update({"partial": {"folds_finished": [f["fold"] for f in folds], "folds_pending": pending},
                    "wall_time_s": time.perf_counter() - t0})
        log(f"folds {', '.join(map(str, pending))} not trained yet: --resume (without --only-fold) trains them")
    else:
        run.pop("partial", None)
        run.update({"finished": utc_now(), "wall_time_s": time.perf_counter() - t0})
    write_json_atomic(out / "run.json", run)
    summary = {"aggregate": agg, "folds": [{k: v for k, v in f.items() if k != "per_image"} for f in folds]}
    if pending:
        summary["partial"] = run["partial"]
    write_json_atomic(out / "metrics.json", summary)
    write_text_atomic(out / "report.md", report.run_report(run, folds, agg))
    return summary


EVAL_SPLITS = ("all", "test")


@dataclass
class ScoredPart:
    """One model scored on some images: ``probs (n, S, S)`` float32, per-image F1/IoU, and its record."""

    samples: list[Sample]
    probs: np.ndarray
    f1: list[float]
    iou: list[float]
    record: dict
    cleanup: CleanupSpec | None = None
    qc: list[QcResult | None] | None = None

    def masks(self) -> list[np.ndarray]:
        """The scored masks ``(S, S)`` bool (threshold, then the clean-up when enabled)."""
        return binarize(self.probs, self.record["threshold"], self.cleanup)


def score_model(sam, spec, prompt, threshold: float, cfg: TrainConfig, ckpt: str | None, fingerprint: str | None,
                samples: list[Sample], device: str, progress: bool, box_from_first_pass: bool = False,
                cleanup: CleanupSpec | None = None) -> tuple[np.ndarray, list[float], list[float], dict]:
    """Probabilities ``(n, S, S)`` (S = ``cfg.size``), per-image F1/IoU of one model on ``samples``, and
    the record's prompt fields (``prompt_uses_ground_truth``, ``box_source``, ``first_pass_empty``) and, for
    one-pass prompts, the decoder's predicted IoU ``pred_iou`` ``(n,)`` (popped by the caller).

    ``box_from_first_pass``: the box comes from the model's own first mask, not from the ground truth
    (:func:`lungsam.train.engine.predict_with_first_pass_box`). ``cleanup``: the masks are cleaned before scoring
    (:mod:`lungsam.postprocess`)."""
    emb, _ = embed_samples(sam, cfg, ckpt, samples, device, progress, fingerprint=fingerprint)
    masks = [s.mask for s in samples]
    if box_from_first_pass:
        probs, kept = predict_with_first_pass_box(sam.to(device), emb, prompt, spec, cfg.size, device, threshold)
        notes = {"prompt_uses_ground_truth": False, "box_source": "first pass (learned prompt with the mean-mask box)",
                 "first_pass_empty": kept}
    else:
        probs, pred_iou = predict_with_iou(sam.to(device), emb, masks, prompt, spec, cfg.size, device)
        notes = {"pred_iou": pred_iou, "prompt_uses_ground_truth": prompt.needs_ground_truth,
                 "box_source": ("ground truth" if prompt.needs_ground_truth else
                                "mean training mask" if prompt.mode in AUTO_BOX_PROMPT_MODES else None),
                 "first_pass_empty": None}
    f1, iou = score(probs, masks, threshold, cleanup)
    return probs, f1, iou, notes


def held_out_samples(test_ids: list[str], by_id: dict[str, Sample], what: str) -> list[Sample]:
    """The samples of ``test_ids`` found in the loaded data. A run on pooled sets may be scored on some of
    its sets (the test images of the sets not given are left out); an image missing from a set that *was*
    given is an error (wrong folder or changed data)."""
    from ..runs import RunError

    given = {dataset_of(i) for i in by_id}
    missing = [i for i in test_ids if i not in by_id and dataset_of(i) in given]
    if missing:
        raise RunError(f"{what}: {len(missing)} of its test images are not in --data (e.g. {missing[0]}; ids are "
                       "<data set folder>/<stem>)")
    samples = [by_id[i] for i in test_ids if i in by_id]
    if not samples:
        raise RunError(f"{what}: none of its test images is in --data (its sets: "
                       f"{', '.join(sorted({dataset_of(i) for i in test_ids}))})")
    return samples


def _run_parts(run_dir: str, fold: int | None, checkpoint: str | None, split: str, threshold: float | None,
               size: int, data: Dataset, device: str, progress: bool,
               box_from_first_pass: bool = False) -> tuple[list[ScoredPart], str]:
    """Score a run: its chosen fold on every image (``split="all"``), or each finished fold (or the
    given one) on its own held-out test images (``split="test"``, each image scored once)."""
    from ..runs import RunError, finished_fold_dirs, load_run

    if split == "test" and fold is None:
        folds = [int(d.name.split("_")[1]) for d in finished_fold_dirs(Path(run_dir))]
        if not folds:
            raise RunError(f"{run_dir}: no finished fold (folds/fold_*/metrics.json); did training complete?")
    else:
        folds = [fold]
    by_id = data.by_id()
    parts = []
    for f in folds:
        rm = load_run(run_dir, f, checkpoint)
        if split == "test":
            samples = held_out_samples(rm.split["test"], by_id, f"{run_dir} fold {rm.fold}")
        else:
            samples = data.samples
        cfg = TrainConfig(backbone=rm.backbone, checkpoint=rm.run["config"].get("checkpoint"), size=size,
                          encoder_size=rm.run["config"].get("encoder_size"))
        thr, thr_src = (threshold, "given") if threshold is not None else (rm.threshold, "chosen on the fold's validation split")
        cleanup = CleanupSpec.from_dict(rm.metrics.get("postprocess"))
        probs, f1, iou, notes = score_model(rm.sam, rm.spec, rm.prompt, thr, cfg, cfg.checkpoint,
                                            rm.encoder_fingerprint, samples, device, progress, box_from_first_pass,
                                            cleanup)
        pred_iou = notes.pop("pred_iou", None)
        cal = load_calibration(rm.metrics.get("qc"))
        qc = (assess_quality(cal, probs, pred_iou, thr, cleanup, [s.image for s in samples]) if pred_iou is not None
              else [None] * len(samples))
        parts.append(ScoredPart(samples, probs, f1, iou, {
            "fold": rm.fold, "n": len(samples), "threshold": thr, "threshold_source": thr_src,
            "postprocess": cleanup.to_dict(),
            "prompt": rm.prompt.mode, **notes, "learned_prompt": rm.prompt.to_dict(), "checkpoint": rm.checkpoint,
            "f1": summarize(f1), "iou": summarize(iou)},
            cleanup, qc))
    what = "each on its own held-out test images" if split == "test" else "on every image"
    name = (f"run {run_dir}, fold{'s' if len(parts) > 1 else ''} {', '.join(str(p.record['fold']) for p in parts)} "
            f"({rm.backbone}, {rm.prompt.mode}) {what}")
    return parts, name


def evaluate(*, out: str | Path, data_paths: list[str], run_dir: str | None = None, fold: int | None = None,
             split: str = "all", backbone: str | None = None, checkpoint: str | None = None, prompt_mode: str = "points",
             points_per_lung: int = 3, prompt_from: list[str] | None = None, threshold: float | None = None,
             size: int | None = None, encoder_size: int | None = None, box_from_first_pass: bool = False,
             device: str = "auto", log: Log = print, progress: bool = True) -> dict:
    """Score a run or a zero-shot backbone on data sets; writes metrics.json, report.md and overlays.png.

    Args:
        split: for a run, ``all`` scores one fold (``fold``, default the best on validation) on every
            image of ``data_paths``; ``test`` scores each finished fold (or ``fold``) on its own held-out
            test images only (leak-free; with k folds every image once).
        size: working resolution S at which images are fed and masks scored (default: the run's, or
            256 zero-shot); larger than the run's, it measures the masks at a higher resolution.
        encoder_size: zero-shot only: the image encoder's input side (default: the backbone's native one);
            a run's encoder size comes from the run.
        box_from_first_pass: for a model prompted with a box, take each image's box from the model's own
            first mask (learned prompt + mean-mask box) instead of the ground truth or the mean mask.
    Zero-shot prompts come from the mean mask of ``prompt_from`` data sets (default: the evaluated
    data itself, which the report states, since it uses the evaluated set's annotations).
    """
    if split not in EVAL_SPLITS:
        raise ArgumentError(f"unknown split {split!r}; choose from {', '.join(EVAL_SPLITS)}")
    device = pick_device(device)
    trained_size = None
    if run_dir:
        from ..runs import RunError

        run_json = Path(run_dir) / "run.json"
        if not run_json.exists():
            raise RunError(f"{run_dir}: not a lungsam run (no run.json)")
        if encoder_size is not None:
            raise ArgumentError("--encoder-size is for zero-shot evaluation; a run is scored at its own encoder size")
        run_cfg = read_json(run_json)["config"]
        trained_size, encoder_size = int(run_cfg["size"]), run_cfg.get("encoder_size")
        size = size or trained_size
        data = load_data(data_paths, size, log)
        parts, name = _run_parts(run_dir, fold, checkpoint, split, threshold, size, data, device, progress,
                                 box_from_first_pass)
        from ..runs import checkpoint_warning

        if warning := checkpoint_warning(run_cfg["backbone"], parts[0].record["checkpoint"]):
            log(warning)
    else:
        if backbone is None:
            raise ArgumentError("give a RUN or --backbone for zero-shot evaluation")
        if split != "all":
            raise ArgumentError("--split test needs a RUN (zero-shot has no held-out split)")
        size = size or 256
        cfg = TrainConfig(backbone=backbone, checkpoint=checkpoint, size=size, encoder_size=encoder_size)
        spec = preprocess_for(backbone, encoder_size)  # an encoder size that does not fit fails before any work
        ckpt = checkpoint_for(cfg)
        sam, ckpt_record = checked_backbone(cfg, ckpt, weights_fingerprint(backbone, ckpt), log)
        src = load_data(prompt_from or data_paths, size, log)
        prompt = learn_prompt([s.mask for s in src.samples], prompt_mode, points_per_lung)
        thr, thr_src = (threshold, "given") if threshold is not None else (0.5, "SAM default (logit 0)")
        enc = f", encoder input {encoder_size}" if encoder_size else ""
        name = f"zero-shot {backbone} ({prompt_mode}; prompt from {', '.join(prompt_from or data_paths)}{enc})"
        data = load_data(data_paths, size, log)
        probs, f1, iou, notes = score_model(sam, spec, prompt, thr, cfg, ckpt, None, data.samples, device, progress,
                                            box_from_first_pass)
        notes.pop("pred_iou", None)
        parts = [ScoredPart(data.samples, probs, f1, iou, {
            "fold": None, "n": len(data.samples), "threshold": thr, "threshold_source": thr_src,
            "postprocess": CleanupSpec().to_dict(), "prompt": prompt.mode,
            **notes, "learned_prompt": prompt.to_dict(), "checkpoint": ckpt_record,
            "f1": summarize(f1), "iou": summarize(iou)})]
    f1 = [x for p in parts for x in p.f1]
    iou = [x for p in parts for x in p.iou]
    pred = [m for p in parts for m in p.masks()]
    hd95, asd = boundary_scores(pred, [s.mask for p in parts for s in p.samples])
    qc = [q for p in parts for q in (p.qc or [None] * len(p.samples))]
    first = parts[0].record
    result = {
        "model": name, "data": data_paths, "split": split, "n": len(f1), "n_skipped": len(data.skipped),
        "skipped": data.skipped, "size": size, "trained_size": trained_size, "encoder_size": encoder_size,
        "prompt": first["prompt"],
        "prompt_uses_ground_truth": first["prompt_uses_ground_truth"], "box_source": first["box_source"],
        "first_pass_empty": (sum(p.record["first_pass_empty"] for p in parts) if box_from_first_pass else None),
        "threshold": first["threshold"] if len(parts) == 1 else None, "threshold_source": first["threshold_source"],
        "learned_prompt": first["learned_prompt"] if len(parts) == 1 else None,
        "checkpoint": first["checkpoint"],  # backbone weights: path, sha256, official (yes/no/none pinned)
        "parts": [p.record for p in parts], "f1": summarize(f1), "iou": summarize(iou),
        **boundary_summary(hd95, asd), "boundary_unit": f"px ({size}x{size} frame)",
        "qc_detection": detection_summary(qc, f1) if all(q is not None for q in qc) else None,
        "per_image": [{**r, "hd95": h, "asd": d, "qc": q.to_dict(details=True) if q else None} for r, h, d, q in zip(
            ({"id": s.id, "fold": p.record["fold"], "f1": a, "iou": b} for p in parts
             for s, a, b in zip(p.samples, p.f1, p.iou)), hd95, asd, qc)],
        "created": utc_now(), "versions": package_versions(),
    }
    out = Path(out)
    from ..runs import run_folder_errors

    with run_folder_errors(out, "the evaluation folder"):
        write_json_atomic(out / "metrics.json", result)
        write_text_atomic(out / "report.md", report.eval_report(result))
        flat = [(p, i) for p in parts for i in range(len(p.samples))]
        order = np.argsort(f1)
        report.overlays([{"label": f"{lab}: {p.samples[i].id.split('/')[-1]} F1 {p.f1[i]:.3f}",
                          "image": p.samples[i].image, "gt": p.samples[i].mask, "pred": pred[j]}
                         for lab, j in (("best", order[-1]), ("worst", order[0])) for p, i in [flat[j]]],
                        out / "overlays.png", name)
    return result
