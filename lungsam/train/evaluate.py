"""``lungsam eval``: a run (each fold on its held-out test images, or one fold on every image) or a zero-shot
backbone scored on data sets; writes the evaluation folder's ``metrics.json``, ``report.md`` and ``overlays.png``
(named by :class:`lungsam.layout.EvalLayout`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts import package_versions, read_json, utc_now, write_json_atomic, write_text_atomic
from ..backbones import preprocess_for
from ..boundary import boundary_scores
from ..data import Dataset, Sample, dataset_of
from ..embeddings import weights_fingerprint
from ..errors import ArgumentError
from ..layout import EvalLayout, FoldLayout, RunLayout
from ..metrics import boundary_summary, summarize
from ..postprocess import CleanupSpec
from ..prompts import AUTO_BOX_PROMPT_MODES, learn_prompt
from ..qc import QcResult, detection_summary, load_calibration
from ..samples import checked_backbone, checkpoint_for, embed_samples, load_data
from . import report
from .config import TrainConfig
from .engine import binarize, pick_device, predict_with_first_pass_box, predict_with_iou, score
from .folds import assess_quality, prompt_jitter_of
from .redecode import encoder_config
from .unet import RUN_FORMAT as UNET_RUN_FORMAT

Log = Callable[[str], None]
logger = logging.getLogger(__name__)
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
                cleanup: CleanupSpec | None = None, jitter: tuple[float, tuple[str, ...]] | None = None
                ) -> tuple[np.ndarray, list[float], list[float], dict]:
    """Probabilities ``(n, S, S)`` (S = ``cfg.size``), per-image F1/IoU of one model on ``samples``, and
    the record's prompt fields (``prompt_uses_ground_truth``, ``box_source``, ``first_pass_empty``) and, for
    one-pass prompts, the decoder's predicted IoU ``pred_iou`` ``(n,)`` and, given ``jitter`` (``(shift, variant
    names)`` of a calibration's term), the prompt variants ``prompt_jitter``
    (:class:`lungsam.train.folds.PromptJitter`; both popped by the caller).

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
        if jitter is not None:
            notes["prompt_jitter"] = prompt_jitter_of(sam, emb, masks, prompt, spec, cfg.size, device, *jitter)
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


def _folds_to_score(run_dir: str, fold: int | None, split: str) -> list[int | None]:
    """``[fold]`` (``None``: the best on validation), or with ``split="test"`` and no fold every finished fold."""
    from ..runs import RunError

    if split != "test" or fold is not None:
        return [fold]
    folds = [f.index for f in RunLayout(run_dir).existing_folds() if f.metrics_json.exists()]
    if not folds:
        raise RunError(f"{run_dir}: no finished fold (folds/fold_*/metrics.json); did training complete?")
    return folds


def _score_run_fold(rm, samples: list[Sample], threshold: float | None, size: int, device: str, progress: bool,
                    box_from_first_pass: bool) -> ScoredPart:
    """One fold of a run (:class:`lungsam.runs.RunModel`) scored on ``samples`` at working size ``size``."""
    cfg = encoder_config(rm, size)
    thr, thr_src = ((threshold, "given") if threshold is not None
                    else (rm.threshold, "chosen on the fold's validation split"))
    cleanup = CleanupSpec.from_dict(rm.metrics.get("postprocess"))
    cal = load_calibration(rm.metrics.get("qc"))
    term = getattr(cal, "jitter", None)
    probs, f1, iou, notes = score_model(rm.sam, rm.spec, rm.prompt, thr, cfg, cfg.checkpoint, rm.encoder_fingerprint,
                                        samples, device, progress, box_from_first_pass, cleanup,
                                        jitter=None if term is None else (term.shift, term.variants))
    pred_iou = notes.pop("pred_iou", None)
    jitter = notes.pop("prompt_jitter", None)
    qc = (assess_quality(cal, probs, pred_iou, thr, cleanup, [s.image for s in samples], jitter)
          if pred_iou is not None else [None] * len(samples))
    return ScoredPart(samples, probs, f1, iou, {
        "fold": rm.fold, "n": len(samples), "threshold": thr, "threshold_source": thr_src,
        "postprocess": cleanup.to_dict(),
        "prompt": rm.prompt.mode, **notes, "learned_prompt": rm.prompt.to_dict(), "checkpoint": rm.checkpoint,
        "f1": summarize(f1), "iou": summarize(iou)},
        cleanup, qc)


def _run_parts(run_dir: str, fold: int | None, checkpoint: str | None, split: str, threshold: float | None,
               size: int, data: Dataset, device: str, progress: bool,
               box_from_first_pass: bool = False) -> tuple[list[ScoredPart], str]:
    """Score a run: its chosen fold on every image (``split="all"``), or each finished fold (or the
    given one) on its own held-out test images (``split="test"``, each image scored once)."""
    from ..runs import load_run

    by_id = data.by_id()
    parts = []
    for f in _folds_to_score(run_dir, fold, split):
        rm = load_run(run_dir, f, checkpoint)
        samples = (held_out_samples(rm.split["test"], by_id, f"{run_dir} fold {rm.fold}") if split == "test"
                   else data.samples)
        parts.append(_score_run_fold(rm, samples, threshold, size, device, progress, box_from_first_pass))
    what = "each on its own held-out test images" if split == "test" else "on every image"
    name = (f"run {run_dir}, fold{'s' if len(parts) > 1 else ''} {', '.join(str(p.record['fold']) for p in parts)} "
            f"({rm.backbone}, {rm.prompt.mode}) {what}")
    return parts, name


def _score_unet_fold(fd: FoldLayout, samples: list[Sample], threshold: float | None, device: str) -> ScoredPart:
    """One finished fold ``fd`` of a U-Net baseline run (``lungsam train-unet``) on ``samples``: no prompt, no
    clean-up (the baseline chose none), no quality flag (no predicted IoU)."""
    from ..artifacts import sha256_file
    from .unet import load_unet, predict_unet

    metrics = read_json(fd.metrics_json)
    weights = fd.weights("unet", "best")
    net, _ = load_unet(weights, device)
    thr, thr_src = ((threshold, "given") if threshold is not None
                    else (float(metrics["threshold"]), "chosen on the fold's validation split"))
    probs = predict_unet(net, np.stack([s.image for s in samples]), device)
    f1, iou = score(probs, [s.mask for s in samples], thr, None)
    return ScoredPart(samples, probs, f1, iou, {
        "fold": fd.index, "n": len(samples), "threshold": thr, "threshold_source": thr_src,
        "postprocess": CleanupSpec().to_dict(), "prompt": "none (U-Net)", "prompt_uses_ground_truth": False,
        "box_source": None, "first_pass_empty": None, "learned_prompt": None,
        "checkpoint": {"path": str(weights), "sha256": sha256_file(weights)},
        "f1": summarize(f1), "iou": summarize(iou)})


def _evaluate_unet_run(run_dir: str, run_cfg: dict, data_paths: list[str], fold: int | None, split: str,
                       threshold: float | None, size: int | None, device: str, log: Log) -> Scored:
    """A U-Net baseline run scored as :func:`_run_parts` scores a SAM run (``split`` all or test)."""
    from ..runs import pick_fold

    trained_size = int(run_cfg["size"])
    size = size or trained_size
    data = load_data(data_paths, size, log)
    by_id = data.by_id()
    parts = []
    for f in _folds_to_score(run_dir, fold, split):
        fd = FoldLayout(pick_fold(Path(run_dir), f))
        samples = (held_out_samples(read_json(fd.split_json)["test"], by_id, f"{run_dir} fold {fd.index}")
                   if split == "test" else data.samples)
        parts.append(_score_unet_fold(fd, samples, threshold, device))
    what = "each on its own held-out test images" if split == "test" else "on every image"
    name = (f"U-Net run {run_dir}, fold{'s' if len(parts) > 1 else ''} "
            f"{', '.join(str(p.record['fold']) for p in parts)} {what}")
    return Scored(parts, name, data, size, trained_size, None)


@dataclass
class Scored:
    """What an evaluation scored: the parts, their name, the data, the working size and the run's trained size
    and encoder size (``None`` zero-shot / native)."""

    parts: list[ScoredPart]
    name: str
    data: Dataset
    size: int
    trained_size: int | None
    encoder_size: int | None


def _evaluate_run(run_dir: str, data_paths: list[str], fold: int | None, checkpoint: str | None, split: str,
                  threshold: float | None, size: int | None, encoder_size: int | None, box_from_first_pass: bool,
                  device: str, log: Log, progress: bool) -> Scored:
    from ..runs import RunError, checkpoint_warning

    run_json = RunLayout(run_dir).run_json
    if not run_json.exists():
        raise RunError(f"{run_dir}: not a lungsam run (no run.json)")
    if encoder_size is not None:
        raise ArgumentError("--encoder-size is for zero-shot evaluation; a run is scored at its own encoder size")
    run = read_json(run_json)
    run_cfg = run["config"]
    if run.get("format") == UNET_RUN_FORMAT:
        if box_from_first_pass or checkpoint:
            raise ArgumentError("--box-from-first-pass and --checkpoint are for SAM runs; a U-Net has no prompt "
                                "and no backbone")
        return _evaluate_unet_run(run_dir, run_cfg, data_paths, fold, split, threshold, size, device, log)
    trained_size, encoder_size = int(run_cfg["size"]), run_cfg.get("encoder_size")
    size = size or trained_size
    data = load_data(data_paths, size, log)
    parts, name = _run_parts(run_dir, fold, checkpoint, split, threshold, size, data, device, progress,
                             box_from_first_pass)
    if warning := checkpoint_warning(run_cfg["backbone"], parts[0].record["checkpoint"]):
        log(warning)
    return Scored(parts, name, data, size, trained_size, encoder_size)


def _evaluate_zero_shot(data_paths: list[str], backbone: str | None, checkpoint: str | None, prompt_mode: str,
                        points_per_lung: int, prompt_from: list[str] | None, split: str, threshold: float | None,
                        size: int | None, encoder_size: int | None, box_from_first_pass: bool, device: str,
                        log: Log, progress: bool) -> Scored:
    if backbone is None:
        raise ArgumentError("give a RUN or --backbone for zero-shot evaluation")
    if split != "all":
        raise ArgumentError("--split test needs a RUN (zero-shot has no held-out split)")
    size = size or 256
    cfg = TrainConfig(backbone=backbone, checkpoint=checkpoint, size=size, encoder_size=encoder_size)
    spec = preprocess_for(backbone, encoder_size)  # an encoder size that does not fit fails before any work
    ckpt = checkpoint_for(cfg)
    sam, ckpt_record = checked_backbone(backbone, encoder_size, ckpt, weights_fingerprint(backbone, ckpt), log)
    src = load_data(prompt_from or data_paths, size, log)
    prompt = learn_prompt([s.mask for s in src.samples], prompt_mode, points_per_lung)
    thr, thr_src = (threshold, "given") if threshold is not None else (0.5, "SAM default (logit 0)")
    enc = f", encoder input {encoder_size}" if encoder_size else ""
    name = f"zero-shot {backbone} ({prompt_mode}; prompt from {', '.join(prompt_from or data_paths)}{enc})"
    data = load_data(data_paths, size, log)
    probs, f1, iou, notes = score_model(sam, spec, prompt, thr, cfg, ckpt, None, data.samples, device, progress,
                                        box_from_first_pass)
    notes.pop("pred_iou", None)
    part = ScoredPart(data.samples, probs, f1, iou, {
        "fold": None, "n": len(data.samples), "threshold": thr, "threshold_source": thr_src,
        "postprocess": CleanupSpec().to_dict(), "prompt": prompt.mode,
        **notes, "learned_prompt": prompt.to_dict(), "checkpoint": ckpt_record,
        "f1": summarize(f1), "iou": summarize(iou)})
    return Scored([part], name, data, size, None, encoder_size)


def _eval_result(s: Scored, data_paths: list[str], split: str, box_from_first_pass: bool,
                 pred: list[np.ndarray]) -> dict:
    """The evaluation's ``metrics.json`` (``pred``: every scored mask, in the parts' order)."""
    parts = s.parts
    f1 = [x for p in parts for x in p.f1]
    iou = [x for p in parts for x in p.iou]
    hd95, asd = boundary_scores(pred, [x.mask for p in parts for x in p.samples])
    qc = [q for p in parts for q in (p.qc or [None] * len(p.samples))]
    first = parts[0].record
    return {
        "model": s.name, "data": data_paths, "split": split, "n": len(f1), "n_skipped": len(s.data.skipped),
        "skipped": s.data.skipped, "size": s.size, "trained_size": s.trained_size, "encoder_size": s.encoder_size,
        "prompt": first["prompt"],
        "prompt_uses_ground_truth": first["prompt_uses_ground_truth"], "box_source": first["box_source"],
        "first_pass_empty": (sum(p.record["first_pass_empty"] for p in parts) if box_from_first_pass else None),
        "threshold": first["threshold"] if len(parts) == 1 else None, "threshold_source": first["threshold_source"],
        "learned_prompt": first["learned_prompt"] if len(parts) == 1 else None,
        "checkpoint": first["checkpoint"],  # backbone weights: path, sha256, official (yes/no/none pinned)
        "parts": [p.record for p in parts], "f1": summarize(f1), "iou": summarize(iou),
        **boundary_summary(hd95, asd), "boundary_unit": f"px ({s.size}x{s.size} frame)",
        "qc_detection": detection_summary(qc, f1) if all(q is not None for q in qc) else None,
        "per_image": [{**r, "hd95": h, "asd": d, "qc": q.to_dict(details=True) if q else None} for r, h, d, q in zip(
            ({"id": x.id, "fold": p.record["fold"], "f1": a, "iou": b} for p in parts
             for x, a, b in zip(p.samples, p.f1, p.iou)), hd95, asd, qc)],
        "created": utc_now(), "versions": package_versions(),
    }


def _write_evaluation(out: Path, result: dict, s: Scored, pred: list[np.ndarray]) -> None:
    """``metrics.json``, ``report.md`` and the best/worst ``overlays.png`` of an evaluation folder."""
    from ..runs import run_folder_errors

    layout = EvalLayout(out)
    f1 = [x for p in s.parts for x in p.f1]
    with run_folder_errors(out, "the evaluation folder"):
        write_json_atomic(layout.metrics_json, result)
        write_text_atomic(layout.report_md, report.eval_report(result))
        flat = [(p, i) for p in s.parts for i in range(len(p.samples))]
        order = np.argsort(f1)
        report.overlays([{"label": f"{lab}: {p.samples[i].id.split('/')[-1]} F1 {p.f1[i]:.3f}",
                          "image": p.samples[i].image, "gt": p.samples[i].mask, "pred": pred[j]}
                         for lab, j in (("best", order[-1]), ("worst", order[0])) for p, i in [flat[j]]],
                        layout.overlays_png, s.name)


def evaluate(*, out: str | Path, data_paths: list[str], run_dir: str | None = None, fold: int | None = None,
             split: str = "all", backbone: str | None = None, checkpoint: str | None = None,
             prompt_mode: str = "points", points_per_lung: int = 3, prompt_from: list[str] | None = None,
             threshold: float | None = None,
             size: int | None = None, encoder_size: int | None = None, box_from_first_pass: bool = False,
             device: str = "auto", log: Log | None = None, progress: bool = True) -> dict:
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
        log: progress lines (default: INFO on this module's logger).
    Zero-shot prompts come from the mean mask of ``prompt_from`` data sets (default: the evaluated
    data itself, which the report states, since it uses the evaluated set's annotations).
    """
    if split not in EVAL_SPLITS:
        raise ArgumentError(f"unknown split {split!r}; choose from {', '.join(EVAL_SPLITS)}")
    log = log or logger.info
    device = pick_device(device)
    if run_dir:
        s = _evaluate_run(run_dir, data_paths, fold, checkpoint, split, threshold, size, encoder_size,
                          box_from_first_pass, device, log, progress)
    else:
        s = _evaluate_zero_shot(data_paths, backbone, checkpoint, prompt_mode, points_per_lung, prompt_from, split,
                                threshold, size, encoder_size, box_from_first_pass, device, log, progress)
    pred = [m for p in s.parts for m in p.masks()]
    result = _eval_result(s, data_paths, split, box_from_first_pass, pred)
    _write_evaluation(Path(out), result, s, pred)
    return result
