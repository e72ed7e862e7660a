"""The floor of the prompt-jitter term's validation scale, swept: each floor's term and line re-derived from the
run's own validation images exactly as training derives them, then read off an unseen hospital's ``lungsam eval``.

Usage: python results/quality/jitter_floor_eval.py RUN EVAL --out OUT [--floors 0.005,0.01] [--fold 0]
       [--dev IMAGES_CSV] [--pairs PAIRS_CSV]

``RUN``: a trained ``points`` run whose fold carries a jitter term (``metrics.json`` ``qc.jitter``); its validation
images are decoded again on the cached embeddings (``LUNGSAM_CACHE``) with the calibration's variants. ``EVAL``: the
folder ``lungsam eval RUN --data OTHER`` wrote (per image the flag's signals, each one's contribution to the
log-odds and the F1). For each floor: ``qc_fit.add_jitter_term(model without the term, validation signals,
min_scale=floor)``, i.e. the term's scale ``max(validation tail scale, floor)`` and the line lowered to flag at
most 10 % of the good validation images; every unseen image's score is then its logistic part (read from the
eval) plus the new term, flagged below the new line or when its mask is empty. Self-checks: the run's own floor
reproduces the fold's calibration (centre, scale, line) and the eval's scores. Bad mask: F1 < 0.90. Rows: AUROC,
images flagged, bad masks caught, on all images, the ``--dev`` design set, the rest (held out) and the ``--pairs``
tuberculosis images. Writes ``OUT.json`` (strict JSON) and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import numpy as np

from lungsam.artifacts import read_json, write_json_atomic, write_text_atomic
from lungsam.postprocess import CleanupSpec
from lungsam.qc import JITTER, JITTER_MIN_SCALE, QcModel, auroc, load_calibration
from lungsam.qc_fit import add_jitter_term
from lungsam.runs import load_run
from lungsam.train.engine import score
from lungsam.train.folds import variant_maps_per_image
from lungsam.train.redecode import calibrated_jitter, decode_samples, fold_parts

BAD_BELOW = 0.90
FLOORS = (0.005, 0.0075, 0.01, 0.015, 0.02)
log = logging.getLogger("jitter_floor_eval")


def stems(path: str, tb_only: bool = False) -> set[str]:
    with open(path, newline="") as f:
        return {r["stem"] for r in csv.DictReader(f) if not tb_only or r["tb_label_from_filename"] == "1"}


def validation_signals(run_dir: str, fold: int) -> tuple[QcModel, list[dict], np.ndarray]:
    """The fold's calibration, its validation images' signals with the jitter IoU (decoded again with the
    calibration's variants) and which of them are good (F1 >= 0.90 at the fold's threshold and clean-up)."""
    rm = load_run(run_dir, fold, None)
    cal = load_calibration(rm.metrics.get("qc"))
    if not isinstance(cal, QcModel) or cal.jitter is None:
        raise SystemExit(f"{run_dir} fold {fold}: no lungsam-qc/2 calibration with a prompt-jitter term")
    val = decode_samples(rm, fold_parts(rm, log=log.info)["val"], calibrated_jitter(rm))
    cleanup = CleanupSpec.from_dict(rm.metrics.get("postprocess"))
    base = cal.without_jitter()
    rows = [base.signals(p, rm.threshold, float(i), cleanup, image=im, variants=v)
            for p, i, im, v in zip(val.probs, val.iou, val.images, variant_maps_per_image(val.jitter, len(val.probs)))]
    f1, _ = score(val.probs, val.masks, rm.threshold, cleanup)
    return cal, rows, np.asarray(f1) >= cal.fit.get("bad_below", BAD_BELOW)


def unseen_scores(per_image: list[dict], model: QcModel) -> tuple[np.ndarray, np.ndarray]:
    """``(score, flag)`` per eval row under ``model``: the eval's logistic contributions (every signal but the
    jitter IoU) plus ``model``'s jitter term on the row's jitter IoU (none for a model without the term)."""
    out, flags = [], []
    for r in per_image:
        q = r["qc"]
        logit = model.bias + sum(v for k, v in q["z"].items() if k != JITTER)
        if model.jitter is not None:
            logit += model.jitter.contribution(float(q["features"][JITTER]))
        empty = q["features"].get("area_fraction", 1.0) == 0.0
        s = 0.0 if empty else float(1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50))))
        out.append(s)
        flags.append(empty or s < model.flag_below)
    return np.asarray(out), np.asarray(flags)


def detection(score: np.ndarray, flag: np.ndarray, bad: np.ndarray) -> dict:
    return {"n": int(len(score)), "bad": int(bad.sum()), "auroc": auroc(list(score), list(bad)),
            "flagged": int(flag.sum()), "flagged_share": float(flag.mean()) if len(flag) else None,
            "bad_caught": int((flag & bad).sum())}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("eval")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--floors", default=",".join(map(str, FLOORS)))
    ap.add_argument("--dev", default=None)
    ap.add_argument("--pairs", default=None)
    a = ap.parse_args(argv)
    floors = [float(x) for x in a.floors.split(",")]
    cal, rows, good = validation_signals(a.run, a.fold)
    ev = read_json(Path(a.eval) / "metrics.json")
    per_image = [r for r in ev["per_image"] if r.get("qc") is not None]
    stem = np.asarray([r["id"].split("/")[-1] for r in per_image])
    bad = np.asarray([r["f1"] < BAD_BELOW for r in per_image])
    subsets = {"all": np.ones(len(per_image), bool)}
    if a.dev:
        dev = np.isin(stem, list(stems(a.dev)))
        subsets.update({"design": dev, "held_out": ~dev})
    if a.pairs:
        subsets["tb"] = np.isin(stem, list(stems(a.pairs, tb_only=True)))

    base = cal.without_jitter()
    own = add_jitter_term(base, rows, good, cal.jitter.shift, cal.jitter.variants, cal.jitter.weight,
                          JITTER_MIN_SCALE)
    check = {"center": abs(own.jitter.center - cal.jitter.center), "scale": abs(own.jitter.scale - cal.jitter.scale),
             "flag_below": abs(own.flag_below - cal.flag_below)}
    if max(check.values()) > 1e-6:
        raise SystemExit(f"the re-derived calibration differs from the fold's: {check}")
    s_own, _ = unseen_scores(per_image, cal)
    stored = np.asarray([r["qc"]["score"] for r in per_image])
    if not np.abs(s_own - stored).max() < 1e-4:
        raise SystemExit(f"rescored eval differs from its stored scores by {np.abs(s_own - stored).max():.2g}")
    val_jitter = np.asarray([r[JITTER] for r in rows])
    record = {"run": str(a.run), "eval": str(a.eval), "fold": a.fold, "bad_below": BAD_BELOW,
              "validation": {"n": int(len(rows)), "good": int(good.sum()),
                             "jitter_median": float(np.median(val_jitter)),
                             "jitter_p10": float(np.quantile(val_jitter, 0.1)),
                             "tail_scale": float((np.median(val_jitter) - np.quantile(val_jitter, 0.1)) / 1.2816)},
              "line_without_jitter": base.flag_below, "floors": []}
    s0, f0 = unseen_scores(per_image, base)  # without the term, at the line the model had before it
    record["without_jitter"] = {k: detection(s0[m], f0[m], bad[m]) for k, m in subsets.items()}
    for floor in floors:
        m = add_jitter_term(base, rows, good, cal.jitter.shift, cal.jitter.variants, cal.jitter.weight, floor)
        s, f = unseen_scores(per_image, m)
        record["floors"].append({"floor": floor, "scale": m.jitter.scale, "flag_below": m.flag_below,
                                 "validation_flagged_share": m.fit["real_flagged_share"],
                                 **{k: detection(s[mk], f[mk], bad[mk]) for k, mk in subsets.items()}})
    write_json_atomic(Path(f"{a.out}.json"), record)
    write_text_atomic(Path(f"{a.out}.md"), markdown(record, list(subsets)))
    print(markdown(record, list(subsets)))


def cell(d: dict) -> str:
    au = "-" if d["auroc"] is None else f"{d['auroc']:.3f}"
    return f"{au}; {d['flagged']} ({100 * d['flagged_share']:.1f} %), {d['bad_caught']}/{d['bad']}"


def markdown(rec: dict, subsets: list[str]) -> str:
    v = rec["validation"]
    head = " | ".join(subsets)
    lines = [f"Run `{rec['run']}` fold {rec['fold']}, scored by `{rec['eval']}`; validation: {v['n']} images "
             f"({v['good']} good), jitter IoU median {v['jitter_median']:.4f}, 10th percentile {v['jitter_p10']:.4f}, "
             f"tail scale {v['tail_scale']:.4f}. Cells: AUROC (F1 < {rec['bad_below']}); images flagged at the line; "
             "bad masks caught / bad.", "",
             f"| floor | scale | line | validation flagged | {head} |",
             "|---|---|---|---|" + "---|" * len(subsets),
             f"| no jitter term | | {rec['line_without_jitter']:.3f} | | "
             + " | ".join(cell(rec["without_jitter"][k]) for k in subsets) + " |"]
    for f in rec["floors"]:
        lines.append(f"| {f['floor']:g} | {f['scale']:.4f} | {f['flag_below']:.3f} | "
                     f"{100 * f['validation_flagged_share']:.1f} % | " + " | ".join(cell(f[k]) for k in subsets) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
