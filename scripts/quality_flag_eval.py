"""The version 2 quality flag measured on dumps of :mod:`scripts.quality_dump` (offline, no torch).

Usage: python scripts/quality_flag_eval.py VAL.npz TRAIN.npz TEST.npz [TEST.npz ...] --out OUT.json
        [--pairs PAIRS.csv] [--signals a,b,...] [--two-pass]

Fits :func:`lungsam.qc_fit.fit_quality_model` on VAL (the fold's validation images; shape model from TRAIN's
ground-truth masks), then scores every TEST set: AUROC for bad masks (F1 < 0.90, F1 of the thresholded and cleaned
mask against the ground truth), share flagged and bad caught at the fitted operating point, and each signal alone
(AUROC in its bad orientation). ``--two-pass`` also reports the two-pass agreement alone (it is not in the model).
"""
from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np

from lungsam.artifacts import write_json_atomic
from lungsam.metrics import f1_score
from lungsam.postprocess import CleanupSpec, clean_mask
from lungsam.qc import BAD_SIDE, TWO_PASS, auroc
from lungsam.qc_fit import fit_quality_model

log = logging.getLogger("lungsam.quality_flag_eval")
LOW_IS_BAD = {"shape_residual": False, "shape_distance": False, TWO_PASS: True}


def load(path: str) -> dict:
    z = np.load(path)
    return {k: z[k] for k in z.files}


def signal_auroc(values: np.ndarray, bad: np.ndarray, name: str) -> float | None:
    """AUROC of one signal in its bad orientation (``score`` = high for good)."""
    low_bad = LOW_IS_BAD.get(name, BAD_SIDE.get(name) == "low")
    if BAD_SIDE.get(name) == "both":
        values = -np.abs(values - np.median(values))
        low_bad = True
    return auroc(list(values if low_bad else -values), list(bad))


def score_set(model, d: dict, cleanup: CleanupSpec, tb: set[str] | None) -> dict:
    thr = float(d["threshold"])
    res, f1 = [], []
    for p, iou, p2, gt in zip(d["prob"], d["iou"], d["prob2"], d["gt"]):
        p, p2 = p.astype(np.float32), p2.astype(np.float32)
        res.append(model.assess(model.signals(p, thr, float(iou), cleanup, second=p2)))
        f1.append(f1_score(clean_mask(p > thr, cleanup), gt))
    f1 = np.asarray(f1)
    bad = f1 < 0.90
    scores = np.array([r.score for r in res])
    flags = np.array([r.flag for r in res])
    feats = {k: np.array([r.features[k] for r in res]) for k in res[0].features}
    out = {"n": len(f1), "bad": int(bad.sum()), "f1_mean": float(f1.mean()), "f1_min": float(f1.min()),
           "auroc": auroc(list(scores), list(bad)), "flagged": int(flags.sum()), "flagged_share": float(flags.mean()),
           "bad_caught": int((flags & bad).sum()),
           "signals_alone": {k: signal_auroc(v, bad, k) for k, v in feats.items()}}
    for q in (0.05, 0.10, 0.15):  # the line that flags a share q of this set (not the operating point)
        line = np.quantile(scores, q)
        out[f"caught_at_{int(q * 100)}pc_flagged"] = int(((scores <= line) & bad).sum())
    if tb is not None:
        is_tb = np.array([i.split("/")[-1] in tb for i in d["ids"]])
        out["tuberculosis"] = {"n": int(is_tb.sum()), "bad": int((bad & is_tb).sum()),
                               "auroc": auroc(list(scores[is_tb]), list(bad[is_tb])),
                               "flagged": int((flags & is_tb).sum()), "bad_caught": int((flags & bad & is_tb).sum())}
    reasons: dict[str, int] = {}
    for r in res:
        for x in r.reasons:
            reasons[x.split(" ")[0]] = reasons.get(x.split(" ")[0], 0) + 1
    out["reasons"] = reasons
    out["per_image"] = [{"id": str(i), "f1": round(float(a), 5), **r.to_dict(details=True)}
                        for i, a, r in zip(d["ids"], f1, res)]
    return out


def tb_stems(pairs: str | None) -> set[str] | None:
    if not pairs:
        return None
    with open(pairs) as f:
        rows = list(csv.DictReader(f))
    key = next(k for k in rows[0] if "tb" in k.lower() or "label" in k.lower() or "finding" in k.lower())
    stem = next(iter(rows[0]))
    return {r[stem] for r in rows if r[key].strip().lower() not in ("0", "normal", "false", "")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("val")
    ap.add_argument("train")
    ap.add_argument("tests", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pairs")
    ap.add_argument("--signals")
    ap.add_argument("--cleanup-on", action="store_true", default=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    val, train = load(a.val), load(a.train)
    cleanup = CleanupSpec(enabled=a.cleanup_on)
    sig = tuple(a.signals.split(",")) if a.signals else None
    model = fit_quality_model(val["prob"].astype(np.float32), val["iou"], list(val["gt"]), list(train["gt"]),
                              float(val["threshold"]), cleanup, "validation", signals=sig)
    out = {"model": model.to_dict(), "sets": {}}
    out["model"]["shape"] = "(omitted)"
    for t in a.tests:
        s = score_set(model, load(t), cleanup, tb_stems(a.pairs))
        out["sets"][Path(t).stem] = s
        log.info("%s: %s", Path(t).stem, {k: v for k, v in s.items() if k not in ("per_image",)})
    log.info("weights %s bias %.3f flag_below %.3f fit %s", {k: round(v, 2) for k, v in model.weights.items()},
             model.bias, model.flag_below, model.fit)
    write_json_atomic(a.out, out)


if __name__ == "__main__":
    main()
