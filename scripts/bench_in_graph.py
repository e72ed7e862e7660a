"""Host path against in-graph path of a bundle exported with ``--in-graph-preprocess``, side by side: the same
images, the two paths interleaved image by image, per backend; ms per image per stage (read excluded).

    python scripts/bench_in_graph.py BUNDLE IMAGE_DIR [--n 20] [--backends onnxruntime,openvino] [--rounds 2]

Prints a markdown table (results/cpu/in_graph_preprocessing.md). Torch-free (uses lungsam.runtime only, through
lungsam.export.parity.compare_paths, which the export's in-graph gate runs too).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from lungsam.export.parity import STAGES, compare_paths
from lungsam.imageio import read_image, read_mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("data", help="a data set folder with images/ and masks/")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--backends", default="onnxruntime,openvino")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the images per backend (interleaved)")
    a = ap.parse_args()
    paths = sorted((Path(a.data) / "images").glob("*.png"))[: a.n]
    images = [(read_image(p), read_mask(Path(a.data) / "masks" / p.name)) for p in paths]
    print(f"bundle {a.bundle}; {len(images)} images of {a.data} ({images[0][0].hw[1]}x{images[0][0].hw[0]}); "
          f"load average {os.getloadavg()[0]:.2f} at start")
    rows = []
    for rnd in range(a.rounds):
        for b in a.backends.split(","):
            rows.append((rnd, b, compare_paths(a.bundle, b, images)))
    print(f"load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| backend | round | path | preprocess ms | encode ms | decode ms | postprocess ms | total ms | "
          "agreement mean (min) | F1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rnd, b, r in rows:
        for p in ("host", "graph"):
            st = r["stages_ms"][p]
            agree = f"{r['agreement_mean']:.5f} ({r['agreement_min']:.5f})" if p == "graph" else ""
            f1 = r["f1_gt_mean"] if p == "graph" else r["f1_gt_host_mean"]
            print(f"| {b} | {rnd + 1} | {p} | " + " | ".join(f"{st[k]:.1f}" for k in STAGES)
                  + f" | {r['ms_per_image'][p]:.1f} | {agree} | {f1:.4f} |")
    for b in a.backends.split(","):
        ratio = [r["ms_per_image"]["graph"] / r["ms_per_image"]["host"] for _, bb, r in rows if bb == b]
        print(f"\n{b}: graph / host total time, per round: {', '.join(f'{x:.2f}' for x in ratio)} "
              f"(mean {np.mean(ratio):.2f})")


if __name__ == "__main__":
    main()
