"""Decoders of one encoder as an ensemble: accuracy of their mean and their disagreement as a quality signal.

Usage: python scripts/decoder_ensemble.py MEMBER [MEMBER ...] --data DIR --out OUT [--work DIR]

A MEMBER is ``RUN`` (its best fold) or ``RUN:FOLD``: each a tuned decoder of the same backbone and encoder weights
(a 5-fold run's folds, or runs of different options), so one encoder pass per image serves all of them (the
embeddings come from the cache, ``LUNGSAM_CACHE``). For every image of ``--data`` (working frame S x S):

* each member's probability ``(S, S)``, its own threshold and clean-up (the fold's validation choice): its F1,
  HD95 and its own quality flag (its fold's ``qc`` calibration, as ``lungsam eval`` computes it) as a detector of
  its bad masks (AUROC, share flagged, bad masks caught);
* the **ensemble**: the mean of the members' probabilities, thresholded at the mean of their thresholds and cleaned
  up when most members clean up: F1, IoU, HD95 and ASD (pixels of the working frame, MONAI);
* **disagreement** signals, no ground truth: ``member_iou_min`` / ``member_iou_mean`` (pairwise IoU of the members'
  masks); ``prob_std`` (mean over the union of the members' masks of the per-pixel standard deviation of their
  probabilities), ``ens_soft_fraction`` (pixels of the mean map in (0.2, 0.8) / ensemble mask area), and
  ``mean_qc_score`` (the mean of the members' quality scores).

Each signal is scored as a detector of bad masks (F1 < 0.90) of the ensemble and of the first member: AUROC, and the
rank mean of a signal with the first member's quality score (``qc_score``). ``OUT.json`` (strict JSON, per image
rows) and ``OUT.md``. ``--work DIR`` keeps each member's probabilities (``npz``) so a rerun only scores.
"""
from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path

import numpy as np

from lungsam.artifacts import write_json_atomic, write_text_atomic
from lungsam.boundary import boundary_scores
from lungsam.metrics import f1_score, iou_score, summarize
from lungsam.postprocess import CleanupSpec, clean_mask
from lungsam.qc import auroc, detection_summary, load_calibration
from lungsam.runs import load_run
from lungsam.train.engine import predict_with_iou
from lungsam.train.redecode import encoder_config
from lungsam.train.run import embed_samples, load_data

log = logging.getLogger("lungsam.decoder_ensemble")
BAD_BELOW = 0.90
SOFT = (0.2, 0.8)


def parse_member(text: str) -> tuple[str, int | None]:
    """``RUN`` or ``RUN:FOLD`` -> ``(run folder, fold or None)``."""
    run, sep, fold = text.rpartition(":")
    if sep and fold.isdigit():
        return run, int(fold)
    return text, None


def member_probabilities(member: str, data_dirs: list[str], shared: dict, work: Path | None) -> dict:
    """One member on every image of ``data_dirs``: ``{"name", "ids", "prob" (N, S, S) float16, "iou" (N,),
    "threshold", "cleanup" (CleanupSpec), "qc" (the fold's calibration or None), "images", "gt"}``.

    ``shared`` (empty for the first member) keeps what every member reads alike: the images, loaded once at the
    first member's working size, and their embeddings, computed (or read from the cache) once; a member of another
    encoder or working size is refused, since one encoder pass must serve them all."""
    run, fold = parse_member(member)
    rm = load_run(run, fold, None)
    name = f"{Path(run).name}:{rm.fold}"
    key = (rm.encoder_fingerprint, rm.run["config"].get("encoder_size"), int(rm.run["config"]["size"]))
    if not shared:
        cfg = encoder_config(rm)
        shared.update(key=key, cfg=cfg, samples=load_data(data_dirs, cfg.size, log.info).samples, emb=None)
    elif key != shared["key"]:
        raise SystemExit(f"{member}: another encoder or working size than the first member; an ensemble of "
                         "decoders needs one encoder")
    samples, cfg = shared["samples"], shared["cfg"]
    cached = work / f"{name.replace(':', '_fold')}.npz" if work else None
    if cached and cached.exists():
        z = np.load(cached)
        prob, iou = z["prob"], z["iou"]
    else:
        if shared["emb"] is None:
            shared["emb"], _ = embed_samples(rm.sam, cfg, cfg.checkpoint, samples, "cpu", False,
                                             fingerprint=rm.encoder_fingerprint)
        prob, iou = predict_with_iou(rm.sam, shared["emb"], [s.mask for s in samples], rm.prompt, rm.spec, cfg.size,
                                     "cpu")
        prob = prob.astype(np.float16)
        if cached:
            np.savez(cached, prob=prob, iou=iou)
    return {"name": name, "ids": [s.id for s in samples], "prob": prob, "iou": iou, "threshold": rm.threshold,
            "cleanup": CleanupSpec.from_dict(rm.metrics.get("postprocess")),
            "qc": load_calibration(rm.metrics.get("qc")),
            "images": [s.image for s in samples], "gt": [s.mask for s in samples]}


def member_masks(m: dict) -> list[np.ndarray]:
    return [clean_mask(p.astype(np.float32) > m["threshold"], m["cleanup"]) for p in m["prob"]]


def disagreement(probs: list[np.ndarray], masks: list[np.ndarray], ens_mask: np.ndarray, ens_prob: np.ndarray) -> dict:
    """The ground-truth-free signals of one image from its members' probabilities and masks (module docstring)."""
    pair = [iou_score(a, b) for a, b in itertools.combinations(masks, 2)]
    union = np.any(masks, axis=0)
    std = np.std(np.stack(probs).astype(np.float32), axis=0)
    area = max(int(ens_mask.sum()), 1)
    soft = int(np.count_nonzero((ens_prob > SOFT[0]) & (ens_prob < SOFT[1])))
    return {"member_iou_min": float(min(pair)) if pair else 1.0,
            "member_iou_mean": float(np.mean(pair)) if pair else 1.0,
            "prob_std": float(std[union].mean()) if union.any() else 0.0,
            "ens_soft_fraction": soft / area}


#: Orientation of each signal: +1 when a high value means a good mask.
GOOD_HIGH = {"member_iou_min": 1, "member_iou_mean": 1, "prob_std": -1, "ens_soft_fraction": -1, "qc_score": 1,
             "mean_qc_score": 1}


def rank01(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return (rankdata(x) - 1) / max(len(x) - 1, 1)


def detector_table(rows: list[dict], f1_key: str) -> dict:
    """AUROC of each signal (oriented good-high) and of its rank mean with ``qc_score`` for ``f1_key`` < 0.90."""
    bad = [r[f1_key] < BAD_BELOW for r in rows]
    out = {"bad": int(sum(bad)), "n": len(rows), "auroc": {}, "auroc_with_qc": {}}
    qc = np.array([r["qc_score"] for r in rows], np.float64) if rows and rows[0]["qc_score"] is not None else None
    for sig, sign in GOOD_HIGH.items():
        if rows[0].get(sig) is None:
            continue
        s = sign * np.array([r[sig] for r in rows], np.float64)
        out["auroc"][sig] = auroc(list(s), bad)
        if qc is not None and sig not in ("qc_score", "mean_qc_score"):
            out["auroc_with_qc"][sig] = auroc(list(rank01(s) + rank01(qc)), bad)
    return out


def summary(values: list[float | None]) -> dict:
    """:func:`lungsam.metrics.summarize` of the defined values (an HD95 is ``None`` where one mask is empty)."""
    return summarize(x for x in values if x is not None)


def paired(a: list[float], b: list[float], seed: int = 0) -> dict:
    """Mean of ``a - b`` with a 95 % bootstrap interval (2000 resamples of the images), better / worse counts."""
    d = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (2000, len(d)))].mean(axis=1)
    return {"delta": float(d.mean()), "ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
            "better": int((d > 0).sum()), "worse": int((d < 0).sum())}


def member_quality(m: dict) -> list:
    """The member's own quality flag of each image (:class:`lungsam.qc.QcResult`, its fold's calibration, as
    ``lungsam eval`` computes it), or ``None`` each when the fold has none."""
    if m["qc"] is None:
        return [None] * len(m["prob"])
    return [m["qc"].assess_map(p.astype(np.float32), m["threshold"], float(i), m["cleanup"], image=im)
            for p, i, im in zip(m["prob"], m["iou"], m["images"])]


def member_record(m: dict, masks: list[np.ndarray], qc: list) -> dict:
    """One member's figures on the images: F1, HD95, masks below 0.90 and its quality flag as a detector."""
    f1 = [f1_score(mk, g) for mk, g in zip(masks, m["gt"])]
    hd, _ = boundary_scores(masks, m["gt"])
    rec = {"name": m["name"], "threshold": m["threshold"], "cleanup": m["cleanup"].enabled, "f1": summary(f1),
           "hd95": summary(hd), "below_0.90": int(sum(x < BAD_BELOW for x in f1))}
    if qc[0] is not None:
        rec["qc_detection"] = detection_summary(qc, f1, BAD_BELOW)
    return rec


def evaluate(members: list[dict]) -> dict:
    first = members[0]
    masks = [member_masks(m) for m in members]
    quality = [member_quality(m) for m in members]
    thr = float(np.mean([m["threshold"] for m in members]))
    clean = sum(m["cleanup"].enabled for m in members) * 2 > len(members)
    spec = first["cleanup"] if first["cleanup"].enabled == clean else CleanupSpec(enabled=clean)
    rows, ens_masks = [], []
    for i, image_id in enumerate(first["ids"]):
        probs = [m["prob"][i].astype(np.float32) for m in members]
        ens_prob = np.mean(probs, axis=0)
        ens = clean_mask(ens_prob > thr, spec)
        ens_masks.append(ens)
        gt = first["gt"][i]
        scores = [q[i].score for q in quality if q[i] is not None]
        row = {"id": image_id, "ensemble_f1": f1_score(ens, gt), "ensemble_iou": iou_score(ens, gt),
               "member_f1": [f1_score(mk[i], gt) for mk in masks], "member_qc_score": scores,
               "qc_score": scores[0] if scores else None,
               "mean_qc_score": float(np.mean(scores)) if scores else None,
               **disagreement(probs, [mk[i] for mk in masks], ens, ens_prob)}
        row["first_f1"] = row["member_f1"][0]
        rows.append(row)
    hd, asd = boundary_scores(ens_masks, first["gt"])
    for r, h, a in zip(rows, hd, asd):
        r.update(ensemble_hd95=h, ensemble_asd=a)
    records = [member_record(m, mk, q) for m, mk, q in zip(members, masks, quality)]
    member_means = [r["f1"]["mean"] for r in records]
    aurocs = [r["qc_detection"]["auroc"] for r in records if r.get("qc_detection", {}).get("auroc") is not None]
    return {
        "members": records,
        "over_members": {"f1_mean": float(np.mean(member_means)), "f1_sd": float(np.std(member_means, ddof=1))
                         if len(member_means) > 1 else 0.0,
                         "hd95_mean": float(np.mean([r["hd95"]["mean"] for r in records])),
                         "qc_auroc_mean": float(np.mean(aurocs)) if aurocs else None,
                         "qc_auroc_min": float(min(aurocs)) if aurocs else None,
                         "qc_auroc_max": float(max(aurocs)) if aurocs else None},
        "ensemble": {"threshold": thr, "cleanup": clean, "f1": summary([r["ensemble_f1"] for r in rows]),
                     "iou": summary([r["ensemble_iou"] for r in rows]), "hd95": summary(hd), "asd": summary(asd),
                     "below_0.90": int(sum(r["ensemble_f1"] < BAD_BELOW for r in rows)),
                     "vs_first": paired([r["ensemble_f1"] for r in rows], [r["first_f1"] for r in rows]),
                     "vs_member_mean": float(np.mean([r["ensemble_f1"] for r in rows]) - np.mean(member_means))},
        "first": {"hd95": records[0]["hd95"], "below_0.90": records[0]["below_0.90"]},
        "detect_ensemble_bad": detector_table(rows, "ensemble_f1"),
        "detect_first_bad": detector_table(rows, "first_f1"),
        "per_image": rows,
    }


def markdown(res: dict, argv: list[str]) -> str:
    e, o = res["ensemble"], res["over_members"]
    lines = ["# Decoder ensemble", "", "```console", "$ python scripts/decoder_ensemble.py " + " ".join(argv), "```",
             "", "| member | threshold | clean-up | F1 mean | min | < 0.90 | HD95 px | its qc: AUROC | flagged "
             "| bad caught |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in res["members"]:
        d = m.get("qc_detection") or {}
        au = "–" if d.get("auroc") is None else f"{d['auroc']:.3f}"
        fl = f"{d['flagged']} ({100 * d['flagged_share']:.1f} %)" if d else "–"
        ca = f"{d['bad_caught']} of {d['bad']}" if d else "–"
        lines.append(f"| {m['name']} | {m['threshold']:.2f} | {'on' if m['cleanup'] else 'off'} | "
                     f"{m['f1']['mean']:.4f} | {m['f1']['min']:.3f} | {m['below_0.90']} | {m['hd95']['mean']:.2f} | "
                     f"{au} | {fl} | {ca} |")
    v = e["vs_first"]
    lines += [f"| **ensemble** (mean probability) | {e['threshold']:.2f} | {'on' if e['cleanup'] else 'off'} | "
              f"**{e['f1']['mean']:.4f}** | {e['f1']['min']:.3f} | {e['below_0.90']} | {e['hd95']['mean']:.2f} | "
              "| | |", "",
              f"Over the members: F1 {o['f1_mean']:.4f} (sd of the members' means {o['f1_sd']:.4f}), HD95 "
              f"{o['hd95_mean']:.2f} px" + ("" if o["qc_auroc_mean"] is None else
                                             f", their own quality flags' AUROC {o['qc_auroc_mean']:.3f} "
                                             f"({o['qc_auroc_min']:.3f}-{o['qc_auroc_max']:.3f})") + ".", "",
              f"Ensemble: F1 {e['f1']['mean']:.4f} ± {e['f1']['std']:.4f}, IoU {e['iou']['mean']:.4f}, HD95 "
              f"{e['hd95']['mean']:.2f} px (first member {res['first']['hd95']['mean']:.2f}), "
              f"ASD {e['asd']['mean']:.2f} px; {e['below_0.90']} images below 0.90 "
              f"(first member {res['first']['below_0.90']}). Paired against the first member: {v['delta']:+.4f} "
              f"(95 % CI {v['ci95'][0]:+.4f}..{v['ci95'][1]:+.4f}), {v['better']} "
              f"better / {v['worse']} worse; against the members' mean F1: {e['vs_member_mean']:+.4f}.", "",
              "| detector of F1 < 0.90 (AUROC) | ensemble's masks | first member's masks |", "|---|---|---|"]
    de, d1 = res["detect_ensemble_bad"], res["detect_first_bad"]
    for sig in de["auroc"]:
        fmt = (lambda x: "–" if x is None else f"{x:.3f}")
        lines.append(f"| {sig} | {fmt(de['auroc'][sig])} | {fmt(d1['auroc'][sig])} |")
    for sig in de["auroc_with_qc"]:
        fmt = (lambda x: "–" if x is None else f"{x:.3f}")
        lines.append(f"| rank mean of {sig} and qc_score | {fmt(de['auroc_with_qc'][sig])} | "
                     f"{fmt(d1['auroc_with_qc'][sig])} |")
    lines += ["", f"Bad masks: {de['bad']} of {de['n']} (ensemble), {d1['bad']} of {d1['n']} (first member). "
              "qc_score is the first member's own flag (its fold's calibration)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("members", nargs="+")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--out", required=True, help="OUT: writes OUT.json and OUT.md")
    ap.add_argument("--work", help="folder that keeps each member's probabilities")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(a.work) if a.work else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
    shared: dict = {}
    members = [member_probabilities(m, a.data, shared, work) for m in a.members]
    res = evaluate(members)
    res["command"] = "python scripts/decoder_ensemble.py " + " ".join(argv)
    write_json_atomic(Path(a.out + ".json"), res)
    write_text_atomic(Path(a.out + ".md"), markdown(res, argv))
    print(markdown(res, argv))


if __name__ == "__main__":
    main()
