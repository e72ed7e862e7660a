"""One fold's life and one run's orchestration, shared by every model lungsam trains.

A fold (:func:`train_fold`): its split file, resume from ``train_state.pt``, the epoch loop with early stopping,
best/last weights, ``history.csv`` and the learning curve, the validation threshold (and, where the model takes one,
the mask clean-up), the quality calibration, test scoring, overlays and ``metrics.json``. What differs between
models lives behind :class:`FoldTrainer`: the SAM decoder trainer and the LoRA encoder trainer
(:mod:`lungsam.train.run`), the U-Net trainer (:mod:`lungsam.train.unet`).

A run (:func:`open_run`, :func:`start_run`, :func:`train_all_folds`): refuse to overwrite, check a resume
(settings, splits), record the sitting, ``run.json`` / ``splits.json``, train or reuse each fold, aggregate, and
write ``metrics.json`` / ``report.md``. Every file name comes from :mod:`lungsam.layout`.
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from ..artifacts import read_json, utc_now, write_json_atomic, write_text_atomic
from ..boundary import boundary_scores
from ..data import Sample, dataset_of
from ..errors import ArgumentError, OutputExistsError
from ..layout import FoldLayout, RunLayout
from ..metrics import boundary_summary, summarize
from ..postprocess import CleanupSpec
from ..prompts import JITTER_PROMPT_MODES, LearnedPrompt, default_jitter_names
from ..qc import (
    DEFAULT_JITTER_SHIFT,
    QcCalibration,
    QcModel,
    QcResult,
    calibrate,
    detection_summary,
    qc_features,
)
from ..qc_fit import add_jitter_term, fit_quality_model
from . import report
from .checkpoints import load_train_state, save_train_state, save_weights, train_state_weights
from .engine import (
    EarlyStopping,
    binarize,
    choose_threshold,
    choose_threshold_and_cleanup,
    predict_variants,
    score,
    sweep_thresholds,
)

Log = Callable[[str], None]
PARTS = ("train", "val", "test")
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_f1", "val_iou", "epoch_s"]


@dataclass(frozen=True)
class FoldScoring:
    """What a model's fold records beyond F1/IoU at the validation threshold.

    Attributes:
        cleanup: the mask clean-up is chosen on validation with the threshold (``threshold_range``,
            ``threshold_edge``, ``postprocess``, ``postprocess_choice`` in ``metrics.json``).
        quality: the quality flag is calibrated on validation (needs the model's predicted IoU).
        boundary: HD95 and ASD of the test masks (``test.hd95``, ``test.asd``, per image).
        allow_cleanup: with ``cleanup``, whether the clean-up may be switched on (``False``: both sweeps are
            recorded, the masks stay as thresholded; ``lungsam train --cleanup off``).
    """

    cleanup: bool
    quality: bool
    boundary: bool
    allow_cleanup: bool = True  # False (TrainConfig.cleanup "off"): chosen as with cleanup, but never switched on


@dataclass
class FoldData:
    """One fold's images: ``samples[part]`` and their masks ``masks[part]`` (``(S, S)`` bool) for the parts
    train, val and test of its split."""

    samples: dict[str, list[Sample]]
    masks: dict[str, list[np.ndarray]]

    @classmethod
    def of(cls, split: dict, by_id: dict[str, Sample]) -> "FoldData":
        samples = {k: [by_id[i] for i in split[k]] for k in PARTS}
        return cls(samples, {k: [s.mask for s in v] for k, v in samples.items()})


@dataclass(frozen=True)
class PromptJitter:
    """A model's prompt variants on one part's images (:func:`lungsam.prompts.jitter_prompts`): their ``names``,
    the ``shift`` they were made with and ``maps(sl)``, the variants' probabilities ``(V, n, S, S)`` float32 of the
    part's images ``sl`` (a slice; computed on demand, so memory stays bounded by :data:`QC_CHUNK` images)."""

    shift: float
    names: tuple[str, ...]
    maps: Callable[[slice], np.ndarray]


#: Images per batch of prompt-variant maps while the quality flag is computed.
QC_CHUNK = 32


def prompt_jitter_of(sam, embeddings: np.ndarray, masks: list[np.ndarray], prompt: LearnedPrompt, spec, size: int,
                     device: str, shift: float = DEFAULT_JITTER_SHIFT, names: tuple[str, ...] | None = None,
                     batch_size: int = 8) -> PromptJitter | None:
    """The :class:`PromptJitter` of a SAM model on cached embeddings ``(N, C, E, E)`` (their working-frame
    ``masks`` only feed ground-truth boxes) with the variants ``names`` (default
    :func:`lungsam.prompts.default_jitter_names`), or ``None`` for a prompt mode the flag does not jitter
    (:data:`lungsam.prompts.JITTER_PROMPT_MODES`)."""
    if prompt.mode not in JITTER_PROMPT_MODES:
        return None
    names = tuple(names or default_jitter_names(prompt))
    return PromptJitter(shift, names, lambda sl: predict_variants(
        sam, embeddings[sl], masks[sl], prompt, spec, size, device, shift, names, batch_size))


class FoldTrainer(Protocol):
    """A model's side of a fold; built per fold by the run's ``make_trainer(fold, data, layout)``.

    Attributes:
        label: the progress bar's name (``"fold 0"``); title: the plots' title.
        weight_names: the parts it trains, each a :data:`lungsam.layout.WEIGHTS_NAMES` entry.
        keep_last: also write ``<part>_last.safetensors`` every epoch (else only the best).
        scoring: what the fold records beyond F1/IoU (:class:`FoldScoring`).
        prompt_uses_ground_truth: its test masks were prompted from the ground truth.
        optimizer: saved and restored with ``train_state.pt``.
    """

    label: str
    title: str
    weight_names: tuple[str, ...]
    keep_last: bool
    scoring: FoldScoring
    prompt_uses_ground_truth: bool
    optimizer: torch.optim.Optimizer

    def train_epoch(self) -> tuple[float, float]:
        """One pass over the fold's training images: ``(mean loss, seconds)``."""

    def validate(self) -> dict[str, float]:
        """``{"val_loss", "val_f1", "val_iou"}`` on the validation images (masks at 0.5)."""

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{weights name: state dict}`` of what it trains, now."""

    def weights_meta(self, epoch: int, val_f1: float) -> dict[str, str]:
        """The safetensors metadata of this epoch's weight files."""

    def load_state_dicts(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`state_dicts` (a resumed fold)."""

    def loop_state(self) -> dict:
        """Plain values a resumed fold needs besides weights, optimiser and epochs (shuffling generator)."""

    def restore_loop_state(self, st: dict) -> None:
        """Inverse of :meth:`loop_state`."""

    def load_best(self, fold: FoldLayout) -> None:
        """Make the best epoch's weights current (before the threshold is chosen)."""

    def predict(self, part: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities ``(N, S, S)`` float32 of the ``val`` or ``test`` images, and the model's predicted IoU
        ``(N,)`` (``None`` for a model without one)."""

    def prompt_jitter(self, part: str) -> PromptJitter | None:
        """The prompt variants of the ``val`` or ``test`` images for the quality flag, or ``None`` for a model
        without learned points."""

    def release(self) -> None:
        """Undo what the fold changed in shared state (the next fold starts from the pretrained decoder)."""


class Schedule(Protocol):
    """The settings the fold loop reads (:class:`~lungsam.train.config.TrainConfig`, ``UNetConfig``)."""

    epochs: int
    patience: int
    min_delta: float
    thresholds: tuple[float, ...]


MakeTrainer = Callable[[int, FoldData, FoldLayout], FoldTrainer]


@dataclass
class EpochLoop:
    """Where a fold's epochs stand: ``history`` rows, early stopping, the next epoch, and the fold's wall
    seconds in earlier sittings (a killed run resumed)."""

    stop: EarlyStopping
    history: list[dict] = field(default_factory=list)
    start: int = 1
    wall_before: float = 0.0


@dataclass
class ValidationChoice:
    """What validation chose: threshold, clean-up (``None``: the model takes none), the ``metrics.json``
    fields of the choice, per-image F1/IoU at it and the quality calibration (``None``: no flag)."""

    threshold: float
    cleanup: CleanupSpec | None
    record: dict
    f1: list[float]
    iou: list[float]
    qc: QcModel | QcCalibration | None


@dataclass
class TestScores:
    """The test images scored at the validation choice (boundary and quality ``None`` where not scored)."""

    masks: list[np.ndarray]
    f1: list[float]
    iou: list[float]
    hd95: list[float] | None
    asd: list[float] | None
    qc: list[QcResult | None] | None


def train_fold(sched: Schedule, fold: int, split: dict, by_id: dict[str, Sample], layout: FoldLayout,
               make_trainer: MakeTrainer, log: Log, progress: bool = True) -> dict:
    """Train, choose the threshold on validation and test one fold; resumable from ``train_state.pt``.
    Returns (and writes) the fold's ``metrics.json``."""
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.split_json, split)
    data = FoldData.of(split, by_id)
    trainer = make_trainer(fold, data, layout)
    loop = resume_fold(trainer, sched, layout, fold, log)
    t_fold = time.perf_counter()
    run_epochs(trainer, sched, layout, loop, fold, t_fold, log, progress)
    write_history(layout, loop.history)
    report.learning_curve(loop.history, layout.learning_curve_png, trainer.title)
    trainer.load_best(layout)
    val = choose_on_validation(trainer, data, sched, layout, fold, log)
    test = score_test(trainer, data, val, layout)
    metrics = fold_metrics(trainer, fold, data, loop, val, test, time.perf_counter() - t_fold)
    write_json_atomic(layout.metrics_json, metrics)
    trainer.release()
    log(fold_summary(fold, val, test, metrics))
    return metrics


def resume_fold(trainer: FoldTrainer, sched: Schedule, layout: FoldLayout, fold: int, log: Log) -> EpochLoop:
    """A new fold's loop, or (``train_state.pt`` present) the killed fold's: weights, optimiser, loop state,
    history and early-stopping marks restored."""
    if not layout.train_state.exists():
        return EpochLoop(EarlyStopping(sched.patience, sched.min_delta))
    st = load_train_state(layout.train_state)
    trainer.load_state_dicts({name: train_state_weights(st, name, layout.weights(name, "last"))
                              for name in trainer.weight_names})
    trainer.optimizer.load_state_dict(st["optimizer"])
    trainer.restore_loop_state(st)
    loop = EpochLoop(EarlyStopping.restore(sched.patience, sched.min_delta, st), st["history"], st["epoch"] + 1,
                     st.get("fold_wall_s", 0.0))
    log(f"fold {fold}: resuming after epoch {st['epoch']} (best val F1 {loop.stop.best_f1:.4f} at epoch "
        f"{loop.stop.best_epoch})")
    return loop


def run_epochs(trainer: FoldTrainer, sched: Schedule, layout: FoldLayout, loop: EpochLoop, fold: int,
               t_fold: float, log: Log, progress: bool) -> None:
    """Epochs ``loop.start`` .. ``sched.epochs`` until early stopping; after each the weight files and
    ``train_state.pt`` (``fold_wall_s`` counts from ``t_fold`` plus the earlier sittings)."""
    from tqdm import tqdm

    stop = loop.stop
    bar = tqdm(range(loop.start, sched.epochs + 1), desc=trainer.label, unit="epoch", disable=not progress)
    for epoch in bar:
        if stop.should_stop(epoch):
            log(f"fold {fold}: early stop after epoch {epoch - 1} (val F1 rose less than {sched.min_delta:g} "
                f"in {sched.patience} epochs; best {stop.best_f1:.4f} at epoch {stop.best_epoch})")
            break
        t_epoch = time.perf_counter()
        train_loss, secs = trainer.train_epoch()
        val = trainer.validate()
        loop.history.append({"epoch": epoch, "train_loss": train_loss, "epoch_s": secs, **val})
        weights = trainer.state_dicts()
        save_epoch_weights(trainer, layout, weights, epoch, val["val_f1"], best=stop.update(epoch, val["val_f1"]))
        loop.history[-1]["epoch_wall_s"] = time.perf_counter() - t_epoch  # training, validation and weight files
        save_train_state(layout.train_state, trainer.optimizer,
                         {"epoch": epoch, "history": loop.history, **stop.marks(),
                          "fold_wall_s": loop.wall_before + time.perf_counter() - t_fold, **trainer.loop_state()},
                         weights)
        bar.set_postfix(loss=f"{train_loss:.4f}", val_f1=f"{val['val_f1']:.4f}", best=stop.best_epoch)
    bar.close()


def save_epoch_weights(trainer: FoldTrainer, layout: FoldLayout, weights: dict[str, dict[str, torch.Tensor]],
                       epoch: int, val_f1: float, best: bool) -> None:
    """``<part>_best.safetensors`` when the epoch is the best so far, ``<part>_last`` when the trainer keeps it."""
    meta = trainer.weights_meta(epoch, val_f1)
    for name, sd in weights.items():
        if best:
            save_weights(sd, layout.weights(name, "best"), meta)
        if trainer.keep_last:
            save_weights(sd, layout.weights(name, "last"), meta)


def write_history(layout: FoldLayout, history: list[dict]) -> None:
    """``history.csv``: one row per epoch (:data:`HISTORY_COLUMNS`)."""
    s = io.StringIO()
    w = csv.DictWriter(s, fieldnames=HISTORY_COLUMNS)
    w.writeheader()
    for h in history:
        w.writerow({k: h[k] for k in w.fieldnames})
    write_text_atomic(layout.history_csv, s.getvalue())


def epochs_wall_s(history: list[dict]) -> float:
    """Wall seconds of a fold's epochs: training, validation and the weight files of each epoch (``epoch_wall_s``;
    epochs recorded before it was kept count their training time ``epoch_s`` only)."""
    return float(sum(h.get("epoch_wall_s", h["epoch_s"]) for h in history))


def choose_threshold_on(probs: np.ndarray, masks: list[np.ndarray], thresholds: tuple[float, ...],
                        with_cleanup: bool, allow_cleanup: bool = True
                        ) -> tuple[float, CleanupSpec | None, dict, list[dict], str | None]:
    """The validation threshold (and clean-up, ``with_cleanup``) for probabilities ``(N, S, S)``: threshold,
    clean-up (``None`` without), the ``metrics.json`` fields, the sweep rows and an edge warning (or ``None``)."""
    if with_cleanup:
        choice = choose_threshold_and_cleanup(probs, masks, thresholds, allow_cleanup=allow_cleanup)
        return choice.threshold, choice.cleanup, choice.record(), choice.sweep, choice.edge_warning()
    sweep = sweep_thresholds(probs, masks, thresholds)
    thr = choose_threshold(sweep)
    return thr, None, {"threshold": thr, "threshold_sweep": sweep}, sweep, None


def choose_on_validation(trainer: FoldTrainer, data: FoldData, sched: Schedule, layout: FoldLayout, fold: int,
                         log: Log) -> ValidationChoice:
    """Threshold (and clean-up) chosen on the validation images, its curve, validation scores at it and the
    quality calibration."""
    probs, pred_iou = trainer.predict("val")
    masks = data.masks["val"]
    thr, cleanup, record, sweep, warning = choose_threshold_on(probs, masks, sched.thresholds,
                                                               trainer.scoring.cleanup,
                                                               trainer.scoring.allow_cleanup)
    if warning:
        log(f"fold {fold}: {warning}")
    cleaned = cleanup is not None and cleanup.enabled
    report.threshold_curve(sweep, thr, layout.threshold_curve_png, trainer.title, cleaned)
    f1, iou = score(probs, masks, thr, cleanup)
    cal = None
    if trainer.scoring.quality:
        cal = calibrate_quality(probs, pred_iou, thr, cleanup, f"fold {fold} validation images", masks,
                                data.masks["train"], [s.image for s in data.samples["val"]])
        cal = with_jitter_term(cal, probs, pred_iou, thr, cleanup, trainer.prompt_jitter("val"), f1,
                               [s.image for s in data.samples["val"]])
    return ValidationChoice(thr, cleanup, record, f1, iou, cal)


def score_test(trainer: FoldTrainer, data: FoldData, val: ValidationChoice, layout: FoldLayout) -> TestScores:
    """The test images at the validation choice; writes the best and worst overlays."""
    probs, pred_iou = trainer.predict("test")
    truth = data.masks["test"]
    masks = binarize(probs, val.threshold, val.cleanup)
    f1, iou = score(probs, truth, val.threshold, val.cleanup)
    hd95, asd = boundary_scores(masks, truth) if trainer.scoring.boundary else (None, None)
    qc = None
    if trainer.scoring.quality:
        qc = assess_quality(val.qc, probs, pred_iou, val.threshold, val.cleanup,
                            [s.image for s in data.samples["test"]], trainer.prompt_jitter("test"))
    order = np.argsort(f1)
    test = data.samples["test"]
    report.overlays([{"label": f"{lab}: {test[i].id.split('/')[-1]} F1 {f1[i]:.3f}",
                      "image": test[i].image, "gt": truth[i], "pred": masks[i]}
                     for lab, i in (("best", order[-1]), ("worst", order[0]))], layout.overlays_png, trainer.title)
    return TestScores(masks, f1, iou, hd95, asd, qc)


def per_image_records(samples: list[Sample], test: TestScores) -> list[dict]:
    """``metrics.json``'s ``per_image``: id, F1, IoU, and HD95/ASD and the quality result where scored."""
    rows = []
    for i, s in enumerate(samples):
        row = {"id": s.id, "f1": test.f1[i], "iou": test.iou[i]}
        if test.hd95 is not None:
            row.update(hd95=test.hd95[i], asd=test.asd[i])
        if test.qc is not None:
            row["qc"] = test.qc[i].to_dict() if test.qc[i] else None
        rows.append(row)
    return rows


def fold_metrics(trainer: FoldTrainer, fold: int, data: FoldData, loop: EpochLoop, val: ValidationChoice,
                 test: TestScores, sitting_s: float) -> dict:
    """A fold's ``metrics.json`` (``sitting_s``: this sitting's wall seconds)."""
    history = loop.history
    metrics = {
        "fold": fold, **val.record,
        "n": {k: len(v) for k, v in data.samples.items()},
        "best_epoch": loop.stop.best_epoch, "epochs_run": len(history),
        "train_time_s": sum(h["epoch_s"] for h in history), "epochs_wall_s": epochs_wall_s(history),
        "fold_wall_s": loop.wall_before + sitting_s,
        "val": {"f1": summarize(val.f1), "iou": summarize(val.iou)},
        "test": {"f1": summarize(test.f1), "iou": summarize(test.iou)},
    }
    if test.hd95 is not None:
        metrics["test"].update(boundary_summary(test.hd95, test.asd))
        metrics["boundary_unit"] = "px (working frame)"
    if trainer.scoring.quality:
        metrics["qc"] = val.qc.to_dict() if val.qc is not None else None
        metrics["test_qc_detection"] = detection_summary(test.qc, test.f1) if val.qc is not None else None
    metrics["prompt_uses_ground_truth"] = trainer.prompt_uses_ground_truth
    metrics["per_image"] = per_image_records(data.samples["test"], test)
    return metrics


def fold_summary(fold: int, val: ValidationChoice, test: TestScores, metrics: dict) -> str:
    """The one log line of a finished fold."""
    cleanup = ", clean-up on" if val.cleanup is not None and val.cleanup.enabled else ""
    hd95 = f", HD95 {metrics['test']['hd95']['mean']:.2f} px" if test.hd95 is not None else ""
    return (f"fold {fold}: threshold {val.threshold:.2f}{cleanup}, val F1 {np.mean(val.f1):.4f}, test F1 "
            f"{np.mean(test.f1):.4f} ± {np.std(test.f1):.4f}, IoU {np.mean(test.iou):.4f}{hd95}")


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


def with_jitter_term(cal: QcModel | QcCalibration | None, probs: np.ndarray, iou: np.ndarray, threshold: float,
                     cleanup: CleanupSpec | None, jitter: PromptJitter | None, f1: list[float],
                     images: list[np.ndarray] | None) -> QcModel | QcCalibration | None:
    """``cal`` with its prompt-jitter term calibrated on the validation probabilities ``(N, S, S)``, predicted
    IoU ``(N,)``, their F1 against the ground truth (at ``threshold`` and ``cleanup``), images and prompt variants
    (:func:`lungsam.qc_fit.add_jitter_term`); ``cal`` unchanged without variants or for a version 1 calibration
    (normal ranges)."""
    if not isinstance(cal, QcModel) or jitter is None:
        return cal
    ims = images if images is not None else [None] * len(probs)
    rows = [cal.signals(p, threshold, float(i), cleanup, image=im, variants=v)
            for p, i, im, v in zip(probs, iou, ims, variant_maps_per_image(jitter, len(probs)))]
    return add_jitter_term(cal, rows, np.asarray(f1) >= cal.fit.get("bad_below", 0.90), jitter.shift, jitter.names)


def variant_maps_per_image(jitter: PromptJitter, n: int):
    """Each image's variant maps ``(V, S, S)`` in order, computed :data:`QC_CHUNK` images at a time."""
    for start in range(0, n, QC_CHUNK):
        maps = jitter.maps(slice(start, min(n, start + QC_CHUNK)))
        for j in range(maps.shape[1]):
            yield maps[:, j]


def assess_quality(cal: QcModel | QcCalibration | None, probs: np.ndarray, iou: np.ndarray, threshold: float,
                   cleanup: CleanupSpec, images: list[np.ndarray] | None = None,
                   jitter: PromptJitter | None = None) -> list[QcResult | None]:
    """The quality flag of each image (``assess_map``; ``images`` the working-frame images ``(S, S, 3)``;
    ``jitter`` the prompt variants, read when the calibration has a jitter term); ``None`` each without a
    calibration."""
    if cal is None:
        return [None] * len(probs)
    ims = images if images is not None else [None] * len(probs)
    uses_jitter = isinstance(cal, QcModel) and cal.jitter is not None
    if uses_jitter and jitter is None:
        raise ArgumentError("the quality calibration has a prompt-jitter term but no prompt variants were given")
    if uses_jitter and (jitter.names != cal.jitter.variants or jitter.shift != cal.jitter.shift):
        raise ArgumentError(f"prompt variants {jitter.names} (shift {jitter.shift}) differ from the calibration's "
                            f"{cal.jitter.variants} (shift {cal.jitter.shift})")
    maps = variant_maps_per_image(jitter, len(probs)) if uses_jitter else iter([None] * len(probs))
    return [cal.assess_map(p, threshold, float(i), cleanup, image=im, variants=v)
            for p, i, im, v in zip(probs, iou, ims, maps)]


# --- the run ---------------------------------------------------------------------------------------------------

def open_run(layout: RunLayout, resume: bool, only_folds: tuple[int, ...] | None, n_folds: int) -> dict | None:
    """The ``run.json`` of the run to continue (``None``: a new run); refuses ``only_folds`` outside the run's
    folds and a folder that holds a run unless ``resume``."""
    if only_folds is not None:
        bad = sorted(set(only_folds) - set(range(n_folds)))
        if bad:
            raise ArgumentError(f"--only-fold {bad[0]}: the run has folds 0-{n_folds - 1}")
    if not layout.run_json.exists():
        return None
    if not resume:
        raise OutputExistsError(f"{layout.root} already holds a run; use --resume to continue it or choose another "
                                "--out")
    return read_json(layout.run_json)


def config_differences(before: dict, now: dict, ignore: tuple[str, ...] = ("checkpoint",)) -> list[str]:
    """``"name: old -> new"`` for every setting of two ``comparable()`` configs that differs (``ignore`` left out)."""
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
            if k not in ignore and before.get(k) != now.get(k)]


def refuse_changed_settings(layout: RunLayout, differ: list[str]) -> None:
    """An :class:`ArgumentError` listing ``differ`` (see :func:`config_differences`) when it is not empty."""
    if differ:
        raise ArgumentError(f"--resume: the settings differ from the run in {layout.root} ({'; '.join(differ)}); "
                            "start a new --out instead")


def check_resumed_splits(layout: RunLayout, splits: list[dict]) -> None:
    """Refuse to resume a run whose data no longer gives the splits it began with (a pair added, removed or
    skipped since): its finished folds would have tested other images than the folds still to come."""
    if not layout.splits_json.exists():
        return
    before = read_json(layout.splits_json)
    if before != splits:
        n_before = len({i for f in before for part in f.values() for i in part})
        n_now = len({i for f in splits for part in f.values() for i in part})
        raise ArgumentError(f"--resume: the data in {layout.root}'s run gives other splits now ({n_now} images, "
                            f"{n_before} when it began): its folds would test different images. Restore the data or "
                            "start a new --out")


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


def start_run(layout: RunLayout, run: dict, old: dict | None, splits: list[dict]) -> None:
    """Record the sitting (:func:`record_sitting`) and write ``run.json`` and ``splits.json``."""
    record_sitting(run, old)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.run_json, run)
    write_json_atomic(layout.splits_json, splits)


def run_folds(layout: RunLayout, splits: list[dict], only_folds: tuple[int, ...] | None, log: Log,
              train: Callable[[int, dict, FoldLayout], dict]) -> list[dict]:
    """Fold metrics in order: a finished fold (its ``metrics.json``) is reused, the others are trained with
    ``train(i, split, fold_layout)`` unless ``only_folds`` leaves them for later."""
    folds = []
    for i, split in enumerate(splits):
        fl = layout.fold(i)
        if fl.metrics_json.exists():
            log(f"fold {i}: already finished, reusing")
            folds.append(read_json(fl.metrics_json))
        elif only_folds is None or i in only_folds:
            folds.append(train(i, split, fl))
    return folds


def train_all_folds(layout: RunLayout, run: dict, splits: list[dict], only_folds: tuple[int, ...] | None,
                    by_id: dict[str, Sample], sched: Schedule, make_trainer: MakeTrainer,
                    render_report: Callable[[dict, list[dict], dict], str], t0: float, log: Log,
                    progress: bool = True) -> dict:
    """Train (or reuse) every fold of a started run (:func:`start_run`) with :func:`train_fold`, then write the
    final ``run.json``, ``metrics.json`` and ``report.md`` (``render_report(run, folds, aggregate)``); returns
    the summary ``{"aggregate", "folds"[, "partial"]}``. ``t0``: when the sitting began (``perf_counter``)."""
    folds = run_folds(layout, splits, only_folds, log, lambda i, split, fl: train_fold(
        sched, i, split, by_id, fl, make_trainer, log, progress))
    if not folds:
        raise ValueError("no fold trained or finished")
    agg = aggregate_folds(folds)
    pending = [i for i in range(len(splits)) if i not in {f["fold"] for f in folds}]
    if pending:
        run["partial"] = {"folds_finished": [f["fold"] for f in folds], "folds_pending": pending}
        log(f"folds {', '.join(map(str, pending))} not trained yet: --resume (without --only-fold) trains them")
    else:
        run.pop("partial", None)
        run["finished"] = utc_now()
    run["wall_time_s"] = time.perf_counter() - t0
    write_json_atomic(layout.run_json, run)
    summary = {"aggregate": agg, "folds": [{k: v for k, v in f.items() if k != "per_image"} for f in folds]}
    if pending:
        summary["partial"] = run["partial"]
    write_json_atomic(layout.metrics_json, summary)
    write_text_atomic(layout.report_md, render_report(run, folds, agg))
    return summary


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
