"""Boundary metrics of masks through MONAI (torch side): HD95 and average surface distance.

The torch-free runtime never imports this module (MONAI imports torch); training, evaluation and benchmarks do.
"""
from __future__ import annotations

import numpy as np
import torch


def boundary_scores(pred: list[np.ndarray], masks: list[np.ndarray],
                    spacing: tuple[float, float] | None = None) -> tuple[list[float | None], list[float | None]]:
    """Per-image HD95 and average surface distance (symmetric) of boolean masks through MONAI's metrics, in
    pixels of the masks' frame (or mm with ``spacing`` (row, col) mm per pixel). ``None`` where a distance is
    undefined (one of the two masks empty, the other not; both empty give 0)."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    hd, asd = [], []
    for p, g in zip(pred, masks):
        p, g = np.asarray(p, bool), np.asarray(g, bool)
        if not p.any() and not g.any():
            hd.append(0.0)
            asd.append(0.0)
            continue
        if not p.any() or not g.any():
            hd.append(None)
            asd.append(None)
            continue
        y = torch.from_numpy(p[None, None].astype(np.float32))
        t = torch.from_numpy(g[None, None].astype(np.float32))
        sp = None if spacing is None else [float(spacing[0]), float(spacing[1])]
        hd.append(float(compute_hausdorff_distance(y, t, percentile=95, spacing=sp)[0, 0]))
        asd.append(float(compute_average_surface_distance(y, t, symmetric=True, spacing=sp)[0, 0]))
    return hd, asd
