"""Test-time augmentation agreement as a quality signal: a horizontal flip and two gammas, each one more encoder pass.

Usage: python results/quality/tta_qc.py RUN --data DIR --out OUT [--fold N] [--gammas 0.8,1.25 or ""] [--shift 0.03]
       [--no-flip] [--match-histogram]

For every image of ``--data`` (working frame S x S, uint8 RGB): the fold's mask (learned prompt, its threshold and
clean-up) and the masks of augmented copies of the image, each encoded again by the run's encoder:

* ``flip``: the image mirrored left-right (``image[:, ::-1]``), prompted with the mirrored points (x -> 1 - x in
  working-frame fractions), the probability map mirrored back before thresholding;
* ``gamma<g>``: intensities ``255 * (v / 255) ** g`` (the same prompt, the same frame);
* ``histmatch`` (``--match-histogram``): each image's grey levels mapped so that its histogram matches the mean
  histogram of the fold's training images (quantile mapping, :func:`histogram_lut`): the unseen hospital's
  intensities moved onto the training hospital's, without ground truth.

Signals (no ground truth): ``tta_iou_min`` and ``tta_iou_mean``, the IoU of each augmented mask with the fold's
(low is bad), one per variant (``iou_<variant>``), and the prompt-jitter agreement of
``prompt_jitter_qc.py`` (``jitter_iou_mean``, ten decoder runs on the first embedding). Each is scored as a
detector of masks with F1 < 0.90 (AUROC), alone and as a rank mean with the fold's own quality score
(``lungsam-qc/2``), and the rank means are read at a line that flags 10 % of the images (bad masks caught there).
A rank mean uses the scored set's own ranks: an analysis of what the signals could give, not a deployable
calibration.

Segmentation: the F1 of each augmented pass's own mask (``f1_<variant>``, the flip's mirrored back) and of the
TTA ensemble (``f1_ensemble``: the mean probability of the fold's pass and every non-flip variant, the fold's
threshold and clean-up). Writes ``OUT.json`` (strict JSON, per image rows), ``OUT.md`` and, for pairing with
``results/generalisation/pair_evals.py`` against the fold's own masks, ``OUT.f1/<name>.json`` (``{"per_image":
[{"id", "f1"}]}``; names ``base``, each variant, ``ensemble``).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from lungsam.artifacts import write_json_atomic, write_text_atomic
from lungsam.metrics import f1_score, iou_score
from lungsam.postprocess import CleanupSpec, clean_mask
from lungsam.qc import auroc, load_calibration
from lungsam.samples import embed_samples
from lungsam.train.engine import predict_with_iou
from lungsam.train.redecode import fold_parts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompt_jitter_qc import (  # noqa: E402  (the sibling script's)
    jitter_probabilities,
    open_point_run,
    point_run_arguments,
    rank01,
)

log = logging.getLogger("lungsam.tta_qc")
BAD_BELOW = 0.90
FLAG_SHARE = 0.10


def gamma_image(image: np.ndarray, g: float) -> np.ndarray:
    """``(S, S, 3)`` uint8 -> the same with ``255 * (v / 255) ** g`` (rounded)."""
    return np.clip(np.rint(255.0 * (image.astype(np.float32) / 255.0) ** g), 0, 255).astype(np.uint8)


def grey_histogram(image: np.ndarray) -> np.ndarray:
    """``(256,)`` float64 share of pixels at each grey level of an ``(S, S, 3)`` uint8 image (its first channel;
    the data's images are grey replicated to RGB)."""
    return np.bincount(image[..., 0].ravel(), minlength=256) / image[..., 0].size


def histogram_lut(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(256,)`` uint8 lookup table mapping ``image``'s grey levels onto ``reference`` (a ``(256,)`` histogram
    summing to 1): each level goes to the reference level at the same cumulative share (midpoints of the steps)."""
    src = np.cumsum(grey_histogram(image))
    ref = np.cumsum(reference)
    src_mid = src - 0.5 * grey_histogram(image)
    ref_mid = ref - 0.5 * reference
    return np.clip(np.rint(np.interp(src_mid, ref_mid, np.arange(256))), 0, 255).astype(np.uint8)


def matched_image(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``image`` (``(S, S, 3)`` uint8) with its grey levels mapped by :func:`histogram_lut` onto ``reference``."""
    return histogram_lut(image, reference)[image]


def flipped_prompt(prompt):
    """The learned prompt mirrored left-right in working-frame fractions (x -> 1 - x)."""
    pts = prompt.points.copy()
    pts[:, 0] = 1.0 - pts[:, 0]
    return replace(prompt, points=pts.astype(np.float32))


def caught_at_share(score: np.ndarray, bad: np.ndarray, share: float) -> dict:
    """Flag the ``share`` of images with the lowest ``score`` (higher = better): how many, and bad ones caught."""
    k = int(round(share * len(score)))
    flagged = np.zeros(len(score), bool)
    flagged[np.argsort(score, kind="stable")[:k]] = True
    return {"flagged": int(k), "bad_caught": int((flagged & bad).sum()), "bad": int(bad.sum())}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = point_run_arguments(__doc__.splitlines()[0])
    ap.add_argument("--gammas", default="0.8,1.25")
    ap.add_argument("--no-flip", dest="flip", action="store_false", help="leave out the mirrored pass")
    ap.add_argument("--match-histogram", action="store_true",
                    help="add the pass matched to the fold's training images' mean histogram")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rm, cfg, samples = open_point_run(a.run, a.fold, a.data, "mirror")
    gts = [s.mask for s in samples]
    cleanup = CleanupSpec.from_dict(rm.metrics.get("postprocess"))
    cal = load_calibration(rm.metrics.get("qc"))

    def decode(images, prompt):
        views = [replace(s, image=np.ascontiguousarray(im)) for s, im in zip(samples, images)]
        t = time.perf_counter()
        emb, _ = embed_samples(rm.sam, cfg, cfg.checkpoint, views, "cpu", False, fingerprint=rm.encoder_fingerprint)
        log.info("encoded %d images in %.0f s", len(views), time.perf_counter() - t)
        return emb, predict_with_iou(rm.sam, emb, gts, prompt, rm.spec, cfg.size, "cpu")

    emb, (base, base_iou) = decode([s.image for s in samples], rm.prompt)
    tta = {}
    if a.flip:
        tta["flip"] = decode([s.image[:, ::-1] for s in samples], flipped_prompt(rm.prompt))[1][0][:, :, ::-1]
    for g in (float(x) for x in a.gammas.split(",") if x.strip()):
        tta[f"gamma{g:g}"] = decode([gamma_image(s.image, g) for s in samples], rm.prompt)[1][0]
    if a.match_histogram:
        reference = np.mean([grey_histogram(s.image) for s in fold_parts(rm, None, log.info)["train"]], axis=0)
        tta["histmatch"] = decode([matched_image(s.image, reference) for s in samples], rm.prompt)[1][0]
    if not tta:
        raise SystemExit("no augmentation asked for (--no-flip, --gammas '' and no --match-histogram)")
    pooled = [base] + [pr for n, pr in tta.items() if n != "flip"]
    jitter = jitter_probabilities(rm, cfg, emb, gts, a.shift)
    rows = []
    for i, s in enumerate(samples):
        mask = clean_mask(base[i] > rm.threshold, cleanup)
        masks = {n: clean_mask(pr[i] > rm.threshold, cleanup) for n, pr in tta.items()}
        ious = {n: iou_score(m, mask) for n, m in masks.items()}
        jit = [iou_score(clean_mask(pr[i] > rm.threshold, cleanup), mask) for pr in jitter.values()]
        q = cal.assess_map(base[i], rm.threshold, float(base_iou[i]), cleanup, image=s.image) if cal else None
        ensemble = clean_mask(np.mean([pr[i] for pr in pooled], axis=0) > rm.threshold, cleanup)
        rows.append({"id": s.id, "f1": f1_score(mask, s.mask), "qc_score": q.score if q else None,
                     "qc_flag": q.flag if q else None, "tta_iou_min": min(ious.values()),
                     "tta_iou_mean": float(np.mean(list(ious.values()))), "jitter_iou_mean": float(np.mean(jit)),
                     **{f"iou_{n}": v for n, v in ious.items()},
                     **{f"f1_{n}": f1_score(m, s.mask) for n, m in masks.items()},
                     "f1_ensemble": f1_score(ensemble, s.mask)})
    bad = np.array([r["f1"] < BAD_BELOW for r in rows])
    col = {k: np.array([r[k] for r in rows], float) for k in rows[0] if k not in ("id", "qc_flag")}
    f1_dir = Path(a.out + ".f1")
    for name in ["base", *tta, "ensemble"]:
        key = "f1" if name == "base" else f"f1_{name}"
        write_json_atomic(f1_dir / f"{name}.json", {"per_image": [{"id": r["id"], "f1": r[key]} for r in rows]})
    segmentation = {name: {"mean": float(col[key].mean()), "min": float(col[key].min()),
                           "below_0.90": int((col[key] < BAD_BELOW).sum())}
                    for name, key in [("base", "f1"), *[(n, f"f1_{n}") for n in tta], ("ensemble", "f1_ensemble")]}
    singles = ["qc_score", "tta_iou_min", "tta_iou_mean", "jitter_iou_mean"] + [f"iou_{n}" for n in tta]
    combos = {"qc_score + tta_iou_mean": ["qc_score", "tta_iou_mean"],
              "qc_score + tta_iou_min": ["qc_score", "tta_iou_min"],
              "qc_score + iou_flip": ["qc_score", "iou_flip"],
              "qc_score + jitter_iou_mean": ["qc_score", "jitter_iou_mean"],
              "qc_score + tta_iou_mean + jitter_iou_mean": ["qc_score", "tta_iou_mean", "jitter_iou_mean"],
              "tta_iou_mean + jitter_iou_mean": ["tta_iou_mean", "jitter_iou_mean"]}
    combos = {k: v for k, v in combos.items() if all(c in col for c in v)}
    if cal is None:
        singles.remove("qc_score")
        combos = {k: v for k, v in combos.items() if "qc_score" not in v}
    table = {}
    for name in singles:
        table[name] = {"auroc": auroc(list(col[name]), list(bad)), **caught_at_share(col[name], bad, FLAG_SHARE)}
    for name, parts in combos.items():
        v = np.mean([rank01(col[p]) for p in parts], axis=0)
        table[name] = {"auroc": auroc(list(v), list(bad)), **caught_at_share(v, bad, FLAG_SHARE)}
    res = {"command": "python results/quality/tta_qc.py " + " ".join(argv), "run": str(a.run), "fold": rm.fold,
           "variants": list(tta), "jitter_variants": list(jitter), "shift": a.shift, "n": len(rows),
           "bad": int(bad.sum()), "f1_mean": float(np.mean(col["f1"])), "flag_share": FLAG_SHARE,
           "qc_flagged_default": int(sum(bool(r["qc_flag"]) for r in rows)) if cal else None,
           "ensemble_of": ["base", *[n for n in tta if n != "flip"]], "segmentation": segmentation,
           "detectors": table, "per_image": rows}
    write_json_atomic(Path(a.out + ".json"), res)
    md = ["# Test-time augmentation agreement as a quality signal", "", "```console", "$ " + res["command"], "```", "",
          f"{res['n']} images, {res['bad']} with F1 < 0.90 (mean F1 {res['f1_mean']:.4f}); augmentations: "
          f"{', '.join(tta)}; prompt jitter: {len(jitter)} variants (shift {a.shift}).", "",
          f"| signal (rank mean where several) | AUROC | bad caught at {FLAG_SHARE:.0%} flagged |", "|---|---|---|"]
    fmt = (lambda x: "–" if x is None else f"{x:.3f}")  # noqa: E731
    md += [f"| {k} | {fmt(v['auroc'])} | {v['bad_caught']} of {v['bad']} |" for k, v in table.items()]
    md += ["", "Segmentation, each pass's own mask and the ensemble (mean probability of "
           f"{', '.join(res['ensemble_of'])}):", "", "| pass | mean F1 | min F1 | F1 < 0.90 |", "|---|---|---|---|"]
    md += [f"| {k} | {v['mean']:.4f} | {v['min']:.3f} | {v['below_0.90']} |" for k, v in segmentation.items()]
    write_text_atomic(Path(a.out + ".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
