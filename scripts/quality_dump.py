"""Dump what the quality flag sees for one fold of a run on a data set, for offline analysis of its signals.

Usage: python scripts/quality_dump.py RUN OUT.npz [--data DIR ...] [--fold N] [--part all|train|val|test]

For each image (the run's own split part of its training data, or every image of ``--data``): the one-pass
probability ``(S, S)`` (float16, the learned prompt, as the runtime's fixed decoder), the decoder's predicted IoU,
the two-pass probability (pass 2 prompted with the learned points and the bounding box of pass 1's mask
``p > threshold``, as ``--box-from-first-pass`` does) and its predicted IoU, the ground-truth mask, the working-frame
image ``(S, S, 3)`` uint8 and the id.
Embeddings come from the cache (``LUNGSAM_CACHE``); images not cached are encoded.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import replace

import numpy as np

from lungsam.runs import load_run
from lungsam.train.engine import predict_with_iou
from lungsam.train.redecode import encoder_config
from lungsam.train.run import embed_samples, load_data

log = logging.getLogger("lungsam.quality_dump")


def two_pass(rm, emb: np.ndarray, first: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: the learned points plus the box of pass 1's mask (the mean-mask box where pass 1 is empty)."""
    boxes_from = [p > rm.threshold for p in first]
    full = np.zeros((size, size), bool)
    full[size // 8:-size // 8, size // 8:-size // 8] = True
    boxes_from = [m if m.any() else full for m in boxes_from]
    prompt = replace(rm.prompt, mode="both" if rm.prompt.uses_points else "box")
    return predict_with_iou(rm.sam, emb, boxes_from, prompt, rm.spec, size, "cpu")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--data", nargs="*")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--part", default="all", choices=("all", "train", "val", "test"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rm = load_run(a.run, a.fold, None)
    cfg = encoder_config(rm)
    data = load_data(a.data or rm.run["config"]["data"], cfg.size, log.info)
    samples = data.samples if a.part == "all" else [data.by_id()[i] for i in rm.split[a.part]]
    emb, _ = embed_samples(rm.sam, cfg, cfg.checkpoint, samples, "cpu", False, fingerprint=rm.encoder_fingerprint)
    masks = [s.mask for s in samples]
    prob, iou = predict_with_iou(rm.sam, emb, masks, rm.prompt, rm.spec, cfg.size, "cpu")
    prob2, iou2 = two_pass(rm, emb, prob, cfg.size)
    np.savez_compressed(a.out, ids=np.array([s.id for s in samples]), prob=prob.astype(np.float16), iou=iou,
                        prob2=prob2.astype(np.float16), iou2=iou2, gt=np.stack(masks).astype(bool),
                        image=np.stack([s.image for s in samples]).astype(np.uint8),
                        threshold=rm.threshold)
    log.info("%d images -> %s", len(samples), a.out)


if __name__ == "__main__":
    main()
