"""The figure ``views.png``: four packaged demo images (Montgomery, 256x256), each as the original, an ``affine``
view, an ``acquisition`` view and an ``acquisition`` view with synthetic opacities (seed 0, view 0).

Usage: ``python results/generalisation/views_figure.py results/generalisation/views.png``
"""
from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from lungsam.artifacts import write_bytes_atomic
from lungsam.data import DEMO_DATA, load_dataset
from lungsam.train.augment import AugmentSpec, augment_pair, view_seed

SPECS = (AugmentSpec(), AugmentSpec(policy="acquisition"), AugmentSpec(policy="acquisition", opacity=1.0))


def row(sample) -> np.ndarray:
    """One sample's panels side by side, ``(S, 4 S)`` uint8."""
    seed = view_seed(0, sample.id, 0)
    panels = [sample.image[..., 0]] + [augment_pair(sample.image, sample.mask, seed, s)[0][..., 0] for s in SPECS]
    return np.concatenate(panels, axis=1)


def main(out: str) -> None:
    import io

    samples = load_dataset(DEMO_DATA, 256).samples[:4]
    grid = np.concatenate([row(s) for s in samples], axis=0)
    buf = io.BytesIO()
    Image.fromarray(grid).resize((grid.shape[1] // 2, grid.shape[0] // 2), Image.BILINEAR).save(buf, format="PNG")
    write_bytes_atomic(out, buf.getvalue())


if __name__ == "__main__":
    main(sys.argv[1])
