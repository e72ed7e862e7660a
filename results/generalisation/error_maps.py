"""Where a Montgomery-trained model's masks miss or overshoot on Shenzhen: per-pixel rates over all images.

Usage: python results/generalisation/error_maps.py PROBS.npz DATA_DIR THRESHOLD OUT_STEM
PROBS.npz: ``prob (n, S, S)`` working-frame probabilities in the data set's sorted image order (as
scripts/decoder_ensemble.py --work keeps them). Writes OUT_STEM.png (missed = reference lung the mask left out;
extra = mask outside the reference lung; both as the share of images, per pixel) and OUT_STEM.json (the shares of
all missed and extra pixels in the upper, middle and lower thirds of the reference lungs' rows, with clean-up on).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lungsam.postprocess import CleanupSpec, clean_mask  # noqa: E402
from lungsam.samples import load_data  # noqa: E402


def thirds(maps: np.ndarray, gts: np.ndarray) -> dict:
    """Share of the error pixels in the upper / middle / lower third of each reference mask's rows."""
    out = np.zeros(3)
    for m, g in zip(maps, gts):
        rows = np.where(g.any(axis=1))[0]
        if len(rows) == 0:
            continue
        edges = np.linspace(rows.min(), rows.max() + 1, 4)
        r = np.where(m)[0]
        out += np.histogram(np.clip(r, edges[0], edges[-1] - 1), bins=edges)[0]
    return dict(zip(("upper", "middle", "lower"), (out / max(out.sum(), 1)).round(3).tolist()))


def main(npz: str, data_dir: str, threshold: float, stem: str) -> None:
    prob = np.load(npz)["prob"]
    gts = np.stack([s.mask for s in load_data([data_dir], prob.shape[-1], lambda m: None).samples])
    masks = np.stack([clean_mask(p > threshold, CleanupSpec(enabled=True)) for p in prob])
    missed, extra = gts & ~masks, masks & ~gts
    fig, ax = plt.subplots(1, 3, figsize=(12, 4.2))
    panels = (("reference lung (share of images)", gts.mean(0), 1.0),
              ("missed: reference lung left out", missed.mean(0), 0.25),
              ("extra: mask outside the reference", extra.mean(0), 0.25))
    for a, (title, img, top) in zip(ax, panels):
        im = a.imshow(img, cmap="magma", vmin=0, vmax=top)
        a.set_title(title, fontsize=9)
        a.axis("off")
        fig.colorbar(im, ax=a, fraction=0.046)
    fig.suptitle(f"{len(gts)} images of {data_dir.rstrip('/').split('/')[-1]}, threshold {threshold}, clean-up on")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    res = {"n": int(len(gts)), "threshold": threshold,
           "missed_pixels_per_image": float(missed.sum() / len(gts)),
           "extra_pixels_per_image": float(extra.sum() / len(gts)),
           "missed_by_third": thirds(missed, gts), "extra_by_third": thirds(extra, gts),
           "command": "python results/generalisation/error_maps.py " + " ".join(sys.argv[1:])}
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
