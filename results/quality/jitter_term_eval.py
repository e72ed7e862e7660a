"""The quality flag with its prompt-jitter term, read off a ``lungsam eval`` of an unseen hospital.

Usage: python results/quality/jitter_term_eval.py EVAL RUN --out OUT [--dev IMAGES_CSV] [--pairs PAIRS_CSV]

``EVAL``: the folder ``lungsam eval`` wrote (its ``metrics.json`` keeps, per image, the flag's signals and each
signal's contribution to the log-odds, ``qc.features`` and ``qc.z``). ``RUN``: the trained run it scored (its fold's
``metrics.json`` ``qc``: bias, ``flag_below`` and the line before the jitter term). Bad mask: F1 < 0.90.

Rows: the deployed flag (``lungsam-qc/2`` with the jitter term at its calibrated weight and line, as the runtime
scores it); the same flag without the term at its own line (what a bundle without the term gives); and, as an
analysis of the weight only (not deployable choices: no line was calibrated for them), the term at other weights,
read by AUROC and by the bad masks caught when the lowest 10 % of scores are flagged. Each on all images, the
``--dev`` design set (the images the version 2 signals were designed on) and the rest (held out), and by the
``--pairs`` tuberculosis label. Writes ``OUT.json`` (strict JSON) and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from lungsam.artifacts import read_json, write_json_atomic, write_text_atomic
from lungsam.layout import FoldLayout
from lungsam.qc import JITTER, auroc, load_calibration
from lungsam.runs import load_run

BAD_BELOW = 0.90
SHARE = 0.10
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)


def stems(path: str) -> set[str]:
    with open(path, newline="") as f:
        return {r["stem"] for r in csv.DictReader(f)}


def tb_stems(path: str) -> set[str]:
    with open(path, newline="") as f:
        return {r["stem"] for r in csv.DictReader(f) if r["tb_label_from_filename"] == "1"}


def scores_at(rows: list[dict], bias: float, factor: float) -> np.ndarray:
    """Each image's score with the jitter term's contribution (at the calibrated weight) times ``factor``."""
    def logit(r):
        z = r["qc"]["z"]
        return bias + sum(v for k, v in z.items() if k != JITTER) + factor * z.get(JITTER, 0.0)

    return 1.0 / (1.0 + np.exp(-np.clip([logit(r) for r in rows], -50, 50)))


def summary(score: np.ndarray, bad: np.ndarray, line: float | None) -> dict:
    out = {"n": int(len(bad)), "bad": int(bad.sum()), "auroc": auroc(list(score), list(bad))}
    k = int(round(SHARE * len(score)))
    low = np.zeros(len(score), bool)
    low[np.argsort(score, kind="stable")[:k]] = True
    out["caught_at_10pc"] = int((low & bad).sum())
    if line is not None:
        flagged = score < line
        out.update(flagged=int(flagged.sum()), flagged_share=float(flagged.mean()),
                   bad_caught=int((flagged & bad).sum()))
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval")
    ap.add_argument("run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dev")
    ap.add_argument("--pairs")
    a = ap.parse_args(argv)
    ev = read_json(Path(a.eval) / "metrics.json")
    rm = load_run(a.run, ev["parts"][0]["fold"], None)
    cal = load_calibration(read_json(FoldLayout(rm.fold_dir).metrics_json)["qc"])
    if getattr(cal, "jitter", None) is None:
        raise SystemExit(f"{a.run}: its quality calibration has no prompt-jitter term")
    rows = ev["per_image"]
    if any(JITTER not in r["qc"]["features"] for r in rows):
        raise SystemExit(f"{a.eval}: not every image carries {JITTER} (evaluated without the term?)")
    stem = np.array([r["id"].split("/")[-1] for r in rows])
    bad = np.array([r["f1"] < BAD_BELOW for r in rows])
    subsets = {"all": np.ones(len(rows), bool)}
    if a.dev:
        dev = np.isin(stem, sorted(stems(a.dev)))
        subsets.update(design=dev, held_out=~dev)
    if a.pairs:
        tb = np.isin(stem, sorted(tb_stems(a.pairs)))
        subsets.update(tuberculosis=tb, normal=~tb)
    w0, before = cal.jitter.weight, cal.fit.get("flag_below_without_jitter", cal.flag_below)
    deployed = scores_at(rows, cal.bias, 1.0)
    recorded = np.array([r["qc"]["score"] for r in rows])
    if not np.allclose(deployed, recorded, atol=1e-4):
        raise SystemExit("the rebuilt scores differ from the evaluation's: another calibration than RUN's?")
    table = {"deployed": {k: summary(deployed[m], bad[m], cal.flag_below) for k, m in subsets.items()},
             "without_jitter": {k: summary(scores_at(rows, cal.bias, 0.0)[m], bad[m], before)
                                for k, m in subsets.items()}}
    for w in WEIGHTS:
        s = scores_at(rows, cal.bias, w / w0 if w0 else 0.0)
        table[f"weight {w:g}"] = {k: summary(s[m], bad[m], None) for k, m in subsets.items()}
    jit = np.array([r["qc"]["features"][JITTER] for r in rows])
    res = {"command": "python results/quality/jitter_term_eval.py " + " ".join(argv), "eval": a.eval, "run": a.run,
           "fold": rm.fold, "jitter": cal.jitter.to_dict(), "flag_below": cal.flag_below,
           "flag_below_without_jitter": before, "n": len(rows), "bad": int(bad.sum()),
           "f1_mean": float(np.mean([r["f1"] for r in rows])),
           "jitter_iou_median": {"good": float(np.median(jit[~bad])), "bad": float(np.median(jit[bad]))},
           "jitter_iou_alone_auroc": auroc(list(jit), list(bad)), "table": table}
    write_json_atomic(Path(a.out + ".json"), res)
    fmt = (lambda x: "–" if x is None else f"{x:.3f}")  # noqa: E731
    md = ["# The quality flag with its prompt-jitter term on an unseen hospital", "", "```console",
          "$ " + res["command"], "```", "",
          f"{res['n']} images, {res['bad']} with F1 < 0.90 (mean F1 {res['f1_mean']:.4f}). Jitter term: weight "
          f"{w0:g}, validation median {cal.jitter.center:.4f}, tail scale {cal.jitter.scale:.4f} ({cal.jitter.n} "
          f"images); line {cal.flag_below:.3f} (without the term {before:.3f}). Jitter IoU alone: AUROC "
          f"{fmt(res['jitter_iou_alone_auroc'])}; median {res['jitter_iou_median']['good']:.4f} on good masks, "
          f"{res['jitter_iou_median']['bad']:.4f} on bad ones.", "",
          "| flag | subset | n (bad) | AUROC | flagged at its line | bad caught there | bad caught at 10 % flagged |",
          "|---|---|---|---|---|---|---|"]
    for name, per in table.items():
        for k, v in per.items():
            line = (f"{v['flagged']} ({v['flagged_share']:.1%})", f"{v['bad_caught']} of {v['bad']}") \
                if "flagged" in v else ("–", "–")
            md.append(f"| {name} | {k} | {v['n']} ({v['bad']}) | {fmt(v['auroc'])} | {line[0]} | {line[1]} | "
                      f"{v['caught_at_10pc']} of {v['bad']} |")
    write_text_atomic(Path(a.out + ".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
