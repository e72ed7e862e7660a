"""Which prompt variants the jitter term needs: every subset rule scored as the deployed term is (weight 1, centre
and tail scale from the fold's validation images), on an unseen hospital, with the runtime cost it implies.

Usage: python results/quality/jitter_variant_sets.py RUN EVAL --data DIR --out OUT [--dev IMAGES_CSV]

``RUN``: a ``points`` run whose fold calibration has the jitter term; ``EVAL``: its ``lungsam eval`` of ``--data``
(per image the flag's contributions). For the fold's validation images and every image of ``--data`` the decoder is
rerun with each variant (cached embeddings); per subset (all ten, the four moves, the six dropped points) the
agreement is recomputed, its term calibrated on the validation images and added to the flag's other
contributions. AUROC (F1 < 0.90) on all images, the ``--dev`` design set and the rest. No operating point: the
subsets are compared by ranking only. Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from lungsam.artifacts import read_json, write_json_atomic, write_text_atomic
from lungsam.metrics import iou_score
from lungsam.postprocess import CleanupSpec, clean_mask
from lungsam.prompts import jitter_prompts
from lungsam.qc import JITTER, JitterTerm, auroc, load_calibration
from lungsam.samples import embed_samples, load_data
from lungsam.train.engine import predict_variants, predict_with_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompt_jitter_qc import open_point_run  # noqa: E402

SUBSETS = {"all ten": None, "four moves": ("up", "down", "left", "right"), "six dropped points": "drop"}


def per_variant_iou(rm, cfg, samples, cleanup) -> tuple[np.ndarray, list[str]]:
    """``(N, V)`` IoU of each variant's cleaned mask with the image's own, and the variant names."""
    emb, _ = embed_samples(rm.sam, cfg, cfg.checkpoint, samples, "cpu", False, fingerprint=rm.encoder_fingerprint)
    gts = [s.mask for s in samples]
    names = tuple(jitter_prompts(rm.prompt, 0.03))  # the whole family: all ten
    out = []
    for start in range(0, len(samples), 32):
        sl = slice(start, start + 32)
        base, _ = predict_with_iou(rm.sam, emb[sl], gts[sl], rm.prompt, rm.spec, cfg.size, "cpu")
        var = predict_variants(rm.sam, emb[sl], gts[sl], rm.prompt, rm.spec, cfg.size, "cpu", 0.03, names)
        for j in range(len(base)):
            m = clean_mask(base[j] > rm.threshold, cleanup)
            out.append([iou_score(clean_mask(v[j] > rm.threshold, cleanup), m) for v in var])
    return np.asarray(out), list(names)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("eval")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dev")
    a = ap.parse_args(argv)
    rm, cfg, samples = open_point_run(a.run, None, a.data, "jitter")
    cal = load_calibration(rm.metrics["qc"])
    if getattr(cal, "jitter", None) is None:
        raise SystemExit(f"{a.run}: no jitter term")
    cleanup = CleanupSpec.from_dict(rm.metrics.get("postprocess"))
    val_ids = set(rm.split["val"])
    val_samples = [s for s in load_data(rm.run["config"]["data"], cfg.size, lambda m: None).samples if s.id in val_ids]
    v_val, names = per_variant_iou(rm, cfg, val_samples, cleanup)
    v_test, _ = per_variant_iou(rm, cfg, samples, cleanup)
    ev = {r["id"]: r for r in read_json(Path(a.eval) / "metrics.json")["per_image"]}
    rows = [ev[s.id] for s in samples]
    rest = np.array([cal.bias + sum(v for k, v in r["qc"]["z"].items() if k != JITTER) for r in rows])
    bad = [r["f1"] < 0.90 for r in rows]
    stems = np.array([s.id.split("/")[-1] for s in samples])
    subsets = {"all": np.ones(len(rows), bool)}
    if a.dev:
        with open(a.dev, newline="") as f:
            dev = np.isin(stems, [r["stem"] for r in csv.DictReader(f)])
        subsets.update(design=dev, held_out=~dev)
    table = {}
    for name, rule in SUBSETS.items():
        cols = [i for i, n in enumerate(names) if rule is None or (n.startswith(rule) if isinstance(rule, str)
                                                                     else n in rule)]
        term = JitterTerm.calibrate(v_val[:, cols].mean(1), 0.03, [names[i] for i in cols])
        j = v_test[:, cols].mean(1)
        score = 1 / (1 + np.exp(-(rest + np.array([term.contribution(x) for x in j]))))
        table[name] = {"variants": len(cols), "center": term.center, "scale": term.scale,
                       **{k: auroc(list(score[m]), [b for b, mm in zip(bad, m) if mm]) for k, m in subsets.items()},
                       "alone_all": auroc(list(j), bad)}
    res = {"command": "python results/quality/jitter_variant_sets.py " + " ".join(argv), "n": len(rows),
           "bad": int(sum(bad)), "table": table}
    write_json_atomic(Path(a.out + ".json"), res)
    keys = list(subsets)
    md = ["# Which prompt variants the jitter term needs", "", "```console", "$ " + res["command"], "```", "",
          f"{res['n']} images, {res['bad']} with F1 < 0.90; AUROC of the flag with the term made of each subset.", "",
          "| variants | decodes | " + " | ".join(keys) + " | agreement alone (all) |",
          "|---|---|" + "---|" * len(keys) + "---|"]
    md += [f"| {k} | {v['variants']} | " + " | ".join(f"{v[s]:.3f}" for s in keys) + f" | {v['alone_all']:.3f} |"
           for k, v in table.items()]
    write_text_atomic(Path(a.out + ".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
