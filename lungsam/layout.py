"""The names of every file lungsam writes into a folder, defined once (torch-free, no I/O).

A writer and all its readers take a path from one of these classes instead of spelling a file name; nothing else in
the package spells ``"metrics.json"`` or ``"run.json"``. The bundle's ``manifest.json`` is named by
:mod:`lungsam.manifest` (``MANIFEST_FILE``), which also validates it.

Run folder (``lungsam train``, ``lungsam train-unet``)::

    RUN/
      run.json                 config, backbone, weights sha256, data, versions, timings   RunLayout.run_json
      splits.json              every fold's {"train", "val", "test"} image ids              RunLayout.splits_json
      metrics.json, report.md  aggregate over folds                                        RunLayout.metrics_json
      folds/fold_<i>/                                                                      RunLayout.fold(i)
        split.json             {"train": [...ids], "val": [...], "test": [...]}            FoldLayout.split_json
        prompt.json            LearnedPrompt.to_dict()                                     FoldLayout.prompt_json
        decoder_best/last.safetensors        mask_decoder state dict             FoldLayout.weights("decoder", w)
        encoder_lora_best/last.safetensors   encoder adapter (--lora-rank only)  FoldLayout.weights("encoder_lora", w)
        unet_best/last.safetensors           U-Net state dict (train-unet)       FoldLayout.weights("unet", w)
        train_state.pt         optimizer + history, for --resume                           FoldLayout.train_state
        metrics.json           threshold sweep, val/test scores, per-image results         FoldLayout.metrics_json
        history.csv, learning_curve.png, threshold_curve.png, overlays.png

Evaluation folder (``lungsam eval --out``): :class:`EvalLayout`. Prediction folder (``lungsam predict --out``):
:class:`PredictLayout`. Benchmark and sweep folders
(``lungsam bench``): :class:`BenchLayout`, :class:`SweepLayout`. ``lungsam reproduce``'s root and its step folders:
:class:`ReproduceLayout`, :class:`StepLayout`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Which = Literal["best", "last"]
WEIGHTS_NAMES = ("decoder", "encoder_lora", "unet")


@dataclass(frozen=True)
class FoldLayout:
    """One fold's folder, ``RUN/folds/fold_<i>``."""

    root: Path

    @property
    def split_json(self) -> Path:
        return self.root / "split.json"

    @property
    def prompt_json(self) -> Path:
        return self.root / "prompt.json"

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    @property
    def train_state(self) -> Path:
        return self.root / "train_state.pt"

    @property
    def history_csv(self) -> Path:
        return self.root / "history.csv"

    @property
    def learning_curve_png(self) -> Path:
        return self.root / "learning_curve.png"

    @property
    def threshold_curve_png(self) -> Path:
        return self.root / "threshold_curve.png"

    @property
    def overlays_png(self) -> Path:
        return self.root / "overlays.png"

    def weights(self, name: str, which: Which) -> Path:
        """``<name>_<which>.safetensors``: ``name`` one of :data:`WEIGHTS_NAMES`, ``which`` best or last."""
        if name not in WEIGHTS_NAMES:
            raise ValueError(f"weights name {name!r}: expected one of {', '.join(WEIGHTS_NAMES)}")
        if which not in ("best", "last"):
            raise ValueError(f"weights {which!r}: expected 'best' or 'last'")
        return self.root / f"{name}_{which}.safetensors"

    @property
    def index(self) -> int:
        """The fold's number, from its folder name ``fold_<i>``."""
        return int(self.root.name.removeprefix("fold_"))


@dataclass(frozen=True)
class RunLayout:
    """A training run's folder (see the module docstring for the tree)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def splits_json(self) -> Path:
        return self.root / "splits.json"

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def folds_dir(self) -> Path:
        return self.root / "folds"

    def fold(self, i: int) -> FoldLayout:
        return FoldLayout(self.folds_dir / f"fold_{i}")

    def existing_folds(self) -> list[FoldLayout]:
        """The fold folders present, in fold order (``[]`` when there are none)."""
        if not self.folds_dir.is_dir():
            return []
        found = [FoldLayout(p) for p in self.folds_dir.glob("fold_*")
                 if p.is_dir() and p.name.removeprefix("fold_").isdigit()]
        return sorted(found, key=lambda f: f.index)


@dataclass(frozen=True)
class PredictLayout:
    """``lungsam predict --out OUT``: one record per image and the run's record, masks and overlays per input."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def predictions_jsonl(self) -> Path:
        return self.root / "predictions.jsonl"

    @property
    def partial_predictions_jsonl(self) -> Path:
        """Where a Ray batch collects records before they are complete."""
        return self.root / "predictions.partial.jsonl"

    @property
    def predict_json(self) -> Path:
        return self.root / "predict.json"

    @property
    def ray_run_json(self) -> Path:
        return self.root / "ray_run.json"

    @property
    def contact_sheet_png(self) -> Path:
        return self.root / "contact_sheet.png"

    def mask_png(self, stem: str) -> Path:
        return self.root / f"{stem}_mask.png"

    def overlay_png(self, stem: str) -> Path:
        return self.root / f"{stem}_overlay.png"


@dataclass(frozen=True)
class BenchLayout:
    """``lungsam bench --out OUT``."""

    root: Path

    @property
    def results_json(self) -> Path:
        return Path(self.root) / "results.json"

    @property
    def results_md(self) -> Path:
        return Path(self.root) / "results.md"

    @property
    def latency_png(self) -> Path:
        return Path(self.root) / "latency.png"


@dataclass(frozen=True)
class SweepLayout:
    """``lungsam bench-sweep --out OUT``."""

    root: Path

    @property
    def sweep_json(self) -> Path:
        return Path(self.root) / "sweep.json"

    @property
    def sweep_md(self) -> Path:
        return Path(self.root) / "sweep.md"

    @property
    def sweep_png(self) -> Path:
        return Path(self.root) / "sweep.png"


@dataclass(frozen=True)
class StepLayout:
    """One step folder of ``lungsam reproduce`` (its record of settings and outcome)."""

    root: Path

    @property
    def step_json(self) -> Path:
        return Path(self.root) / "step.json"


@dataclass(frozen=True)
class ReproduceLayout:
    """``lungsam reproduce --out ROOT``: the collected results, the tables and the figures copied from the runs."""

    root: Path

    @property
    def results_json(self) -> Path:
        return Path(self.root) / "results.json"

    @property
    def tables_md(self) -> Path:
        return Path(self.root) / "tables.md"

    @property
    def figures_dir(self) -> Path:
        return Path(self.root) / "figures"


@dataclass(frozen=True)
class EvalLayout:
    """``lungsam eval --out OUT``: the scores, their report and the best/worst overlays."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def overlays_png(self) -> Path:
        return self.root / "overlays.png"
