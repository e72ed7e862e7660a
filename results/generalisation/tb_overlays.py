"""Overlays of the tuberculosis images on which a run scores lowest in a ``lungsam eval`` of another data set.

Reads the eval's ``metrics.json`` (per-image F1) and the scored set's ``pairs.csv`` (``tb_label_from_filename``),
takes the ``k`` TB images with the lowest F1, scores them again with the run's fold exactly as ``lungsam eval``
does (its threshold and clean-up; embeddings from ``LUNGSAM_CACHE``, so no encoder work when they are cached)
and draws image, ground truth (green) and prediction (red). Each image's F1 must equal the eval's (checked to
1e-6), so the figure shows the masks that were scored.

Usage::

    LUNGSAM_CACHE=... python results/generalisation/tb_overlays.py RUN ../shared/data/shenzhen EVAL/metrics.json \
        --pairs ../shared/data/shenzhen/pairs.csv --k 6 --out results/generalisation/mc_lite_tb_lowest.png
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from lungsam.artifacts import read_json

logger = logging.getLogger("tb_overlays")


def tb_labels(pairs_csv: Path) -> dict[str, int]:
    """``pair_evals.tb_labels`` of the sibling script (one reader of ``pairs.csv``'s labels)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pair_evals", Path(__file__).with_name("pair_evals.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tb_labels(pairs_csv)


def lowest_tb_ids(metrics: dict, labels: dict[str, int], k: int) -> list[tuple[str, float]]:
    """``[(image id, F1)]`` of the ``k`` lowest-scoring TB images of an eval's ``per_image`` list."""
    tb = [(r["id"], float(r["f1"])) for r in metrics["per_image"] if labels.get(r["id"].split("/")[-1]) == 1]
    return sorted(tb, key=lambda t: t[1])[:k]


def subset_folder(data: Path, stems: list[str], tmp: Path) -> Path:
    """A data set folder under ``tmp`` with the same name as ``data`` (so image ids match) holding symlinks to
    the ``stems``' images and masks (PNG)."""
    root = tmp / data.resolve().name
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for s in stems:
            (root / sub / f"{s}.png").symlink_to((data / sub / f"{s}.png").resolve())
    return root


def score_subset(run_dir: Path, folder: Path, fold: int | None) -> tuple[list, list[float], list]:
    """The run's fold scored on ``folder`` like ``lungsam eval``: samples, per-image F1, masks ``(S, S)`` bool."""
    from lungsam.postprocess import CleanupSpec
    from lungsam.runs import load_run
    from lungsam.samples import load_data
    from lungsam.train.engine import binarize, pick_device
    from lungsam.train.evaluate import score_model
    from lungsam.train.redecode import encoder_config

    rm = load_run(run_dir, fold)
    cfg = encoder_config(rm)
    data = load_data([str(folder)], cfg.size, logger.info)
    cleanup = CleanupSpec.from_dict(rm.metrics.get("postprocess"))
    probs, f1, _, _ = score_model(rm.sam, rm.spec, rm.prompt, rm.threshold, cfg, cfg.checkpoint,
                                  rm.encoder_fingerprint, data.samples, pick_device("auto"), False, False, cleanup)
    return data.samples, f1, binarize(probs, rm.threshold, cleanup)


def main() -> None:
    from lungsam.train import report

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path, help="the scored data set folder (images/, masks/)")
    ap.add_argument("metrics", type=Path, help="the eval's metrics.json")
    ap.add_argument("--pairs", type=Path, required=True)
    ap.add_argument("--fold", type=int, default=None)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args()
    worst = lowest_tb_ids(read_json(args.metrics), tb_labels(args.pairs), args.k)
    with tempfile.TemporaryDirectory() as tmp:
        folder = subset_folder(args.data, [i.split("/")[-1] for i, _ in worst], Path(tmp))
        samples, f1, masks = score_subset(args.run, folder, args.fold)
    want = dict(worst)
    for s, f in zip(samples, f1):
        if abs(want[s.id] - f) > 1e-6:
            raise SystemExit(f"{s.id}: F1 {f:.6f} here, {want[s.id]:.6f} in {args.metrics}: not the eval's model")
    order = sorted(range(len(samples)), key=lambda i: f1[i])
    report.overlays([{"label": f"{samples[i].id.split('/')[-1]} F1 {f1[i]:.3f}", "image": samples[i].image,
                      "gt": samples[i].mask, "pred": masks[i]} for i in order], args.out,
                    f"{args.run.name}: lowest TB images of {args.metrics.parent.name}")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
