"""The version 2 quality flag measured on dumps of ``scripts/quality_dump.py`` (offline, no torch).

Usage: python scripts/quality_flag_eval.py VAL.npz TRAIN.npz TEST.npz --out OUT.json [--pairs PAIRS.csv]
        [--dev IMAGES.csv] [--signals a,b,...]

Fits :func:`lungsam.qc_fit.fit_quality_model` on VAL (the fold's validation images, their masks and images; the
shape model from TRAIN's ground-truth masks), exactly as ``lungsam train`` does, then scores TEST: AUROC for bad
masks (F1 < 0.90 of the thresholded, cleaned mask against the ground truth), share flagged and bad caught at the
fitted operating point, the bad caught at lines flagging 5/10/15 % of the set, and each signal alone (AUROC in its
bad orientation; ``two_pass_iou`` is measured but not in the model). ``--pairs``: the tuberculosis images apart.
``--dev``: a csv whose first column names the images used while designing the signals: figures are given for all,
for those and for the rest (the held-out part).
"""
from __future__ import annotations

import argparse
import csv
import logging

import numpy as np

from lungsam.artifacts import write_json_atomic
from lungsam.metrics import f1_score
from lungsam.postprocess import CleanupSpec, clean_mask
from lungsam.qc import BAD_SIDE, IMAGE_FEATURES, TWO_PASS, auroc
from lungsam.qc_fit import fit_quality_model

log = logging.getLogger("lungsam.quality_flag_eval")


def load(path: str) -> dict:
    z = np.load(path)
    return {k: z[k] for k in z.files}


def signal_auroc(values: np.ndarray, bad: np.ndarray, name: str) -> float | None:
    """AUROC of one signal in its bad orientation."""
    low_bad = name == TWO_PASS or name in IMAGE_FEATURES or BAD_SIDE.get(name) == "low"
    if BAD_SIDE.get(name) == "both":
        values, low_bad = -np.abs(values - np.median(values)), True
    return auroc(list(values if low_bad else -values), list(bad))


def assess_set(model, d: dict, cleanup: CleanupSpec) -> tuple[list, np.ndarray]:
    """Each image's :class:`lungsam.qc.QcResult` (with the two-pass signal) and its F1."""
    thr = float(d["threshold"])
    res, f1 = [], []
    for i in range(len(d["ids"])):
        p, p2 = d["prob"][i].astype(np.float32), d["prob2"][i].astype(np.float32)
        res.append(model.assess(model.signals(p, thr, float(d["iou"][i]), cleanup, second=p2, image=d["image"][i])))
        f1.append(f1_score(clean_mask(p > thr, cleanup), d["gt"][i]))
    return res, np.asarray(f1)


def figures(res: list, f1: np.ndarray) -> dict:
    """Detection figures of a set of results (see the module docstring)."""
    bad = f1 < 0.90
    scores = np.array([r.score for r in res])
    flags = np.array([r.flag for r in res])
    out = {"n": len(f1), "bad": int(bad.sum()), "f1_mean": round(float(f1.mean()), 4),
           "f1_min": round(float(f1.min()), 4), "auroc": auroc(list(scores), list(bad)), "flagged": int(flags.sum()),
           "flagged_share": round(float(flags.mean()), 4), "bad_caught": int((flags & bad).sum())}
    for q in (0.05, 0.10, 0.15):
        line = np.quantile(scores, q)
        out[f"bad_caught_at_{int(q * 100)}pc_flagged"] = int(((scores <= line) & bad).sum())
    feats = {k: np.array([r.features[k] for r in res]) for k in res[0].features}
    out["signals_alone"] = {k: signal_auroc(v, bad, k) for k, v in feats.items()}
    reasons: dict[str, int] = {}
    for r in res:
        for x in r.reasons:
            reasons[x.split(" ")[0]] = reasons.get(x.split(" ")[0], 0) + 1
    out["reasons"] = reasons
    return out


def first_column(path: str | None) -> set[str] | None:
    if not path:
        return None
    with open(path) as f:
        return {row[0] for row in list(csv.reader(f))[1:]}


def tb_stems(pairs: str | None) -> set[str] | None:
    if not pairs:
        return None
    with open(pairs) as f:
        return {r["stem"] for r in csv.DictReader(f) if r["tb_label_from_filename"].strip() == "1"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("val")
    ap.add_argument("train")
    ap.add_argument("test")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pairs")
    ap.add_argument("--dev")
    ap.add_argument("--signals")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    val, train, test = load(a.val), load(a.train), load(a.test)
    cleanup = CleanupSpec(enabled=True)
    model = fit_quality_model(val["prob"].astype(np.float32), val["iou"], list(val["gt"]), list(train["gt"]),
                              float(val["threshold"]), cleanup, "fold 0 validation images",
                              signals=tuple(a.signals.split(",")) if a.signals else None, images=list(val["image"]))
    res, f1 = assess_set(model, test, cleanup)
    stems = np.array([str(i).split("/")[-1] for i in test["ids"]])
    subsets = {"all": np.ones(len(stems), bool)}
    if (dev := first_column(a.dev)) is not None:
        subsets["dev"] = np.isin(stems, list(dev))
        subsets["held_out"] = ~subsets["dev"]
    if (tb := tb_stems(a.pairs)) is not None:
        subsets["tuberculosis"] = np.isin(stems, list(tb))
        subsets["normal"] = ~subsets["tuberculosis"]
    out = {"model": {**model.to_dict(), "shape": "(in the fold's metrics.json / the bundle; omitted here)"},
           "sets": {k: figures([r for r, s in zip(res, sel) if s], f1[sel]) for k, sel in subsets.items()},
           "per_image": [{"id": str(i), "f1": round(float(x), 5), **r.to_dict(details=True)}
                         for i, x, r in zip(test["ids"], f1, res)]}
    for k, s in out["sets"].items():
        log.info("%s: %s", k, {x: v for x, v in s.items() if x not in ("signals_alone", "reasons")})
    log.info("alone (all): %s", out["sets"]["all"]["signals_alone"])
    log.info("weights %s bias %.3f flag_below %.3f fit %s", {k: round(v, 2) for k, v in model.weights.items()},
             model.bias, model.flag_below, {k: v for k, v in model.fit.items() if k != "degradations"})
    write_json_atomic(a.out, out)


if __name__ == "__main__":
    main()
