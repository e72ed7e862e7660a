"""The quality flag as a detector of bad masks, from a ``lungsam eval`` metrics.json (per-image ``qc`` details).

Usage: python scripts/quality_qc.py EVAL_DIR OUT.json [--pairs PAIRS.csv]

Writes per signal the AUROC of its deviation ``z`` alone (the calibrated normal range, validation only) for
masks with F1 < 0.90, the AUROC of the combined score, and the share flagged / bad caught at several flag lines
``z_flag`` (the default, 4, is the operating point). With ``--pairs`` (the data set's pairs.csv) it adds the
tuberculosis and normal images apart.
"""
from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np

from lungsam.artifacts import write_json_atomic
from lungsam.qc import DEFAULT_Z_FLAG, auroc

log = logging.getLogger("lungsam.quality_qc")


def operating_point(z_max: np.ndarray, empty: np.ndarray, bad: np.ndarray, z_flag: float) -> dict:
    flag = (z_max > z_flag) | empty
    n_bad = int(bad.sum())
    return {"z_flag": z_flag, "flagged": int(flag.sum()), "flagged_share": float(flag.mean()),
            "bad_caught": int((flag & bad).sum()),
            "bad_caught_share": float((flag & bad).sum() / n_bad) if n_bad else None}


def analyse(rows: list[dict], bad_below: float = 0.90) -> dict:
    f1 = np.array([r["f1"] for r in rows])
    bad = f1 < bad_below
    z = {k: np.array([r["qc"]["z"][k] for r in rows]) for k in rows[0]["qc"]["z"]}
    feats = {k: np.array([r["qc"]["features"][k] for r in rows]) for k in rows[0]["qc"]["features"]}
    z_max = np.max(np.stack(list(z.values())), axis=0)
    empty = feats["area_fraction"] == 0
    scores = np.array([r["qc"]["score"] for r in rows])
    from scipy.stats import spearmanr

    return {
        "n": len(rows), "bad_below": bad_below, "bad": int(bad.sum()), "f1_mean": float(f1.mean()),
        "f1_min": float(f1.min()),
        "auroc_score": auroc(list(scores), list(bad)),
        "spearman_score_f1": float(spearmanr(scores, f1).statistic),
        "auroc_by_signal_z": {k: auroc(list(-v), list(bad)) for k, v in z.items()},
        "auroc_by_signal_raw": {k: max(auroc(list(v), list(bad)) or 0, auroc(list(-v), list(bad)) or 0)
                                for k, v in feats.items()},
        "auroc_pred_iou_alone": auroc(list(feats["pred_iou"]), list(bad)),
        "operating_points": [operating_point(z_max, empty, bad, t) for t in (2.0, 3.0, DEFAULT_Z_FLAG, 5.0, 6.0, 8.0)],
        "default_z_flag": DEFAULT_Z_FLAG,
        "flagged_reasons": _reason_counts(rows),
    }


def _reason_counts(rows: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for r in rows:
        for reason in r["qc"]["reasons"]:
            key = reason.split(" ")[0] if not reason.startswith("empty") else "empty mask"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main(argv: list[str]) -> None:
    eval_dir, out = Path(argv[0]), Path(argv[1])
    m = json.loads((eval_dir / "metrics.json").read_text())
    rows = [r for r in m["per_image"] if r.get("qc")]
    res = {"eval": str(eval_dir), "model": m["model"], "all": analyse(rows)}
    if "--pairs" in argv:
        labels = {}
        with open(argv[argv.index("--pairs") + 1], newline="") as f:
            for rec in csv.DictReader(f):
                stem = Path(rec.get("image") or rec.get("stem") or next(iter(rec.values()))).stem
                labels[stem] = rec.get("tb_label_from_filename")
        for name, lab in (("tuberculosis", "1"), ("normal", "0")):
            sub = [r for r in rows if labels.get(r["id"].split("/")[-1]) == lab]
            if sub:
                res[name] = analyse(sub)
        worst = sorted((r for r in rows if labels.get(r["id"].split("/")[-1]) == "1"), key=lambda r: r["f1"])[:20]
        res["tuberculosis_worst20"] = {"ids": [r["id"] for r in worst],
                                       "f1_mean": float(np.mean([r["f1"] for r in worst])),
                                       "flagged": sum(r["qc"]["flag"] for r in worst)}
    write_json_atomic(out, res)
    a = res["all"]
    log.info(f"{a['n']} images, {a['bad']} with F1 < {a['bad_below']}: AUROC {a['auroc_score']:.3f} "
             f"(predicted IoU alone {a['auroc_pred_iou_alone']:.3f}); by signal: "
             + ", ".join(f"{k} {v:.3f}" for k, v in a["auroc_by_signal_z"].items() if v is not None))
    for op in a["operating_points"]:
        log.info(f"  z_flag {op['z_flag']}: flagged {op['flagged_share']:.1%}, "
                 f"bad caught {op['bad_caught']}/{a['bad']}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1:])
