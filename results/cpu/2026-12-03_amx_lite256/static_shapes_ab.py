"""OpenVINO's static-shape compilations (``lungsam.runtime.openvino_backend.OvModel``) against the dynamic model alone,
side by side: two segmenters on the same bundle, backend and precision, one with ``static_shapes`` set to 0 on every
model, ``segment`` alternating image by image (the order flips each image), after one warm-up pass.

Usage: python results/cpu/2026-12-03_amx_lite256/static_shapes_ab.py BUNDLE --data DIR --out OUT
       [--precision fp32|bf16] [--images N] [--repeats R] [--threads T]
Writes OUT.json (strict JSON: median seconds per stage, the masks' agreement between the two) and OUT.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lungsam.artifacts import write_json_atomic, write_text_atomic
from lungsam.cpufeatures import cpu_features
from lungsam.metrics import f1_score
from lungsam.runtime.segmenter import LungSegmenter

STAGES = ("preprocess_s", "encode_s", "decode_s", "postprocess_s", "total_s")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    segs = {k: LungSegmenter.load(a.bundle, backend="openvino", precision=a.precision, threads=a.threads)
            for k in ("static", "dynamic")}
    for m in segs["dynamic"]._models.values():
        m.static_shapes = 0  # every call on the dynamic compilation, as before static shapes
    paths = sorted((Path(a.data) / "images").iterdir())[:a.images]
    times = {k: {s: [] for s in STAGES} for k in segs}
    agree = []
    for rep in range(a.repeats + 1):
        for i, p in enumerate(paths):
            order = ("static", "dynamic") if (i + rep) % 2 == 0 else ("dynamic", "static")
            res = {k: segs[k].segment(p) for k in order}
            if rep:
                for k, r in res.items():
                    for s in STAGES:
                        times[k][s].append(r.timings[s])
                agree.append(f1_score(res["static"].mask, res["dynamic"].mask))
    med = {k: {s: float(np.median(v)) for s, v in t.items()} for k, t in times.items()}
    out = {"command": "python results/cpu/2026-12-03_amx_lite256/static_shapes_ab.py " + " ".join(argv),
           "precision": a.precision, "threads": a.threads, "images": len(paths), "repeats": a.repeats,
           "median_s": med, "ratio_total": med["static"]["total_s"] / med["dynamic"]["total_s"],
           "mask_agreement": {"mean": float(np.mean(agree)), "min": float(np.min(agree))},
           "static_shapes_compiled": {n: [list(map(list, k)) for k in m.static_compiled]
                                      for n, m in segs["static"]._models.items()},
           "cpu": cpu_features()}
    write_json_atomic(Path(a.out + ".json"), out)
    md = [f"OpenVINO {a.precision}, {len(paths)} images x {a.repeats} passes, {a.threads} threads, median s per image "
          "(segment, the quality flag's ten variant decodes included):", "",
          "| compilation | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    for k in ("dynamic", "static"):
        md.append(f"| {k} | " + " | ".join(f"{med[k][s]:.3f}" for s in STAGES) + " |")
    md += ["", f"static / dynamic total: {out['ratio_total']:.2f}x; mask agreement mean "
           f"{out['mask_agreement']['mean']:.5f} (min {out['mask_agreement']['min']:.5f})"]
    write_text_atomic(Path(a.out + ".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(sys.argv[1:])
