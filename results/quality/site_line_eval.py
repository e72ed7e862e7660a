"""A site's own flag line against the bundle's, on images not used to set it (bad = F1 < 0.90 at the original size).

Usage: python results/quality/site_line_eval.py PREDICT_RUN SITE_FILE > OUT.json
PREDICT_RUN: a finished `lungsam predict --qc-site SITE_FILE --ground-truth MASKS` folder (every line has f1 and qc).
Checks that the run's flags are the site line's (score < line), then reports both lines' flagged share and catch.
"""
import json
import sys
from pathlib import Path

import numpy as np

from lungsam.qc import auroc
from lungsam.qc_site import read_site_file
from lungsam.runtime.predict import read_finished_run


def line_figures(flags: np.ndarray, bad: np.ndarray, line: float) -> dict:
    caught = int((flags & bad).sum())
    return {"line": line, "flagged": int(flags.sum()), "flagged_share": float(flags.mean()), "bad_caught": caught,
            "bad_caught_share": caught / int(bad.sum()), "precision": caught / max(int(flags.sum()), 1)}


def main(run_dir: str, site_file: str) -> dict:
    run = read_finished_run(run_dir)
    op, digest = read_site_file(site_file)
    if run.record["segmenter"]["qc_operating_point"].get("sha256") != digest:
        raise SystemExit(f"{run_dir} was not made with --qc-site {site_file}")
    ok = run.ok
    score = np.array([r["qc"]["score"] for r in ok])
    flag = np.array([r["qc"]["flag"] for r in ok])
    f1 = np.array([r["f1"] for r in ok])
    assert np.array_equal(flag, score < op.flag_below), "the run's flags are not the site line's"
    bad = f1 < 0.90
    return {"n": len(ok), "bad": int(bad.sum()), "auroc": auroc(list(score), list(bad)),
            "site": line_figures(flag, bad, op.flag_below),
            "bundle": line_figures(score < op.bundle_flag_below, bad, op.bundle_flag_below),
            "f1_mean": float(f1.mean()), "f1_min": float(f1.min()),
            "tb_images": sum(Path(r["file"]).stem.endswith("_1") for r in ok)}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3]), indent=1))
