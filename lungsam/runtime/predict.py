"""Batch prediction behind ``lungsam predict``: masks, overlays and ``predictions.jsonl``. Torch-free.

Every output is written atomically (:func:`lungsam.artifacts.atomic_path`), so an interrupted run never
leaves a partial PNG or JSONL. A bad input gets an ``error`` line and the batch goes on.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from ..artifacts import atomic_path, package_versions, utc_now, write_json_atomic
from ..imageio import IMAGE_SUFFIXES, ImageReadError, list_inputs, read_mask
from ..metrics import f1_score, iou_score, summarize
from ..preprocess import to_rgb_uint8
from .segmenter import LungSegmenter, SegmentationFailure, SegmentationResult

OVERLAY_COLOR = (0, 200, 80)
OVERLAY_ALPHA = 0.4


@dataclass
class PredictSummary:
    ok: int = 0
    failed: int = 0
    records: list[dict] = field(default_factory=list)
    jsonl: Path | None = None
    seconds: float = 0.0
    scores: dict | None = None  # with ground truth: {"f1": summary, "iou": summary, "n": scored images}

    @property
    def line(self) -> str:
        s = f"{self.ok} ok, {self.failed} failed"
        if self.scores and self.scores["n"]:
            s += (f"; vs ground truth ({self.scores['n']} images): F1 {self.scores['f1']['mean']:.4f} ± "
                  f"{self.scores['f1']['std']:.4f}, IoU {self.scores['iou']['mean']:.4f}")
        return s


def score_against(mask: np.ndarray, gt_dir: Path, stem: str) -> dict:
    """F1/IoU of a predicted ``(H0, W0)`` mask against ``gt_dir/<stem>.*`` (same size), or the reason it
    could not be scored."""
    found = [p for p in sorted(gt_dir.glob(f"{stem}.*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        return {"ground_truth": None, "score_error": f"no mask named {stem}.* in {gt_dir}"}
    try:
        gt = read_mask(found[0])
    except ImageReadError as e:
        return {"ground_truth": str(found[0]), "score_error": str(e)}
    if gt.shape != mask.shape:
        return {"ground_truth": str(found[0]),
                "score_error": f"mask size {gt.shape[1]}x{gt.shape[0]} differs from the image's {mask.shape[1]}x{mask.shape[0]}"}
    return {"ground_truth": str(found[0]), "f1": round(f1_score(mask, gt), 6), "iou": round(iou_score(mask, gt), 6)}


def save_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def mask_png(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, np.uint8(255), np.uint8(0))


def overlay_image(pixels: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = OVERLAY_COLOR,
                  alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The original image (as 8-bit RGB) with the mask tinted in ``color`` and its border drawn solid."""
    rgb = to_rgb_uint8(pixels).astype(np.float32)
    c = np.asarray(color, np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * c
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    rgb[edge] = c
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _output_stems(paths: list[Path]) -> list[str]:
    """Unique output stems: the file stem, disambiguated by suffix and then a counter on collisions."""
    seen: set[str] = set()
    stems = []
    for p in paths:
        stem = p.stem or "image"
        if stem in seen:
            stem = f"{stem}_{p.suffix.lstrip('.').lower()}" if p.suffix else stem
        base, k = stem, 2
        while stem in seen:
            stem = f"{base}_{k}"
            k += 1
        seen.add(stem)
        stems.append(stem)
    return stems


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in d.items()}


def output_stems(paths: list[Path]) -> list[str]:
    """Unique output stems for ``paths`` (public name of the stems ``predict_files`` uses; ``lungsam.runtime.ray_batch``
    names its outputs with it)."""
    return _output_stems(paths)


def record_outputs(out: Path, path: Path, stem: str, r: SegmentationResult | SegmentationFailure, *,
                   overlay: bool = False, ground_truth: str | Path | None = None) -> dict:
    """One input's ``predictions.jsonl`` record; for a :class:`SegmentationResult` it first writes
    ``out/<stem>_mask.png`` (and ``<stem>_overlay.png``) atomically. A write failure becomes an error record."""
    rec: dict = {"file": str(path)}
    if isinstance(r, SegmentationResult):
        try:
            mask_path = out / f"{stem}_mask.png"
            save_png(mask_path, mask_png(r.mask))
            rec.update(status="ok", error=None, mask=mask_path.name)
            if overlay:
                ov = out / f"{stem}_overlay.png"
                save_png(ov, overlay_image(r.pixels, r.mask))
                rec["overlay"] = ov.name
            if ground_truth is not None:
                rec.update(score_against(r.mask, Path(ground_truth), path.stem))
            rec.update(area_px=r.area_px, area_mm2=None if r.area_mm2 is None else round(r.area_mm2, 3),
                       pixel_spacing_mm=None if r.pixel_spacing_mm is None else list(r.pixel_spacing_mm),
                       score=round(r.score, 6), threshold=r.threshold, size=list(r.original_hw),
                       timings=_round(r.timings))
        except OSError as e:
            rec = {"file": str(path), "status": "error", "error": f"cannot write outputs: {e}",
                   "stage": "write", "timings": _round(r.timings)}
    else:
        assert isinstance(r, SegmentationFailure)
        rec.update(status="error", error=r.error, stage=r.stage, timings=_round(r.timings))
    return rec


def write_summary(out: Path, summary: PredictSummary, setup: dict, n_inputs: int, *,
                  ground_truth: str | Path | None = None, extra: dict | None = None) -> None:
    """Write ``out/predict.json`` (``setup``: :meth:`LungSegmenter.describe` of what ran; ``extra``: more
    top-level keys, e.g. the Ray run's) and, with ``ground_truth``, ``metrics.json``; sets ``summary.scores``."""
    write_json_atomic(out / "predict.json", {
        "created": utc_now(), "segmenter": setup, "inputs": n_inputs, "ok": summary.ok, "failed": summary.failed,
        "seconds": round(summary.seconds, 3), "outputs": "predictions.jsonl (one line per input)" +
        (", metrics.json" if ground_truth is not None else ""), **(extra or {}), "versions": package_versions()})
    if ground_truth is not None:
        scored = [r for r in summary.records if "f1" in r]
        summary.scores = {"n": len(scored), "f1": summarize(r["f1"] for r in scored),
                          "iou": summarize(r["iou"] for r in scored),
                          "unscored": [r["file"] for r in summary.records if r["status"] == "ok" and "f1" not in r]}
        write_json_atomic(out / "metrics.json", {
            "ground_truth": str(ground_truth), "threshold": setup["threshold"], "frame": "original image size",
            **summary.scores, "segmenter": {k: setup[k] for k in ("bundle", "backend", "device", "precision", "fallbacks")}})


def predict_files(segmenter: LungSegmenter, inputs: Iterable[str | Path], out_dir: str | Path, *, overlay: bool = False,
                  batch_size: int = 1, progress: Callable[[Iterable], Iterable] | None = None,
                  ground_truth: str | Path | None = None) -> PredictSummary:
    """Segment files/folders into ``out_dir``: ``<stem>_mask.png`` (0/255, original size), optional
    ``<stem>_overlay.png``, ``predictions.jsonl`` (one JSON line per input, in input order) and
    ``predict.json`` (the backend, device and precision that ran, fallbacks taken, counts, versions).

    With ``ground_truth`` (a folder of masks named like the inputs), each line also carries F1/IoU at the
    original size and ``metrics.json`` summarises them."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = list_inputs(list(inputs))
    stems = _output_stems(paths)
    summary = PredictSummary(jsonl=out / "predictions.jsonl")
    results = segmenter.segment_many(paths, batch_size=batch_size)
    it = progress(results) if progress is not None else results
    with atomic_path(summary.jsonl) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for path, stem, r in zip(paths, stems, it):
            rec = record_outputs(out, path, stem, r, overlay=overlay, ground_truth=ground_truth)
            if rec["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
            summary.records.append(rec)
            f.write(json.dumps(rec) + "\n")
            f.flush()
    summary.seconds = time.perf_counter() - t0
    setup = segmenter.describe()  # what actually ran (after any --allow-fallback), beside the figures it produced
    write_summary(out, summary, setup, len(paths), ground_truth=ground_truth)
    return summary
