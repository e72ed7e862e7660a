"""A stress set: the held-out test images of a run with synthetic opacities painted into their lung fields
(:func:`lungsam.train.opacity.add_opacities`, mask unchanged), at the files' own size, written as a data set
folder (``images/``, ``masks/``, ``pairs.csv``) that ``lungsam eval`` scores like any other.

Usage::

    python results/generalisation/opaque_testset.py RUN DATA_DIR OUT_PARENT [--fold 0] [--seed 0]

writes ``OUT_PARENT/<name of DATA_DIR>/`` so image ids (``<set>/<stem>``) match the run's own test ids.
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from lungsam.artifacts import read_json, write_bytes_atomic, write_text_atomic
from lungsam.train.augment import view_seed
from lungsam.train.opacity import add_opacities


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def opaque_copy(src: Path, stem: str, out: Path, seed: int) -> None:
    """One image with opacities (8-bit grey, the source's size) and its unchanged mask."""
    grey = np.asarray(Image.open(src / "images" / f"{stem}.png").convert("L"))
    mask = np.asarray(Image.open(src / "masks" / f"{stem}.png").convert("L")) > 127
    rgb = add_opacities(np.repeat(grey[..., None], 3, axis=2), mask, view_seed(seed, stem, 0))
    write_bytes_atomic(out / "images" / f"{stem}.png", png_bytes(rgb[..., 0]))
    write_bytes_atomic(out / "masks" / f"{stem}.png", png_bytes((mask * 255).astype(np.uint8)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    test = read_json(args.run / "splits.json")[args.fold]["test"]
    stems = [i.split("/", 1)[1] for i in test]
    out = args.out / args.data.name
    for stem in stems:
        opaque_copy(args.data, stem, out, args.seed)
    with open(args.data / "pairs.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["stem"] in set(stems)]
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "pairs.csv", text.getvalue())


if __name__ == "__main__":
    main()
