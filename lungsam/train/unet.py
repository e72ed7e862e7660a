"""A U-Net baseline on the same folds as the SAM runs (``lungsam train-unet``), for a paired comparison.

The paper compares fine-tuned SAM with a U-Net (its Table 9: F1 0.973 Montgomery, 0.941 Shenzhen). This
trains MONAI's :class:`monai.networks.nets.UNet` from scratch on the working-frame images with the same
splits (:func:`lungsam.data.kfold_splits`, same seed), loss (MONAI DiceFocalLoss), optimiser (Adam), early
stopping on validation F1, threshold chosen on validation and test metrics as ``lungsam train``, and writes
the same ``folds/fold_i/metrics.json`` (with ``per_image``), so ``lungsam compare SAM_RUN UNET_RUN`` gives the
per-image paired difference on identical test images.

Input: the working image's grey channel ``(1, S, S)`` float32, standardised per image (zero mean, unit
variance), a common choice for radiographs whose exposure varies. No augmentation (as the SAM recipe).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..artifacts import package_versions, read_json, utc_now, write_json_atomic, write_text_atomic
from ..data import kfold_splits
from ..errors import ArgumentError, OutputExistsError
from ..metrics import fmt_mean_std, summarize
from . import report
from .config import UNetConfig  # defined with the other configs (torch-free, the CLI reads its fields)
from .engine import EarlyStopping, autocast, choose_threshold, mixed_precision, pick_device, score, sweep_thresholds

Log = Callable[[str], None]
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


def _save(net: torch.nn.Module, path: Path, cfg: UNetConfig, fold: int, epoch: int, val_f1: float) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    meta = {"format": "lungsam-unet/1", "config": json.dumps(cfg.to_dict()), "fold": str(fold), "epoch": str(epoch),
            "val_f1": f"{val_f1:.6f}"}
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_unet(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, UNetConfig]:
    """A U-Net checkpoint written by :func:`train_unet_fold` (config from its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        cfg = UNetConfig.from_dict(json.loads(f.metadata()["config"]))
    net = build_unet(cfg)
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval(), cfg


def train_unet_fold(cfg: UNetConfig, fold: int, split: dict, samples: dict, device: str, fold_dir: Path, log: Log,
                    progress: bool = True) -> dict:
    """Train one fold from scratch, choose the threshold on validation, score the test images.

    Resumable: after every epoch the weights, the optimiser, the history, the early stopping marks and the
    shuffling generator are saved together (``train_state.pt``), and a fold folder holding them goes on from
    there."""
    from monai.losses import DiceFocalLoss
    from tqdm import tqdm

    from .run import epochs_wall_s, save_train_state, train_state_weights

    fold_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(fold_dir / "split.json", split)
    part = {k: [samples[i] for i in split[k]] for k in ("train", "val", "test")}
    X = {k: np.stack([s.image for s in v]) for k, v in part.items()}
    M = {k: [s.mask for s in v] for k, v in part.items()}
    Y = np.stack(M["train"])[:, None].astype(np.float32)
    torch.manual_seed(cfg.seed + fold)
    rng = np.random.default_rng(cfg.seed + fold)
    mixed = mixed_precision(device, False, cfg.cpu_bf16)  # U-Nets train in float32 unless --cpu-bf16
    net = build_unet(cfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiceFocalLoss(sigmoid=True, squared_pred=True, reduction="mean")
    stop = EarlyStopping(cfg.patience, cfg.min_delta)
    history: list[dict] = []
    start, state_path = 1, fold_dir / "train_state.pt"
    wall_before = 0.0  # this fold's wall time in earlier sittings (a killed run resumed)
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(train_state_weights(st, "unet", fold_dir / "unet_last.safetensors"))
        opt.load_state_dict(st["optimizer"])
        rng.bit_generator.state = st["rng"]
        history, stop, start = st["history"], EarlyStopping.restore(cfg.patience, cfg.min_delta, st), st["epoch"] + 1
        wall_before = st.get("fold_wall_s", 0.0)
        log(f"fold {fold}: resuming after epoch {st['epoch']} (best val F1 {stop.best_f1:.4f} at epoch {stop.best_epoch})")
    t_fold = time.perf_counter()
    bar = tqdm(range(start, cfg.epochs + 1), desc=f"unet fold {fold}", unit="epoch", disable=not progress)
    for epoch in bar:
        if stop.should_stop(epoch):
            log(f"fold {fold}: early stop after epoch {epoch - 1} (val F1 rose less than {cfg.min_delta:g} in "
                f"{cfg.patience} epochs; best {stop.best_f1:.4f} at epoch {stop.best_epoch})")
            break
        net.train()
        t0, total = time.perf_counter(), 0.0
        order = rng.permutation(len(X["train"]))
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            x = torch.from_numpy(unet_input(X["train"][idx])).to(device)
            with autocast(device, mixed):
                logits = net(x)
            loss = loss_fn(logits.float(), torch.from_numpy(Y[idx]).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        secs = time.perf_counter() - t0
        logits = unet_logits(net, X["val"], device, cfg.batch_size, mixed)
        val_loss = float(loss_fn(logits, torch.from_numpy(np.stack(M["val"])[:, None].astype(np.float32))))
        vf1, viou = score(torch.sigmoid(logits)[:, 0].numpy(), M["val"], 0.5)
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_loss": val_loss,
                        "val_f1": float(np.mean(vf1)), "val_iou": float(np.mean(viou)), "epoch_s": secs})
        if stop.update(epoch, float(np.mean(vf1))):
            _save(net, fold_dir / "unet_best.safetensors", cfg, fold, epoch, float(np.mean(vf1)))
        history[-1]["epoch_wall_s"] = time.perf_counter() - t0  # training, validation and the best weights
        save_train_state(state_path, opt, {"epoch": epoch, "history": history, **stop.marks(),
                                           "fold_wall_s": wall_before + time.perf_counter() - t_fold,
                                           "rng": rng.bit_generator.state}, {"unet": net.state_dict()})
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.4f}", val_f1=f"{np.mean(vf1):.4f}", best=stop.best_epoch)
    bar.close()
    keys = ("epoch", "train_loss", "val_loss", "val_f1", "val_iou", "epoch_s")
    write_text_atomic(fold_dir / "history.csv", ",".join(keys) + "\n" +
                      "".join(",".join(str(h[k]) for k in keys) + "\n" for h in history))
    title = f"U-Net / fold {fold}"
    report.learning_curve(history, fold_dir / "learning_curve.png", title)

    net, _ = load_unet(fold_dir / "unet_best.safetensors", device)
    val_probs = predict_unet(net, X["val"], device, cfg.batch_size)
    sweep = sweep_thresholds(val_probs, M["val"], cfg.thresholds)
    thr = choose_threshold(sweep)
    report.threshold_curve(sweep, thr, fold_dir / "threshold_curve.png", title)
    vf1, viou = score(val_probs, M["val"], thr)
    test_probs = predict_unet(net, X["test"], device, cfg.batch_size)
    tf1, tiou = score(test_probs, M["test"], thr)
    order = np.argsort(tf1)
    report.overlays([{"label": f"{lab}: {part['test'][i].id.split('/')[-1]} F1 {tf1[i]:.3f}",
                      "image": part["test"][i].image, "gt": M["test"][i], "pred": test_probs[i] > thr}
                     for lab, i in (("best", order[-1]), ("worst", order[0]))], fold_dir / "overlays.png", title)
    metrics = {
        "fold": fold, "threshold": thr, "threshold_sweep": sweep, "n": {k: len(v) for k, v in part.items()},
        "best_epoch": stop.best_epoch, "epochs_run": len(history),
        "train_time_s": sum(h["epoch_s"] for h in history), "epochs_wall_s": epochs_wall_s(history),
        "fold_wall_s": wall_before + time.perf_counter() - t_fold,
        "val": {"f1": summarize(vf1), "iou": summarize(viou)}, "test": {"f1": summarize(tf1), "iou": summarize(tiou)},
        "prompt_uses_ground_truth": False,
        "per_image": [{"id": s.id, "f1": a, "iou": b} for s, a, b in zip(part["test"], tf1, tiou)],
    }
    write_json_atomic(fold_dir / "metrics.json", metrics)
    log(f"fold {fold}: threshold {thr:.2f}, val F1 {np.mean(vf1):.4f}, test F1 {np.mean(tf1):.4f} ± {np.std(tf1):.4f}, "
        f"IoU {np.mean(tiou):.4f}")
    return metrics


def unet_report(run: dict, folds: list[dict], aggregate: dict) -> str:
    """``report.md`` of a U-Net run."""
    cfg = run["config"]
    a = aggregate
    lines = [
        "# lungsam U-Net baseline",
        "",
        f"- data: {', '.join(cfg['data'])} ({run['n_samples']} pairs); working size {cfg['size']}; folds {cfg['folds']} "
        f"(seed {cfg['seed']}: the same splits as `lungsam train`)",
        f"- MONAI UNet channels {cfg['channels']}, {cfg['res_units']} residual units per level, "
        f"{run['parameters']:,} parameters; DiceFocalLoss, Adam lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g}, "
        f"batch {cfg['batch_size']}, epochs ≤ {cfg['epochs']} (early stop: val F1 gain < {cfg['min_delta']:g} in "
        f"{cfg['patience']} epochs); no augmentation",
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
                   only_folds: tuple[int, ...] | None = None, log: Log = print, progress: bool = True) -> dict:
    """Train the U-Net folds into ``out`` (finished folds are reused with ``resume``); returns the summary."""
    from .run import aggregate_folds, check_resumed_splits, load_data, record_sitting, run_folds

    out = Path(out)
    mixed_precision(pick_device(cfg.device), False, cfg.cpu_bf16)  # --cpu-bf16 where it cannot run fails before any work
    t0 = time.perf_counter()
    old = read_json(out / "run.json") if (out / "run.json").exists() else None
    if old is not None:
        if not resume:
            raise OutputExistsError(f"{out} already holds a run; use --resume to continue it or choose another --out")
        before = UNetConfig.from_dict(old["config"]).comparable()
        differ = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in cfg.comparable().items() if before.get(k) != v]
        if differ:
            raise ArgumentError(f"--resume: the settings differ from the run in {out} ({'; '.join(differ)})")
    if only_folds is not None and set(only_folds) - set(range(cfg.folds)):
        raise ArgumentError(f"--only-fold: the run has folds 0-{cfg.folds - 1}")
    device = pick_device(cfg.device)
    data = load_data(cfg.data, cfg.size, log)
    splits = kfold_splits([s.id for s in data.samples], cfg.folds, cfg.seed)
    if old is not None:
        check_resumed_splits(out, splits)
    run = {"format": RUN_FORMAT, "config": cfg.to_dict(), "device": device, "n_samples": len(data.samples),
           "n_skipped": len(data.skipped), "skipped": data.skipped,
           "parameters": sum(p.numel() for p in build_unet(cfg).parameters()),
           "started": utc_now(), "versions": package_versions()}
    record_sitting(run, old)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "run.json", run)
    write_json_atomic(out / "splits.json", splits)
    log(f"data: {len(data.samples)} pairs; U-Net {run['parameters']:,} parameters on {device}")
    samples = data.by_id()
    folds = run_folds(out, splits, only_folds, log,
                      lambda i, split, fd: train_unet_fold(cfg, i, split, samples, device, fd, log, progress))
    if not folds:
        raise ValueError("no fold trained or finished")
    pending = [i for i in range(len(splits)) if i not in {f["fold"] for f in folds}]
    run["wall_time_s"] = time.perf_counter() - t0
    if pending:
        run["partial"] = {"folds_finished": [f["fold"] for f in folds], "folds_pending": pending}
    else:
        run["finished"] = utc_now()
    write_json_atomic(out / "run.json", run)
    agg = aggregate_folds(folds)
    summary = {"aggregate": agg, "folds": [{k: v for k, v in f.items() if k != "per_image"} for f in folds]}
    write_json_atomic(out / "metrics.json", summary)
    write_text_atomic(out / "report.md", unet_report(run, folds, agg))
    return summary
