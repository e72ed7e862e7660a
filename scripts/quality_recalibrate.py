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
from lungsam.train.engine import score
from lungsam.train.folds import assess_quality, calibrate_quality, with_jitter_term
from lungsam.train.redecode import DEFAULT_JITTER, decode_samples, fold_parts

log = logging.getLogger("lungsam.quality_recalibrate")


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = argv[0]
    fold = int(argv[argv.index("--fold") + 1]) if "--fold" in argv else 0
    rm = load_run(run_dir, fold, None)
    data = argv[argv.index("--data") + 1:argv.index("--data") + 2] if "--data" in argv else None
    cleanup, thr = CleanupSpec.from_dict(rm.metrics.get("postprocess")), rm.threshold
    parts = fold_parts(rm, data, log.info)
    val, test = (decode_samples(rm, parts[p], DEFAULT_JITTER) for p in ("val", "test"))
    cal = calibrate_quality(val.probs, val.iou, thr, cleanup, f"fold {fold} validation images", val.masks,
                            [s.mask for s in parts["train"]], val.images)
    val_f1, _ = score(val.probs, val.masks, thr, cleanup)
    cal = with_jitter_term(cal, val.probs, val.iou, thr, cleanup, val.jitter, val_f1, val.images)
    qc = assess_quality(cal, test.probs, test.iou, thr, cleanup, test.images, test.jitter)
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
