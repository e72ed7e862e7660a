"""``lungsam qc-site``'s work: a site's flag line from a finished ``lungsam predict`` run of its own images.

Torch-free. The scores are read back from the run's ``predictions.jsonl`` (no model runs again), the bundle is
opened (every file's sha256 verified) to check that it is the one the run used and to read its own line, and the
line is cut at the share the site asks for (:func:`lungsam.qc_site.choose_line`). File format:
:mod:`lungsam.qc_site`.
"""
from __future__ import annotations

from pathlib import Path

from ..qc import load_calibration
from ..qc_site import DEFAULT_MIN_IMAGES, SiteOperatingPoint, SiteQcError, score_line_model, site_operating_point
from .bundle import Bundle
from .predict import read_finished_run


def run_scores(lines: list[dict], where: Path) -> list[float]:
    """The quality score of every segmented input (``status: ok``) of a predict run, in input order."""
    scores = []
    for rec in lines:
        qc = rec.get("qc")
        if not isinstance(qc, dict) or isinstance(qc.get("score"), bool) or not isinstance(qc.get("score"),
                                                                                            (int, float)):
            raise SiteQcError(f"{where}: {rec['file']} has no quality score (was the run made with a bundle "
                              "without a quality model?)")
        scores.append(float(qc["score"]))
    return scores


def site_line_from_run(bundle: str | Path, predict_run: str | Path, flag_share: float,
                       min_images: int = DEFAULT_MIN_IMAGES) -> SiteOperatingPoint:
    """The site operating point of ``bundle`` from the scores a finished ``lungsam predict`` run with it gave on a
    batch of the site's images (failed inputs left out; the source records how many)."""
    b = Bundle.load(bundle, verify=True)
    model = score_line_model(load_calibration(b.manifest.get("qc")), f"bundle {b.root}")
    run = read_finished_run(predict_run)
    seg = run.record["segmenter"]
    used = seg["digest"]
    if used != b.digest:
        raise SiteQcError(f"{predict_run} was made with bundle {str(used)[:16]}..., not {bundle} "
                          f"({str(b.digest)[:16]}...): score the site's images with this bundle first")
    ok = run.ok
    scores = run_scores(ok, run.root)
    source = {"predict_run": str(run.root.resolve()), "predictions_sha256": run.predictions_sha256,
              "inputs": run.record.get("inputs"), "ok": len(ok),
              "failed": sum(r["status"] == "error" for r in run.lines),
              "segmenter": {k: seg.get(k) for k in ("backend", "device", "precision", "preprocess")}}
    return site_operating_point(scores, flag_share, bundle_digest=b.digest, bundle_flag_below=model.flag_below,
                                source=source, min_images=min_images)
