"""A U-Net baseline on the same folds as the SAM runs (``lungsam train-unet``), for a paired comparison.

The paper compares fine-tuned SAM with a U-Net (its Table 9: F1 0.973 Montgomery, 0.941 Shenzhen). This
trains MONAI's :class:`monai.networks.nets.UNet` from scratch on the working-frame images with the same
splits (:func:`lungsam.data.kfold_splits`, same seed), loss (MONAI DiceFocalLoss), optimiser (Adam), early
stopping on validation F1, threshold chosen on validation and test metrics as ``lungsam train``, and writes
the same ``folds/fold_i/metrics.json`` (with ``per_image``), so ``lungsam compare SAM_RUN UNET_RUN`` gives the
per-image paired difference on identical test images.

Input: the working image's grey channel ``(1, S, S)`` float32, standardised per image (zero mean, unit
variance), a common choice for radiographs whose exposure varies. No augmentation by default (as the SAM recipe);
``--augment N`` (with ``--augment-policy``, ``--opacity-prob``) trains on the same augmented views of the same
images as a SAM run with those options and seed.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..artifacts import package_versions, utc_now
from ..data import kfold_splits
from ..errors import ArgumentError
from ..layout import FoldLayout, RunLayout
from ..metrics import fmt_mean_std
from ..samples import load_data
from . import report
from .augment import draw_views
from .checkpoints import load_weights
from .config import UNetConfig  # defined with the other configs (torch-free, the CLI reads its fields)
from .engine import autocast, mixed_precision, pick_device, score
from .folds import (
    FoldData,
    FoldScoring,
    check_resumed_splits,
    config_differences,
    open_run,
    refuse_changed_settings,
    start_run,
    train_all_folds,
)

Log = Callable[[str], None]
logger = logging.getLogger(__name__)
RUN_FORMAT = "lungsam-unet-run/1"


def build_unet(cfg: UNetConfig) -> torch.nn.Module:
    """MONAI 2-D UNet: 1 input channel (grey), 1 output channel (lung logit), stride 2 between levels."""
    from monai.networks.nets import UNet

    if len(cfg.channels) < 2:
        raise ArgumentError("--channels needs at least two levels")
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(cfg.channels),
                strides=(2,) * (len(cfg.channels) - 1), num_res_units=cfg.res_units)


def unet_input(images: np.ndarray) -> np.ndarray:
    """Working images ``(B, S, S, 3)`` uint8 -> ``(B, 1, S, S)`` float32, each standardised on its own
    (mean 0, std 1 over its pixels; the grey channel is the mean of the three)."""
    x = images.astype(np.float32).mean(axis=-1)[:, None]
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True)
    return (x - mean) / np.maximum(std, 1e-6)


@torch.no_grad()
def unet_logits(net: torch.nn.Module, images: np.ndarray, device: str, batch_size: int = 8,
                mixed: bool = False) -> torch.Tensor:
    """``(N, 1, S, S)`` float32 logits (on the CPU) for working images ``(N, S, S, 3)`` uint8; ``mixed``: computed
    under :func:`~lungsam.train.engine.autocast` (validation between epochs of a mixed-precision run)."""
    net.eval()
    out = []
    for s in range(0, len(images), batch_size):
        with autocast(device, mixed):
            out.append(net(torch.from_numpy(unet_input(images[s:s + batch_size])).to(device)).float().cpu())
    return torch.cat(out)


def predict_unet(net: torch.nn.Module, images: np.ndarray, device: str, batch_size: int = 8) -> np.ndarray:
    """``(N, S, S)`` float32 lung probabilities for working images ``(N, S, S, 3)`` uint8."""
    return torch.sigmoid(unet_logits(net, images, device, batch_size))[:, 0].numpy()


def load_unet(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, UNetConfig]:
    """A U-Net checkpoint written by :func:`lungsam.train.folds.train_fold` with a :class:`UNetFoldTrainer`
    (config from its metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        cfg = UNetConfig.from_dict(json.loads(f.metadata()["config"]))
    net = build_unet(cfg)
    net.load_state_dict(load_weights(Path(path)))
    return net.to(device).eval(), cfg


class UNetFoldTrainer:
    """The U-Net's side of one fold (:class:`lungsam.train.folds.FoldTrainer`): a MONAI UNet from scratch on the
    working images ``(N, S, S, 3)`` uint8 (standardised grey, :func:`unet_input`), Adam, DiceFocalLoss, the
    shuffling generator seeded per fold; only the best weights are kept, the threshold is chosen alone (no
    clean-up), and there is no quality flag (no predicted IoU) and no boundary score. With ``augment_views`` V the
    fold's training images get V augmented views ``(V, N, S, S, 3)`` made once, and each epoch trains on the
    original or one view per image (:meth:`epoch_data`)."""

    keep_last = False
    scoring = FoldScoring(cleanup=False, quality=False, boundary=False)
    prompt_uses_ground_truth = False
    weight_names = ("unet",)

    def __init__(self, cfg: UNetConfig, fold: int, data: FoldData, device: str):
        from monai.losses import DiceFocalLoss

        self.cfg, self.fold, self.device = cfg, fold, device
        self.X = {k: np.stack([s.image for s in v]) for k, v in data.samples.items()}
        self.M = data.masks
        self.Y = np.stack(self.M["train"])[:, None].astype(np.float32)
        self.views = training_views(cfg, data.samples["train"])
        torch.manual_seed(cfg.seed + fold)
        self.rng = np.random.default_rng(cfg.seed + fold)
        self.mixed = mixed_precision(device, False, cfg.cpu_bf16)  # U-Nets train in float32 unless --cpu-bf16
        self.net = build_unet(cfg).to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.loss_fn = DiceFocalLoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.label, self.title = f"unet fold {fold}", f"U-Net / fold {fold}"

    def train_epoch(self) -> tuple[float, float]:
        self.net.train()
        t0, total = time.perf_counter(), 0.0
        order = self.rng.permutation(len(self.X["train"]))
        X, Y = self.epoch_data()
        for s in range(0, len(order), self.cfg.batch_size):
            idx = order[s:s + self.cfg.batch_size]
            x = torch.from_numpy(unet_input(X[idx])).to(self.device)
            with autocast(self.device, self.mixed):
                logits = self.net(x)
            loss = self.loss_fn(logits.float(), torch.from_numpy(Y[idx]).to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach()) * len(idx)
        return total / len(order), time.perf_counter() - t0

    def epoch_data(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's training images ``(N, S, S, 3)`` uint8 and masks ``(N, 1, S, S)`` float32: without views the
        originals (nothing drawn from the generator), else per image the original or one view, drawn uniformly."""
        if self.views is None:
            return self.X["train"], self.Y
        vx, vy = self.views
        pick = draw_views(self.rng, len(self.Y), len(vx))
        view, idx = np.maximum(pick - 1, 0), np.arange(len(self.Y))
        orig = (pick == 0)[:, None, None, None]
        return np.where(orig, self.X["train"], vx[view, idx]), np.where(orig, self.Y, vy[view, idx])

    def validate(self) -> dict[str, float]:
        logits = unet_logits(self.net, self.X["val"], self.device, self.cfg.batch_size, self.mixed)
        val_loss = float(self.loss_fn(logits, torch.from_numpy(np.stack(self.M["val"])[:, None].astype(np.float32))))
        vf1, viou = score(torch.sigmoid(logits)[:, 0].numpy(), self.M["val"], 0.5)
        return {"val_loss": val_loss, "val_f1": float(np.mean(vf1)), "val_iou": float(np.mean(viou))}

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"unet": self.net.state_dict()}

    def weights_meta(self, epoch: int, val_f1: float) -> dict[str, str]:
        return {"format": "lungsam-unet/1", "config": json.dumps(self.cfg.to_dict()), "fold": str(self.fold),
                "epoch": str(epoch), "val_f1": f"{val_f1:.6f}"}

    def load_state_dicts(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        self.net.load_state_dict(weights["unet"])

    def loop_state(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def restore_loop_state(self, st: dict) -> None:
        self.rng.bit_generator.state = st["rng"]

    def load_best(self, fold: FoldLayout) -> None:
        self.net, _ = load_unet(fold.weights("unet", "best"), self.device)

    def predict(self, part: str) -> tuple[np.ndarray, None]:
        return predict_unet(self.net, self.X[part], self.device, self.cfg.batch_size), None

    def prompt_jitter(self, part: str) -> None:
        """No prompt to jitter."""
        return None

    def release(self) -> None:
        """Nothing to undo: every fold builds its own network."""


def training_views(cfg: UNetConfig, samples: list) -> tuple[np.ndarray, np.ndarray] | None:
    """``cfg.augment_views`` augmented views of the fold's training samples: images ``(V, N, S, S, 3)`` uint8 and
    masks ``(V, N, 1, S, S)`` float32 (:func:`lungsam.train.augment.augmented_views`), or ``None`` without views."""
    if cfg.augment_views <= 0:
        return None
    from .augment import AugmentSpec, augmented_views

    views = augmented_views(samples, cfg.augment_views, cfg.seed, AugmentSpec.of(cfg))
    return (np.stack([np.stack([s.image for s in v]) for v in views]),
            np.stack([np.stack([s.mask for s in v])[:, None] for v in views]).astype(np.float32))


def augmentation_note(cfg: dict) -> str:
    """The report's words for a run config's augmentation."""
    if not cfg.get("augment_views"):
        return "no augmentation"
    opa = f", opacities p {cfg['opacity_prob']:g}" if cfg.get("opacity_prob") else ""
    return f"{cfg['augment_views']} augmented views per image ({cfg.get('augment_policy', 'affine')}{opa})"


def unet_report(run: dict, folds: list[dict], aggregate: dict) -> str:
    """``report.md`` of a U-Net run."""
    cfg = run["config"]
    a = aggregate
    lines = [
        "# lungsam U-Net baseline",
        "",
        f"- data: {', '.join(cfg['data'])} ({run['n_samples']} pairs); working size {cfg['size']}; "
        f"folds {cfg['folds']} "
        f"(seed {cfg['seed']}: the same splits as `lungsam train`)",
        f"- MONAI UNet channels {cfg['channels']}, {cfg['res_units']} residual units per level, "
        f"{run['parameters']:,} parameters; DiceFocalLoss, Adam lr {cfg['lr']:g}, "
        f"weight decay {cfg['weight_decay']:g}, "
        f"batch {cfg['batch_size']}, epochs ≤ {cfg['epochs']} (early stop: val F1 gain < {cfg['min_delta']:g} in "
        f"{cfg['patience']} epochs); {augmentation_note(cfg)}",
        f"- device {run['device']} ({report.precision_note(cfg, run['device'])}); started {run['started']}; "
        f"finished {run.get('finished', '?')}; "
        f"{report.wall_time_note(run, folds)}",
        "",
        *report.fold_table(folds),
    ]
    if run.get("partial"):
        lines += ["", f"**Partial run: folds {', '.join(map(str, run['partial']['folds_pending']))} not trained yet** "
                      "(`lungsam train-unet ... --resume`)."]
    lines += ["", f"Test F1 over the {len(folds)} fold mean(s): {fmt_mean_std(a['test_f1_across_folds'])}; pooled over "
                  f"{a['test_f1_pooled']['n']} test images {fmt_mean_std(a['test_f1_pooled'])} (min "
                  f"{a['test_f1_pooled']['min']:.3f}), IoU {fmt_mean_std(a['test_iou_pooled'])}.",
              "", "Paired against a SAM run on the same test images: `lungsam compare SAM_RUN THIS_RUN`."]
    return "\n".join(lines) + "\n"


def train_unet_run(cfg: UNetConfig, out: str | Path, *, resume: bool = False,
                   only_folds: tuple[int, ...] | None = None, log: Log | None = None, progress: bool = True) -> dict:
    """Train the U-Net folds into ``out`` (finished folds are reused with ``resume``); returns the summary.
    ``log``: progress lines (default: INFO on this module's logger)."""
    log = log or logger.info
    layout = RunLayout(out)
    mixed_precision(pick_device(cfg.device), False, cfg.cpu_bf16)  # --cpu-bf16 where it cannot run fails first
    t0 = time.perf_counter()
    old = open_run(layout, resume, only_folds, cfg.folds)
    if old is not None:
        refuse_changed_settings(layout, config_differences(UNetConfig.from_dict(old["config"]).comparable(),
                                                           cfg.comparable()))
    device = pick_device(cfg.device)
    data = load_data(cfg.data, cfg.size, log)
    splits = kfold_splits([s.id for s in data.samples], cfg.folds, cfg.seed)
    if old is not None:
        check_resumed_splits(layout, splits)
    run = {"format": RUN_FORMAT, "config": cfg.to_dict(), "device": device, "n_samples": len(data.samples),
           "n_skipped": len(data.skipped), "skipped": data.skipped,
           "parameters": sum(p.numel() for p in build_unet(cfg).parameters()),
           "started": utc_now(), "versions": package_versions()}
    if cfg.augment_views > 0:
        from .augment import AugmentSpec

        run["augmentation"] = {"views": cfg.augment_views, "transforms": AugmentSpec.of(cfg).to_dict()}
    start_run(layout, run, old, splits)
    log(f"data: {len(data.samples)} pairs; U-Net {run['parameters']:,} parameters on {device}")
    make = lambda fold, fold_data, fold_layout: UNetFoldTrainer(cfg, fold, fold_data, device)
    return train_all_folds(layout, run, splits, only_folds, data.by_id(), cfg, make, unet_report, t0, log, progress)
