"""Re-derive a finished fold's quality calibration (``metrics.json`` ``qc``) and its test figures from its own
validation images with this version's :mod:`lungsam.qc`, without retraining (decoder weights, threshold and
clean-up as chosen; the prompt-jitter term as ``lungsam train`` now adds it for a ``points`` run). It rewrites the
fold's metrics.json: run it on a copy.
Usage: python scripts/quality_recalibrate.py RUN [--fold N] [--data DIR]
"""
from __future__ import annotations

import logging
import sys

from lungsam.artifacts import write_json_atomic
from lungsam.layout import FoldLayout
from lungsam.postprocess import CleanupSpec
from lungsam.qc import detection_summary
from lungsam.runs import load_run
from lungsam.samples import embed_samples, load_data
from lungsam.train.config import TrainConfig
from lungsam.train.engine import predict_with_iou, score
from lungsam.train.folds import assess_quality, calibrate_quality, prompt_jitter_of, with_jitter_term

log = logging.getLogger("lungsam.quality_recalibrate")


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = argv[0]
    fold = int(argv[argv.index("--fold") + 1]) if "--fold" in argv else 0
    rm = load_run(run_dir, fold, None)
    cfg = TrainConfig(backbone=rm.backbone, checkpoint=rm.run["config"].get("checkpoint"),
                      size=int(rm.run["config"]["size"]), encoder_size=rm.run["config"].get("encoder_size"))
    data = load_data(argv[argv.index("--data") + 1:argv.index("--data") + 2] if "--data" in argv
                     else rm.run["config"]["data"], cfg.size, log.info).by_id()
    cleanup, thr = CleanupSpec.from_dict(rm.metrics.get("postprocess")), rm.threshold
    out, jitter, parts = {}, {}, {p: [data[i] for i in rm.split[p]] for p in ("train", "val", "test")}
    for part in ("val", "test"):
        samples = parts[part]
        emb, _ = embed_samples(rm.sam, cfg, cfg.checkpoint, samples, "cpu", False, fingerprint=rm.encoder_fingerprint)
        masks = [s.mask for s in samples]
        out[part] = predict_with_iou(rm.sam, emb, masks, rm.prompt, rm.spec, cfg.size, "cpu")
        jitter[part] = prompt_jitter_of(rm.sam, emb, masks, rm.prompt, rm.spec, cfg.size, "cpu")
    cal = calibrate_quality(*out["val"], thr, cleanup, f"fold {fold} validation images",
                            [s.mask for s in parts["val"]], [s.mask for s in parts["train"]],
                            [s.image for s in parts["val"]])
    val_f1, _ = score(out["val"][0], [s.mask for s in parts["val"]], thr, cleanup)
    cal = with_jitter_term(cal, *out["val"], thr, cleanup, jitter.get("val"), val_f1, [s.image for s in parts["val"]])
    qc = assess_quality(cal, *out["test"], thr, cleanup, [s.image for s in parts["test"]], jitter.get("test"))
    m = dict(rm.metrics)
    by_id = {r["id"]: r for r in m["per_image"]}
    for i, q in zip(rm.split["test"], qc):
        by_id[i]["qc"] = q.to_dict()
    m["qc"] = cal.to_dict()
    m["test_qc_detection"] = detection_summary(qc, [by_id[i]["f1"] for i in rm.split["test"]])
    write_json_atomic(FoldLayout(rm.fold_dir).metrics_json, m)
    log.info("%s", m["test_qc_detection"])


if __name__ == "__main__":
    main(sys.argv[1:])
