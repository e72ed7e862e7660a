"""Figures and markdown reports for runs and evaluations (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import atomic_path
from ..metrics import fmt_mean_std

PAPER = {  # Carvalho & Almeida, CIARP 2024 (SAM ViT-B, fine-tuned decoder, 5-fold, F1)
    "points": {"montgomery": "0.943 ± 0.007", "shenzhen": "0.915 ± 0.011"},
    "unet": {"montgomery": "0.973", "shenzhen": "0.941"},
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def learning_curve(history: list[dict], path: Path, title: str) -> None:
    """Train loss, val loss and val F1 per epoch."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(ep, [h["train_loss"] for h in history], label="train loss")
    ax.plot(ep, [h["val_loss"] for h in history], label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("DiceFocal loss")
    ax2 = ax.twinx()
    ax2.plot(ep, [h["val_f1"] for h in history], color="tab:green", label="val F1 (t=0.5)")
    ax2.set_ylabel("val F1")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def threshold_curve(sweep: list[dict], chosen: float, path: Path, title: str, cleaned: bool = False) -> None:
    """Mean validation F1 against the threshold (and after clean-up where the sweep has ``f1_cleaned``), the
    chosen threshold (``cleaned``: chosen with clean-up on) and the sweep's range, its edges shaded."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ts = [r["threshold"] for r in sweep]
    ax.plot(ts, [r["f1"] for r in sweep], marker="o", ms=3, label="val F1")
    if "f1_cleaned" in sweep[0]:
        ax.plot(ts, [r["f1_cleaned"] for r in sweep], marker="s", ms=3, label="val F1, cleaned")
    ax.axvline(chosen, color="gray", ls="--", label=f"chosen {chosen:.2f}" + (" (clean-up on)" if cleaned else ""))
    step = (max(ts) - min(ts)) / max(len(ts) - 1, 1)
    for edge in (min(ts), max(ts)):  # a choice in a shaded band sits at the edge of what was swept
        ax.axvspan(edge - step / 2, edge + step / 2, color="tab:red", alpha=0.08, lw=0)
    if chosen in (min(ts), max(ts)) and len(ts) > 1:
        ax.text(0.5, 0.02, "choice at the sweep's edge", transform=ax.transAxes, ha="center", color="tab:red",
                fontsize=8)
    lo = min(min(r["f1"] for r in sweep), min(r.get("f1_cleaned", 1.0) for r in sweep))
    best = max(max(r["f1"] for r in sweep), max(r.get("f1_cleaned", 0.0) for r in sweep))
    ax.set_ylim(max(lo, best - 0.08), best + 0.005)  # the top of the curve, where the choice is made
    ax.set_xlabel(f"probability threshold (swept {min(ts):.2f}-{max(ts):.2f})")
    ax.set_ylabel("mean F1")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def overlays(items: list[dict], path: Path, title: str) -> None:
    """Grid of images with ground truth (green) and prediction (red) contours.

    ``items``: ``[{"label", "image" (S,S,3) uint8, "gt" (S,S) bool, "pred" (S,S) bool}]``.
    """
    plt = _plt()
    n = len(items)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.5))
    for ax, it in zip(np.atleast_1d(axes), items):
        ax.imshow(it["image"], cmap="gray")
        ax.contour(it["gt"].astype(float), levels=[0.5], colors="lime", linewidths=1)
        ax.contour(it["pred"].astype(float), levels=[0.5], colors="red", linewidths=1)
        ax.set_title(it["label"], fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title}  (green: ground truth, red: prediction)", fontsize=9)
    save_figure(fig, path)


def qc_note(d: dict) -> str:
    """One line on the quality flag as a detector of bad masks (:func:`lungsam.qc.detection_summary`)."""
    f = lambda x, fmt: "–" if x is None else format(x, fmt)  # noqa: E731
    return (f"Quality flag (calibrated on the run's validation images, no ground truth used): AUROC "
            f"{f(d['auroc'], '.3f')} for masks with F1 < {d['bad_below']:.2f} ({d['bad']} of {d['n']}); flagged "
            f"{d['flagged']} ({f(d['flagged_share'], '.1%')}), catching {d['bad_caught']} of {d['bad']} bad masks "
            f"({f(d['bad_caught_share'], '.0%')}).")


def gt_note(prompt: str) -> str:
    if prompt in ("box", "both"):
        return "**Box prompts are taken from the ground-truth masks** (an upper bound, not usable without annotation)."
    return "Prompts need no ground truth (learned from the training split's mean mask)."


def eval_prompt_note(result: dict) -> str:
    """Where an eval's prompts came from; says so when the box came from the model's own first pass."""
    if result.get("first_pass_empty") is not None:
        return ("**Each image's box comes from the model's own first mask** (pass 1: the learned prompt with the "
                "mean-mask box; pass 2: the bounding box of that mask); no ground truth is used. "
                f"{result['first_pass_empty']} image(s) had an empty first mask and kept the mean-mask box.")
    return gt_note(result["prompt"])


def wall_time_note(run: dict, folds: list[dict]) -> str:
    """Wall time of the run, or of its last sitting when it was resumed, and the folds' summed epoch time."""
    sittings = 1 + len(run.get("resumed", []))
    wall = run.get("wall_time_s", 0)
    what = f"wall time {wall:.0f} s" if sittings == 1 else f"wall time of the last of {sittings} sittings {wall:.0f} s"
    train_s = sum(f.get("train_time_s", 0) for f in folds)
    return f"{what}; training epochs {train_s:.0f} s summed over the {len(folds)} fold(s)"


def precision_note(cfg: dict, device: str) -> str:
    """How a run's training steps computed, from its saved config and the device it ran on."""
    if cfg.get("cpu_bf16"):
        return "training steps and per-epoch validation in CPU bfloat16 autocast, thresholds and test scores in float32"
    if device.startswith("cuda") and cfg.get("amp", False):
        return "training steps and per-epoch validation in CUDA mixed precision, thresholds and test scores in float32"
    return "float32"


def fold_table(folds: list[dict]) -> list[str]:
    """Markdown lines: one row per fold (sizes, best epoch, threshold, val F1, test F1 and IoU)."""
    lines = ["| fold | train/val/test | best epoch | threshold | clean-up | val F1 | test F1 | test IoU "
             "| test HD95 px |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in folds:
        n = f["n"]
        edge = f" ({f['threshold_edge']} edge)" if f.get("threshold_edge") else ""
        clean = "on" if (f.get("postprocess") or {}).get("enabled") else "off"
        lines.append(f"| {f['fold']} | {n['train']}/{n['val']}/{n['test']} | {f['best_epoch']} | "
                     f"{f['threshold']:.2f}{edge} | "
                     f"{clean} | {f['val']['f1']['mean']:.3f} | {fmt_mean_std(f['test']['f1'])} | "
                     f"{fmt_mean_std(f['test']['iou'])} | {fmt_boundary(f['test'].get('hd95'))} |")
    return lines


def fmt_boundary(s: dict | None, digits: int = 2) -> str:
    """``mean ± std`` of a boundary-distance summary (:func:`lungsam.metrics.boundary_summary`), ``–`` when
    absent."""
    if not s or s.get("mean") is None:
        return "–"
    text = f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return text + (f" ({s['undefined']} undefined)" if s.get("undefined") else "")


def run_report(run: dict, folds: list[dict], aggregate: dict) -> str:
    """``report.md`` of a training run: per-fold table and the k-fold aggregate, paper beside ours."""
    cfg = run["config"]
    lines = [
        f"# lungsam run: {cfg['backbone']} / prompt `{cfg['prompt']}`",
        "",
        f"- data: {', '.join(cfg['data'])} ({run['n_samples']} pairs used, {run['n_skipped']} skipped)",
        f"- working size {cfg['size']}x{cfg['size']}"
        + (f", image encoder input {cfg['encoder_size']}" if cfg.get("encoder_size") else "")
        + f"; folds {cfg['folds']}; epochs ≤ {cfg['epochs']} "
        f"(early stop: val F1 gain < {cfg.get('min_delta', 0):g} in {cfg['patience']} epochs); Adam lr {cfg['lr']:g}, "
        f"weight decay {cfg['weight_decay']:g}; batch {cfg['batch_size']}",
        f"- device {run['device']} ({precision_note(cfg, run['device'])}); started {run['started']}; "
        f"finished {run.get('finished', '?')}; {wall_time_note(run, folds)}",
        f"- {gt_note(cfg['prompt'])}",
        "",
        *fold_table(folds),
    ]
    a = aggregate
    pooled = (f"F1 {fmt_mean_std(a['test_f1_pooled'])}, IoU {fmt_mean_std(a['test_iou_pooled'])}, "
              f"min F1 {a['test_f1_pooled']['min']:.3f} ({a['test_f1_pooled']['n']} test images, population std)")
    partial = run.get("partial")
    if partial:
        lines += ["", f"**Partial run: folds {', '.join(map(str, partial['folds_pending']))} of {cfg['folds']} "
                      "not trained "
                      f"yet** (`lungsam train ... --resume` trains them); the figures below cover "
                      f"fold{'s' if len(partial['folds_finished']) > 1 else ''} "
                      f"{', '.join(map(str, partial['folds_finished']))} only."]
    if cfg["folds"] == 1:
        lines += ["", f"**Test {pooled}**, one 60/20/20 split."]
    elif len(folds) == 1:
        lines += ["", f"**Test {pooled}**, fold {folds[0]['fold']} of {cfg['folds']}."]
    else:
        lines += [
            "",
            f"**Test F1 {fmt_mean_std(a['test_f1_across_folds'])}**, IoU {fmt_mean_std(a['test_iou_across_folds'])} "
            f"(mean ± std of the {len(folds)} fold means, population std).",
            f"Pooled over all test images: {pooled}.",
        ]
    by_set = a.get("test_by_dataset") or {}
    if len(by_set) > 1:
        lines += ["", "Test images by source data set (pooled over folds):", "",
                  "| data set | test images | F1 mean ± std | min F1 | IoU mean ± std |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['f1']['n']} | {fmt_mean_std(v['f1'])} | {v['f1']['min']:.3f} | "
                  f"{fmt_mean_std(v['iou'])} |"
                  for k, v in by_set.items()]
    lines += [
        "",
        "Paper (Carvalho & Almeida, CIARP 2024, SAM ViT-B, points, 5-fold F1): Montgomery "
        f"{PAPER['points']['montgomery']}, Shenzhen {PAPER['points']['shenzhen']}; "
        f"U-Net {PAPER['unet']['montgomery']} / "
        f"{PAPER['unet']['shenzhen']}.",
        "",
        "Figures: `folds/fold_*/learning_curve.png`, `folds/fold_*/threshold_curve.png`, `folds/fold_*/overlays.png`.",
    ]
    if run.get("skipped"):
        lines += ["", "## Skipped pairs", ""] + [f"- {s['reason']}" for s in run["skipped"]]
    return "\n".join(lines) + "\n"


def eval_report(result: dict) -> str:
    """``report.md`` of ``lungsam eval``."""
    size, trained = result["size"], result.get("trained_size")
    at = f"images fed and masks scored at {size}x{size}"
    if trained and trained != size:
        at += f" (the run was trained at {trained}x{trained})"
    parts = result.get("parts") or []
    if result.get("threshold") is not None:
        thr = f"threshold {result['threshold']:.2f} ({result['threshold_source']})"
    else:
        by_fold = ", ".join(f"{p['threshold']:.2f}" for p in parts)
        thr = f"thresholds {by_fold} by fold ({result['threshold_source']})"
    lines = [
        f"# lungsam eval: {result['model']}",
        "",
        f"- data: {', '.join(result['data'])} ({result['n']} images scored, {result['n_skipped']} pairs skipped); {at}",
        f"- prompt `{result['prompt']}`; {thr}",
        f"- {eval_prompt_note(result)}",
        "",
        "| metric | mean ± std | min | max |",
        "|---|---|---|---|",
    ]
    for k in ("f1", "iou"):
        s = result[k]
        lines.append(f"| {k.upper()} | {fmt_mean_std(s)} | {s['min']:.3f} | {s['max']:.3f} |")
    unit = result.get("boundary_unit", "px")
    for k, name in (("hd95", "HD95"), ("asd", "ASD")):
        s = result.get(k)
        if s and s.get("mean") is not None:
            lines.append(f"| {name} ({unit}) | {fmt_boundary(s)} | {s['min']:.2f} | {s['max']:.2f} |")
    qc = result.get("qc_detection")
    if qc:
        lines += ["", qc_note(qc)]
    if len(parts) > 1:
        lines += ["", "| fold | images | threshold | F1 mean ± std | IoU mean ± std |", "|---|---|---|---|---|"]
        lines += [f"| {p['fold']} | {p['n']} | {p['threshold']:.2f} | {fmt_mean_std(p['f1'])} | "
                  f"{fmt_mean_std(p['iou'])} |"
                  for p in parts]
    if result.get("skipped"):
        lines += ["", "## Skipped pairs", ""] + [f"- {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"
