"""Signals from the image encoder's own output for the quality flag, measured on an unseen hospital: does the
embedding the runtime already has say which images a fold's mask will get wrong?

Usage: python results/quality/embedding_signals.py RUN EVAL --data DIR --out OUT [--fold 0] [--dev IMAGES_CSV]
       [--pairs PAIRS_CSV]

``RUN``: a trained ``points`` run whose fold carries the jitter term; ``EVAL``: its ``lungsam eval`` of ``--data``
(per image the F1 and the flag's contributions). Every embedding comes from the cache (``LUNGSAM_CACHE``); nothing
is trained but a linear probe. Frames: embeddings ``(C, E, E)`` of square images (no padding), masks compared at
``E x E`` (area average of the working-frame mask, > 0.5). Signals, each fitted on the fold's training images only:

* ``gap_distance``: the Mahalanobis distance of the image's global-average-pooled embedding ``(C,)`` in the top
  :data:`PCA_K` principal components of the training images' (an image unlike the training hospital's);
* ``gap_residual``: the RMS of that vector outside those components;
* ``lung_distance``: the same distance for the embedding averaged inside the returned mask (lung tissue unlike the
  training lungs: dense disease), against the training images' averages inside their ground truth;
* ``probe_iou``: the IoU of the returned mask with a per-pixel linear probe's lung map (logistic regression of the
  training images' ground truth on their standardised embedding pixels, L2, scipy L-BFGS): a second, very different
  reading of the same embedding.

Each is scored alone (AUROC for F1 < 0.90), and as a term added to the flag as the jitter term is (fixed weight 1
log-odds per validation tail scale, centre and scale from the fold's validation images, the line lowered so that at
most the fit's 10 % of good validation images are flagged): AUROC, flagged share and bad masks caught on all images,
the ``--dev`` design set, the rest and the ``--pairs`` tuberculosis images. Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from lungsam.artifacts import read_json, write_json_atomic, write_text_atomic
from lungsam.metrics import iou_score
from lungsam.postprocess import CleanupSpec, clean_mask
from lungsam.qc import Z_CLIP, auroc, tail_scale
from lungsam.runs import load_run
from lungsam.samples import embed_samples, load_data
from lungsam.train.redecode import decode_samples, encoder_config, fold_parts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jitter_floor_eval import BAD_BELOW, detection, stems, unseen_scores, validation_signals  # noqa: E402

PCA_K = 10
PROBE_PIXELS = 120_000
PROBE_L2 = 1e-3
CHUNK = 32
#: Which side of each signal is bad.
BAD_SIDE = {"gap_distance": "high", "gap_residual": "high", "lung_distance": "high", "probe_iou": "low"}
log = logging.getLogger("embedding_signals")


def to_grid(mask: np.ndarray, e: int) -> np.ndarray:
    """``(S, S)`` bool -> ``(E, E)`` bool: the area average of each ``S/E`` block above one half."""
    s = mask.shape[0]
    k = s // e
    return mask.reshape(e, k, e, k).mean(axis=(1, 3)) > 0.5


class Pca:
    """Principal components of row vectors ``(N, D)``: Mahalanobis distance in the top ``k``, RMS residual."""

    def __init__(self, x: np.ndarray, k: int = PCA_K):
        self.mean = x.mean(0)
        u, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.comp = vt[:k]
        self.var = (s[:k] ** 2) / max(len(x) - 1, 1)

    def distance(self, x: np.ndarray) -> np.ndarray:
        c = (x - self.mean) @ self.comp.T
        return np.sqrt(((c ** 2) / self.var).sum(1))

    def residual(self, x: np.ndarray) -> np.ndarray:
        d = x - self.mean
        r = d - (d @ self.comp.T) @ self.comp
        return np.sqrt((r ** 2).mean(1))


class Probe:
    """Per-pixel logistic regression of lung on the standardised embedding ``(C,)`` at each grid cell."""

    def __init__(self, emb: np.ndarray, masks: list[np.ndarray], seed: int = 0):
        e = emb.shape[-1]
        x = emb.astype(np.float32).transpose(0, 2, 3, 1).reshape(-1, emb.shape[1])
        y = np.concatenate([to_grid(m, e).reshape(-1) for m in masks]).astype(np.float64)
        pick = np.random.default_rng(seed).choice(len(x), min(PROBE_PIXELS, len(x)), replace=False)
        x, y = x[pick].astype(np.float64), y[pick]
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mu) / self.sd

        def loss(w):
            t = z @ w[:-1] + w[-1]
            p = 1.0 / (1.0 + np.exp(-t))
            ll = np.logaddexp(0.0, t) - y * t
            g = z.T @ (p - y) / len(y)
            return ll.mean() + 0.5 * PROBE_L2 * (w[:-1] ** 2).sum(), np.append(g + PROBE_L2 * w[:-1], (p - y).mean())

        self.w = minimize(loss, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B",
                          options={"maxiter": 300}).x
        acc = float(((z @ self.w[:-1] + self.w[-1] > 0) == y).mean())
        log.info("probe: %d pixels, training accuracy %.4f", len(y), acc)

    def lung(self, emb: np.ndarray) -> np.ndarray:
        """``(N, C, E, E)`` -> ``(N, E, E)`` bool."""
        z = (emb.astype(np.float64).transpose(0, 2, 3, 1) - self.mu) / self.sd
        return z @ self.w[:-1] + self.w[-1] > 0


def pooled(emb: np.ndarray, grid_masks: list[np.ndarray] | None = None) -> np.ndarray:
    """``(N, C)``: the mean over the grid, or over each image's ``grid_masks`` cells (the whole grid when empty)."""
    if grid_masks is None:
        return emb.astype(np.float64).mean(axis=(2, 3))
    out = []
    for e, m in zip(emb, grid_masks):
        out.append(e.astype(np.float64)[:, m].mean(1) if m.any() else e.astype(np.float64).mean(axis=(1, 2)))
    return np.asarray(out)


def signals_of(rm, cfg, samples, masks_pred: list[np.ndarray], fitted: dict) -> dict[str, np.ndarray]:
    """The four signals of ``samples`` given their returned working-frame masks, in chunks of :data:`CHUNK`."""
    out = {k: [] for k in BAD_SIDE}
    for start in range(0, len(samples), CHUNK):
        sl = slice(start, start + CHUNK)
        emb, _ = embed_samples(rm.sam, cfg, cfg.checkpoint, samples[sl], "cpu", False,
                               fingerprint=rm.encoder_fingerprint)
        e = emb.shape[-1]
        grid = [to_grid(m, e) for m in masks_pred[sl]]
        g = pooled(emb)
        out["gap_distance"] += list(fitted["gap"].distance(g))
        out["gap_residual"] += list(fitted["gap"].residual(g))
        out["lung_distance"] += list(fitted["lung"].distance(pooled(emb, grid)))
        out["probe_iou"] += [iou_score(p, m) for p, m in zip(fitted["probe"].lung(emb), grid)]
    return {k: np.asarray(v) for k, v in out.items()}


def fit_on_training(rm, cfg, train) -> dict:
    """PCA of the pooled embeddings and the probe, from the fold's training images and their ground truth."""
    emb, _ = embed_samples(rm.sam, cfg, cfg.checkpoint, train, "cpu", False, fingerprint=rm.encoder_fingerprint)
    e = emb.shape[-1]
    grid = [to_grid(s.mask, e) for s in train]
    return {"gap": Pca(pooled(emb)), "lung": Pca(pooled(emb, grid)), "probe": Probe(emb, [s.mask for s in train])}


def term(values: np.ndarray, val_values: np.ndarray, side: str) -> np.ndarray:
    """The log-odds term (<= 0) of each value: weight 1 per validation tail scale beyond the validation median."""
    med = float(np.median(val_values))
    scale = max(tail_scale(val_values, med, side), 1e-9)
    d = (values - med) / scale if side == "high" else (med - values) / scale
    return -np.clip(d, 0.0, Z_CLIP)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def returned_masks(decoded, threshold: float, cleanup: CleanupSpec) -> list[np.ndarray]:
    return [clean_mask(p > threshold, cleanup) for p in decoded.probs]


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("eval")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--dev")
    ap.add_argument("--pairs")
    a = ap.parse_args(argv)

    rm = load_run(a.run, a.fold, None)
    cfg = encoder_config(rm)
    cleanup = CleanupSpec.from_dict(rm.metrics.get("postprocess"))
    parts = fold_parts(rm, log=log.info)
    fitted = fit_on_training(rm, cfg, parts["train"])
    cal, val_rows, val_good = validation_signals(a.run, a.fold)
    val = decode_samples(rm, parts["val"])
    val_sig = signals_of(rm, cfg, parts["val"], returned_masks(val, rm.threshold, cleanup), fitted)
    val_logit = logit(np.asarray([cal.assess(r).score for r in val_rows]))

    ev = read_json(Path(a.eval) / "metrics.json")
    rows = ev["per_image"]
    other = {s.id: s for s in load_data(a.data, cfg.size, log.info).samples}
    samples = [other[r["id"]] for r in rows]
    dec = decode_samples(rm, samples)
    sig = signals_of(rm, cfg, samples, returned_masks(dec, rm.threshold, cleanup), fitted)
    f1 = np.asarray([r["f1"] for r in rows])
    bad = f1 < BAD_BELOW
    base_score, base_flag = unseen_scores(rows, cal)
    if abs(float(np.mean([r["qc"]["score"] for r in rows]) - base_score.mean())) > 1e-4:
        raise SystemExit("the eval's scores are not reproduced from its contributions")
    base_logit = logit(base_score)
    empty = np.asarray([r["qc"]["features"].get("area_fraction", 1.0) == 0.0 for r in rows])

    stem = [r["id"].split("/")[-1] for r in rows]
    subsets = {"all": np.ones(len(rows), bool)}
    if a.dev:
        dev = stems(a.dev)
        subsets["design"] = np.asarray([s in dev for s in stem])
        subsets["held out"] = ~subsets["design"]
    if a.pairs:
        tb = stems(a.pairs, tb_only=True)
        subsets["tuberculosis"] = np.asarray([s in tb for s in stem])

    def report(score, flag) -> dict:
        return {k: detection(score[m], flag[m], bad[m]) for k, m in subsets.items()}

    result = {"run": str(a.run), "fold": rm.fold, "eval": str(a.eval), "bad_below": BAD_BELOW, "pca_k": PCA_K,
              "n_train": len(parts["train"]), "n_val": len(parts["val"]),
              "flag": report(base_score, base_flag), "signals": {}}
    for name, side in BAD_SIDE.items():
        v, vv = sig[name], val_sig[name]
        alone = -v if side == "high" else v
        t_val = term(vv, vv, side)
        s_val = 1 / (1 + np.exp(-(val_logit + t_val)))
        line = cal.flag_below
        if val_good.any():
            line = min(line, float(np.quantile(s_val[val_good], cal.fit.get("max_flagged", 0.1))))
        s = 1 / (1 + np.exp(-(base_logit + term(v, vv, side))))
        s[empty] = 0.0
        result["signals"][name] = {
            "bad_side": side, "auroc_alone": auroc(list(alone), list(bad)),
            "median_good": float(np.median(v[~bad])), "median_bad": float(np.median(v[bad])) if bad.any() else None,
            "validation_median": float(np.median(vv)), "line": line,
            "with_term": report(s, empty | (s < line))}
        log.info("%s: alone %s, flag + term %s (flag %s), flagged %.1f %%, medians good %.4f bad %s", name,
                 result["signals"][name]["auroc_alone"], result["signals"][name]["with_term"]["all"]["auroc"],
                 result["flag"]["all"]["auroc"], 100 * result["signals"][name]["with_term"]["all"]["flagged_share"],
                 result["signals"][name]["median_good"], result["signals"][name]["median_bad"])
    result["per_image"] = [{"id": r["id"], "f1": float(x), **{k: float(sig[k][i]) for k in BAD_SIDE}}
                           for i, (r, x) in enumerate(zip(rows, f1))]
    write_json_atomic(a.out + ".json", result)
    write_text_atomic(a.out + ".md", markdown(result))


def markdown(r: dict) -> str:
    subsets = list(r["flag"])
    head = "| signal | AUROC alone | " + " | ".join(f"{k}: AUROC; flagged; caught" for k in subsets) + " |"
    lines = [f"# Embedding signals: `{r['run']}` fold {r['fold']} on `{r['eval']}`", "",
             f"Bad: F1 < {r['bad_below']}. Fitted on the fold's {r['n_train']} training images; terms calibrated on "
             f"its {r['n_val']} validation images (weight 1 per tail scale, line re-set to the fit's cap).", "",
             head, "|" + "---|" * (2 + len(subsets))]

    def num(x) -> str:
        return "–" if x is None else f"{x:.3f}"

    def cells(d: dict) -> str:
        return " | ".join(f"{num(v['auroc'])}; {v['flagged']} ({100 * v['flagged_share']:.1f} %); "
                          f"{v['bad_caught']} of {v['bad']}" for v in d.values())

    lines.append(f"| today's flag | | {cells(r['flag'])} |")
    for name, s in r["signals"].items():
        lines.append(f"| flag + `{name}` | {num(s['auroc_alone'])} | {cells(s['with_term'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
