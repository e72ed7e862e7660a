"""What the quality flag's prompt-jitter term costs the torch-free runtime, measured side by side.

Usage: python results/quality/jitter_runtime_cost.py BUNDLE --data DIR --out OUT [--images N] [--repeats R]
       [--backend onnxruntime|openvino] [--precision fp32|fp16|int8|bf16] [--threads T]

Opens BUNDLE once and, for each of the first ``--images`` images of ``--data`` (its ``images/`` folder), times
``segment`` (read, preprocess, encoder, decoder, clean-up, quality flag with its prompt-variant decodes) and,
on the same embedding, the variant decodes alone (``LungSegmenter.jitter_maps``), alternating image by image,
``--repeats`` times after one warm-up pass. Writes ``OUT.json`` (strict JSON: medians, per-stage medians, the
CPU and its flags) and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from lungsam.artifacts import write_json_atomic, write_text_atomic
from lungsam.cpufeatures import cpu_features
from lungsam.runtime.segmenter import LungSegmenter


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    seg = LungSegmenter.load(a.bundle, backend=a.backend, precision=a.precision, threads=a.threads)
    if seg.qc is None or getattr(seg.qc, "jitter", None) is None:
        raise SystemExit(f"{a.bundle}: its quality flag has no prompt-jitter term")
    paths = sorted((Path(a.data) / "images").iterdir())[:a.images]
    prepared = [seg.preprocess(p) for p in paths]
    embeddings = [seg.encode(p.model_input[None])[0] for p in prepared]
    total, stages, jitter = [], {}, []
    for rep in range(a.repeats + 1):
        for p, pre, emb in zip(paths, prepared, embeddings):
            r = seg.segment(p)
            t = time.perf_counter()
            seg.jitter_maps(emb, pre.input_hw)
            dt = time.perf_counter() - t
            if rep:  # the first pass warms up
                total.append(r.timings["total_s"])
                jitter.append(dt)
                for k, v in r.timings.items():
                    stages.setdefault(k, []).append(v)
    med = {k: float(np.median(v)) for k, v in stages.items()}
    res = {"command": "python results/quality/jitter_runtime_cost.py " + " ".join(argv), "bundle": a.bundle,
           "backend": seg.backend, "precision": a.precision, "threads": a.threads, "images": len(paths),
           "repeats": a.repeats,
           "variants": len(seg.qc.jitter.variants), "median_total_s": float(np.median(total)),
           "median_jitter_s": float(np.median(jitter)), "median_stage_s": med,
           "jitter_share_of_total": float(np.median(jitter) / np.median(total)),
           "cpu": cpu_features(), "python": platform.python_version()}
    write_json_atomic(Path(a.out + ".json"), res)
    md = ["# Runtime cost of the prompt-jitter term", "", "```console", "$ " + res["command"], "```", "",
          f"{res['backend']} {a.precision}, {len(paths)} images x {a.repeats} passes (median seconds per image).", "",
          "| segment (all stages) | the variant decodes alone | share | encode | decode | postprocess (incl. qc) |",
          "|---|---|---|---|---|---|",
          f"| {res['median_total_s']:.3f} | {res['median_jitter_s']:.3f} | {res['jitter_share_of_total']:.0%} | "
          f"{med['encode_s']:.3f} | {med['decode_s']:.3f} | {med['postprocess_s']:.3f} |"]
    write_text_atomic(Path(a.out + ".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
