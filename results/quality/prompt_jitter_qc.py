"""Prompt-jitter agreement as a quality signal: the decoder rerun with the learned points moved, no second encoder pass.

Usage: python results/quality/prompt_jitter_qc.py RUN --data DIR --out OUT [--fold N] [--shift 0.03]

For every image of ``--data``: the fold's mask (learned prompt, its threshold and clean-up) and the masks of
variants of the prompt, each point moved by ``shift`` (fraction of the working frame) up, down, left, right, and
each lung prompted by one point fewer (each of its points dropped in turn). Signals: ``jitter_iou_min`` and
``jitter_iou_mean``, the IoU of each variant's mask with the fold's (low is bad), and ``jitter_prob_std``, the
mean over the mask's union of the per-pixel standard deviation of the variants' probabilities. Each is scored as
a detector of masks with F1 < 0.90 against the ground truth (AUROC), alone and as a rank mean with the fold's own
quality score. Writes ``OUT.json`` (strict JSON, per image rows) and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from lungsam.artifacts import write_json_atomic, write_text_atomic
from lungsam.metrics import f1_score, iou_score
from lungsam.postprocess import CleanupSpec, clean_mask
from lungsam.qc import auroc, load_calibration
from lungsam.runs import load_run
from lungsam.samples import embed_samples, load_data
from lungsam.train.config import TrainConfig
from lungsam.train.engine import predict_with_iou
from lungsam.train.redecode import encoder_config

log = logging.getLogger("lungsam.prompt_jitter_qc")
BAD_BELOW = 0.90


def prompt_variants(prompt, shift: float) -> dict:
    """``{name: LearnedPrompt}``: every point moved by ``shift`` in four directions, and one point per lung
    dropped (points of a lung are consecutive, ``points_per_lung`` each)."""
    out = {}
    for name, (dx, dy) in {"up": (0, -shift), "down": (0, shift), "left": (-shift, 0), "right": (shift, 0)}.items():
        pts = np.clip(prompt.points + np.array([dx, dy], np.float32), 0.0, 1.0).astype(np.float32)
        out[name] = replace(prompt, points=pts)
    k = prompt.points_per_lung
    if k > 1:
        for i in range(len(prompt.points)):
            keep = [j for j in range(len(prompt.points)) if j != i]
            out[f"drop{i}"] = replace(prompt, points=prompt.points[keep], labels=prompt.labels[keep])
    return out


def rank01(x) -> np.ndarray:
    """Ranks of ``x`` scaled to 0..1 (ties share their mean rank)."""
    from scipy.stats import rankdata

    return (rankdata(x) - 1) / max(len(x) - 1, 1)


def open_point_run(run: str, fold: int | None, data: list[str], purpose: str):
    """``(run, config, samples)``: fold ``fold`` of ``run`` (:func:`lungsam.runs.load_run`), the encoder settings
    it was trained with, and the working-frame samples of ``data``; exits when the run learned no points
    (``purpose`` says what the points were wanted for)."""
    rm = load_run(run, fold, None)
    if not rm.prompt.uses_points:
        raise SystemExit(f"{run}: prompt mode {rm.prompt.mode!r} has no learned points to {purpose}")
    cfg = encoder_config(rm)
    return rm, cfg, load_data(data, cfg.size, log.info).samples


def jitter_probabilities(rm, cfg: TrainConfig, emb: np.ndarray, gts: list[np.ndarray], shift: float) -> dict:
    """``{variant: (N, S, S) float32 probabilities}``: the fold's decoder on ``emb`` with each prompt variant of
    :func:`prompt_variants`."""
    probs = {}
    for name, p in prompt_variants(rm.prompt, shift).items():
        log.info("variant %s", name)
        probs[name], _ = predict_with_iou(rm.sam, emb, gts, p, rm.spec, cfg.size, "cpu")
    return probs


def point_run_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments of the scripts that rescore a point run's fold: ``RUN --data DIR.. --out OUT [--fold N]
    [--shift S]`` (``--shift``: the prompt jitter's, working-frame fraction)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("run")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fold", type=int, default=None)
    ap.add_argument("--shift", type=float, default=0.03)
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = point_run_arguments(__doc__.splitlines()[0]).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rm, cfg, samples = open_point_run(a.run, a.fold, a.data, "move")
    emb, _ = embed_samples(rm.sam, cfg, cfg.checkpoint, samples, "cpu", False, fingerprint=rm.encoder_fingerprint)
    gts = [s.mask for s in samples]
    cleanup = CleanupSpec.from_dict(rm.metrics.get("postprocess"))
    cal = load_calibration(rm.metrics.get("qc"))
    base, base_iou = predict_with_iou(rm.sam, emb, gts, rm.prompt, rm.spec, cfg.size, "cpu")
    probs = jitter_probabilities(rm, cfg, emb, gts, a.shift)
    variants = list(probs)
    rows = []
    for i, s in enumerate(samples):
        mask = clean_mask(base[i] > rm.threshold, cleanup)
        vmasks = {n: clean_mask(pr[i] > rm.threshold, cleanup) for n, pr in probs.items()}
        ious = {n: iou_score(m, mask) for n, m in vmasks.items()}
        union = mask | np.any(list(vmasks.values()), axis=0)
        std = np.std(np.stack([base[i]] + [pr[i] for pr in probs.values()]), axis=0)
        q = cal.assess_map(base[i], rm.threshold, float(base_iou[i]), cleanup, image=s.image) if cal else None
        shifts = [ious[n] for n in ("up", "down", "left", "right")]
        drops = [v for n, v in ious.items() if n.startswith("drop")]
        rows.append({"id": s.id, "f1": f1_score(mask, s.mask), "qc_score": q.score if q else None,
                     "jitter_iou_min": min(ious.values()), "jitter_iou_mean": float(np.mean(list(ious.values()))),
                     "shift_iou_min": min(shifts), "drop_iou_min": min(drops) if drops else None,
                     "jitter_prob_std": float(std[union].mean()) if union.any() else 0.0, "variant_iou": ious})
    bad = [r["f1"] < BAD_BELOW for r in rows]
    signals = {"jitter_iou_min": 1, "jitter_iou_mean": 1, "shift_iou_min": 1, "drop_iou_min": 1,
               "jitter_prob_std": -1, "qc_score": 1}
    table = {}
    qc = np.array([r["qc_score"] for r in rows], float) if cal else None
    for sig, sign in signals.items():
        if rows[0][sig] is None:
            continue
        v = sign * np.array([r[sig] for r in rows], float)
        table[sig] = {"auroc": auroc(list(v), bad),
                      "auroc_with_qc": auroc(list(rank01(v) + rank01(qc)), bad) if qc is not None else None}
    res = {"command": "python results/quality/prompt_jitter_qc.py " + " ".join(argv), "run": str(a.run),
           "fold": rm.fold, "shift": a.shift, "variants": list(variants), "n": len(rows), "bad": int(sum(bad)),
           "f1_mean": float(np.mean([r["f1"] for r in rows])), "detectors": table, "per_image": rows}
    write_json_atomic(Path(a.out + ".json"), res)
    fmt = (lambda x: "–" if x is None else f"{x:.3f}")  # noqa: E731
    md = ["# Prompt-jitter agreement as a quality signal", "", "```console", "$ " + res["command"], "```", "",
          f"{res['n']} images, {res['bad']} with F1 < 0.90 (mean F1 {res['f1_mean']:.4f}); variants: "
          f"{', '.join(variants)} (shift {a.shift} of the frame).", "",
          "| signal | AUROC alone | AUROC, rank mean with qc_score |", "|---|---|---|"]
    md += [f"| {k} | {fmt(v['auroc'])} | {fmt(v['auroc_with_qc'])} |" for k, v in table.items()]
    write_text_atomic(Path(a.out + ".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
