"""Batch prediction behind ``lungsam predict``: masks, overlays, ``predictions.jsonl`` and ``predict.json``.
Torch-free.

Outputs a later reader can trust:

* ``--out`` must be empty (or absent); ``overwrite=True`` first removes a previous ``lungsam predict`` run's
  files there (those its ``predict.json`` and ``predictions.jsonl`` name) and refuses a folder holding anything
  else. The output folder is never read as input.
* ``predict.json`` is written first with ``"status": "incomplete"`` and the output names the run may write, and
  rewritten with ``"status": "complete"`` at the end: a killed run says so.
* ``predictions.jsonl`` gets one strict-JSON line per input as it completes (flushed; fsync at the end), after
  that input's mask/overlay were written atomically: a kill loses at most the image in flight, and a line
  always means its files are complete. Skipped folder entries come first, as ``"status": "skipped"`` lines.
* A write that fails for lack of space or permission stops the run with :class:`PredictOutputError` naming the
  path; the inputs completed before it stay recorded and ``predict.json`` says ``incomplete`` with the error.
"""
from __future__ import annotations

import errno
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from ..artifacts import atomic_path, dumps_json, package_versions, read_json, utc_now, write_json_atomic
from ..errors import LungsamError
from ..imageio import IMAGE_SUFFIXES, ImageReadError, InputListing, read_mask, scan_inputs
from ..layout import PredictLayout
from ..metrics import f1_score, iou_score, summarize
from ..preprocess import grey_to_rgb, to_uint8
from .contact_sheet import ContactSheet, flag_frame
from .segmenter import LungSegmenter, SegmentationFailure, SegmentationResult

OVERLAY_COLOR = (0, 200, 80)
OVERLAY_ALPHA = 0.4
PREDICT_FORMAT = "lungsam-predict/1"
_NAMES = PredictLayout(Path("."))
RUN_FILES = tuple(p.name for p in (_NAMES.predict_json, _NAMES.predictions_jsonl, _NAMES.metrics_json,
                                   _NAMES.contact_sheet_png))
RecordHook = Callable[[Path, str, "SegmentationResult", Path], dict]
_ATOMIC_TMP = re.compile(r"^\..+\.tmp$")  # lungsam.artifacts.atomic_path's temporary files
FATAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO}


class PredictOutputError(LungsamError, RuntimeError):
    """The output folder cannot be used (not empty, not ours to overwrite) or written (full, read-only)."""


@dataclass
class PredictSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    records: list[dict] = field(default_factory=list)
    jsonl: Path | None = None
    seconds: float = 0.0
    scores: dict | None = None  # with ground truth: {"f1": summary, "iou": summary, "n": scored images}

    @property
    def line(self) -> str:
        s = f"{self.ok} ok, {self.failed} failed"
        if self.skipped:
            s += f", {self.skipped} skipped"
        if self.scores and self.scores["n"]:
            s += (f"; vs ground truth ({self.scores['n']} images): F1 {self.scores['f1']['mean']:.4f} ± "
                  f"{self.scores['f1']['std']:.4f}, IoU {self.scores['iou']['mean']:.4f}")
        return s


# ---------------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------------

def ground_truth_for(gt_dir: Path, stem: str) -> Path | None:
    """The mask in ``gt_dir`` whose name is exactly ``<stem><image suffix>`` (no pattern matching: a stem
    ``x[1]`` never matches ``x1.png``); the first in sorted order when several suffixes exist."""
    found = sorted(p for p in gt_dir.iterdir()
                   if p.stem == stem and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return found[0] if found else None


def score_against(mask: np.ndarray, gt_dir: Path, stem: str) -> dict:
    """F1/IoU of a predicted ``(H0, W0)`` mask against ``gt_dir/<stem>.<suffix>`` (same size), or the reason it
    could not be scored."""
    gt_path = ground_truth_for(gt_dir, stem)
    if gt_path is None:
        return {"ground_truth": None, "score_error": f"no mask named {stem}.* in {gt_dir}"}
    try:
        gt = read_mask(gt_path)
    except ImageReadError as e:
        return {"ground_truth": str(gt_path), "score_error": str(e)}
    if gt.shape != mask.shape:
        return {"ground_truth": str(gt_path), "score_error": f"mask size {gt.shape[1]}x{gt.shape[0]} differs from "
                                                              f"the image's {mask.shape[1]}x{mask.shape[0]}"}
    return {"ground_truth": str(gt_path), "f1": round(f1_score(mask, gt), 6), "iou": round(iou_score(mask, gt), 6)}


# ---------------------------------------------------------------------------------------------
# images out
# ---------------------------------------------------------------------------------------------

def save_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def mask_png(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, np.uint8(255), np.uint8(0))


def overlay_image(pixels: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = OVERLAY_COLOR,
                  alpha: float = OVERLAY_ALPHA, rows_per_block: int = 512) -> np.ndarray:
    """The original image (as 8-bit RGB) with the mask tinted in ``color`` and its border drawn solid.

    ``(H, W, 3)`` uint8. Blended in blocks of rows, so the float32 work is a few MB whatever the image size."""
    u8 = to_uint8(pixels)  # one per-image scaling, as preprocess.to_rgb_uint8
    c = np.asarray(color, np.float32)
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    out = np.empty(mask.shape + (3,), np.uint8)
    for r in range(0, mask.shape[0], rows_per_block):
        sl = slice(r, r + rows_per_block)
        block = u8[sl]
        rgb = (grey_to_rgb(block) if block.ndim == 2 else block).astype(np.float32)
        m = mask[sl]
        rgb[m] = (1 - alpha) * rgb[m] + alpha * c
        rgb[edge[sl]] = c
        out[sl] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out


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


# ---------------------------------------------------------------------------------------------
# the output folder
# ---------------------------------------------------------------------------------------------

def previous_run_files(out: Path) -> set[str] | None:
    """Names in ``out`` that a previous ``lungsam predict`` run wrote (its ``predict.json`` lists them, its
    ``predictions.jsonl`` names each mask/overlay, and atomic temporary files), or ``None`` when ``out``
    holds no ``predict.json`` of such a run."""
    try:
        run = read_json(PredictLayout(out).predict_json)
    except (OSError, ValueError):
        return None
    if not isinstance(run, dict) or not ("segmenter" in run or run.get("format") == PREDICT_FORMAT):
        return None
    names = set(RUN_FILES)
    names |= {n for n in run.get("outputs_planned") or [] if isinstance(n, str)}
    try:
        with open(PredictLayout(out).predictions_jsonl, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    names |= {rec[k] for k in ("mask", "overlay") if isinstance(rec.get(k), str)}
                    dicom = rec.get("dicom")
                    if isinstance(dicom, dict):  # --dicom-seg outputs (seg, sr, sc file names)
                        names |= {dicom[k] for k in ("seg", "sr", "sc") if isinstance(dicom.get(k), str)}
    except OSError:
        pass
    names |= {p.name for p in out.iterdir() if _ATOMIC_TMP.match(p.name)}
    return {n for n in names if n and "/" not in n and n not in (".", "..")}


def earlier_run_folder(folder: Path) -> str | None:
    """Why ``folder`` (met while scanning an input folder) is not read: it holds an earlier ``lungsam predict``
    run's outputs (its ``predict.json``); ``None`` otherwise."""
    return ("output folder of an earlier `lungsam predict` run (has its predict.json); not read as input"
            if PredictLayout(folder).predict_json.is_file() and previous_run_files(folder) is not None else None)


def check_out_dir(out: str | Path, overwrite: bool = False) -> list[Path]:
    """Refuse an output folder that would mix runs; returns the files ``overwrite`` will remove.

    Raises:
        PredictOutputError: ``out`` is a file; or not empty and ``overwrite`` is false; or, with
            ``overwrite``, it holds files that no previous ``lungsam predict`` run there wrote.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PredictOutputError(f"--out {out} exists and is not a folder")
    if not out.exists():
        return []
    entries = sorted(out.iterdir())
    if not entries:
        return []
    names = ", ".join(p.name for p in entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    if not overwrite:
        raise PredictOutputError(
            f"--out {out} is not empty ({names}): a previous run's files would sit beside this run's. Pass "
            "--overwrite to replace a previous `lungsam predict` run there, or choose an empty folder")
    ours = previous_run_files(out)
    foreign = [p for p in entries if ours is None or p.name not in ours or not (p.is_file() or p.is_symlink())]
    if foreign:
        why = ("it has no predict.json of a previous `lungsam predict` run" if ours is None
               else "these were not written by the previous `lungsam predict` run there")
        raise PredictOutputError(
            f"--out {out}: --overwrite removes only a previous run's outputs, and {why}: "
            f"{', '.join(p.name for p in foreign[:5])}{' ...' if len(foreign) > 5 else ''}; choose an empty folder")
    return entries


def _fatal(e: OSError) -> bool:
    return e.errno in FATAL_WRITE_ERRNOS


def _write_error(path: Path, e: OSError) -> str:
    """``cannot write PATH: reason``, naming the output file rather than its atomic temporary file."""
    if _ATOMIC_TMP.match(path.name) and path.name.count(".") >= 3:
        path = path.with_name(path.name[1:].rsplit(".", 2)[0])
    return f"cannot write {path}: {e.strerror or e}"


def predict_files(segmenter: LungSegmenter, inputs: Iterable[str | Path] | InputListing, out_dir: str | Path, *,
                  overlay: bool = False, batch_size: int = 1, progress: Callable[[Iterable], Iterable] | None = None,
                  ground_truth: str | Path | None = None, overwrite: bool = False,
                  on_skip: Callable[[dict], None] | None = None,
                  record_hook: RecordHook | None = None) -> PredictSummary:
    """Segment files/folders into ``out_dir``: ``<stem>_mask.png`` (0/255, original size), optional
    ``<stem>_overlay.png``, ``predictions.jsonl`` (one strict-JSON line per input, in input order, after the
    ``skipped`` lines of folder entries not read; each result line carries ``qc``, the quality flag of
    :attr:`SegmentationResult.qc`, and ``prompt``: its kind and box source), ``contact_sheet.png`` with ``overlay``
    (all overlays, flagged first; a red frame marks a flagged image) and ``predict.json`` (``status``
    ``incomplete``/``complete``, the backend, device and precision that ran, fallbacks taken, counts, skipped files,
    versions). File names: :class:`lungsam.layout.PredictLayout`.

    Args:
        inputs: files and folders (folders recursive, see :func:`lungsam.imageio.scan_inputs`; ``out_dir`` is
            never read), or an :class:`~lungsam.imageio.InputListing` already made.
        overwrite: remove a previous ``lungsam predict`` run's files in ``out_dir`` first (see :func:`check_out_dir`).
        ground_truth: a folder of masks named exactly like the inputs: each line also carries F1/IoU at the
            original size and ``metrics.json`` summarises them.
        on_skip: called with each skipped record (the CLI prints them).
        record_hook: ``record_hook(path, stem, result, out_dir)`` runs for every segmented input and returns more
            outputs to record on its line (e.g. :func:`lungsam.runtime.dicom_out.dicom_record_hook`:
            DICOM-SEG/SR/SC); a ``ValueError`` or ``OSError`` from it makes that input an error line (stage
            ``write``) and removes the files written for it.

    Raises:
        PredictOutputError: ``out_dir`` not usable (see :func:`check_out_dir`), or a write failed for lack of
            space/permission (the message names the path; what completed is recorded).
    """
    t0 = time.perf_counter()
    layout = PredictLayout(Path(out_dir))
    listing = inputs if isinstance(inputs, InputListing) else scan_inputs(list(inputs), exclude=[layout.root],
                                                                           skip_folder=earlier_run_folder)
    remove_previous_run(layout.root, overwrite)
    stems = _output_stems(listing.files)
    run = RunRecord(layout, PredictSummary(jsonl=layout.predictions_jsonl), t0,
                    initial_run_record(segmenter.describe(), listing, stems, layout, overlay, ground_truth))
    journal = run.open_journal()
    outputs = InputOutputs(layout.root, overlay, None if ground_truth is None else Path(ground_truth), record_hook,
                           ContactSheet() if overlay else None)
    with run.recording_errors():
        with journal:
            _record_skipped(run.summary, journal, run.record["skipped_files"], on_skip)
            results = segmenter.segment_many(listing.files, batch_size=batch_size)
            _record_results(run.summary, journal, zip(listing.files, stems,
                                                      progress(results) if progress is not None else results), outputs)
            journal.sync()
            if outputs.sheet is not None:
                outputs.sheet.write(layout.contact_sheet_png)  # all overlays, flagged first
    run.summary.seconds = time.perf_counter() - t0
    run.complete(ground_truth, segmenter.threshold)
    return run.summary


@dataclass
class FinishedRun:
    """A complete ``lungsam predict`` folder read back: its ``predict.json`` and every ``predictions.jsonl`` line."""

    root: Path
    record: dict
    lines: list[dict]
    predictions_sha256: str

    @property
    def ok(self) -> list[dict]:
        """The lines of inputs segmented (``status: ok``), in input order."""
        return [r for r in self.lines if r.get("status") == "ok"]


def read_finished_run(folder: str | Path) -> FinishedRun:
    """Read a ``lungsam predict --out`` folder (plain or ``--ray``) that finished: ``predict.json`` of this format
    with ``status: complete``, and ``predictions.jsonl``, strict JSON, one object with a ``file`` and a ``status``
    per line. Raises :class:`PredictOutputError` naming the file and the problem (an incomplete or killed run
    included: its records are not a whole batch)."""
    import hashlib

    from ..artifacts import loads_json_strict

    layout = PredictLayout(Path(folder))
    try:
        record = loads_json_strict(layout.predict_json.read_text(encoding="utf-8"))
        data = layout.predictions_jsonl.read_bytes()
    except OSError as e:
        raise PredictOutputError(f"{folder}: not a finished `lungsam predict` folder ({e.filename}: "
                                 f"{e.strerror or e})") from e
    except ValueError as e:
        raise PredictOutputError(f"{layout.predict_json}: {e}") from e
    if not isinstance(record, dict) or record.get("format") != PREDICT_FORMAT:
        raise PredictOutputError(f"{layout.predict_json}: not a {PREDICT_FORMAT} record")
    if not isinstance(record.get("segmenter"), dict) or "digest" not in record["segmenter"]:
        raise PredictOutputError(f"{layout.predict_json}: no segmenter record (bundle digest, backend, ...)")
    if record.get("status") != "complete":
        raise PredictOutputError(f"{layout.predict_json}: status {record.get('status')!r}: the run did not finish "
                                 f"({record.get('error') or 'stopped'}); rerun it")
    lines = []
    for i, text in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            rec = loads_json_strict(text)
        except ValueError as e:
            raise PredictOutputError(f"{layout.predictions_jsonl}: line {i}: {e}") from e
        if not isinstance(rec, dict) or "file" not in rec or "status" not in rec:
            raise PredictOutputError(f"{layout.predictions_jsonl}: line {i}: not an input's record")
        lines.append(rec)
    return FinishedRun(layout.root, record, lines, hashlib.sha256(data).hexdigest())


def remove_previous_run(out: Path, overwrite: bool) -> None:
    """Check ``out`` (:func:`check_out_dir`) and remove the previous run's files ``overwrite`` allows."""
    for p in check_out_dir(out, overwrite):
        try:
            p.unlink()
        except OSError as e:
            raise PredictOutputError(f"--overwrite: cannot remove {p}: {e.strerror or e}") from e


def _outputs_line(layout: PredictLayout, ground_truth: str | Path | None) -> str:
    """``predict.json``'s ``outputs``: what the run writes besides each input's files."""
    return (f"{layout.predictions_jsonl.name} (one line per input)"
            + (f", {layout.metrics_json.name}" if ground_truth is not None else ""))


def initial_run_record(setup: dict, listing: InputListing, stems: list[str], layout: PredictLayout, overlay: bool,
                       ground_truth: str | Path | None) -> dict:
    """``predict.json`` as first written (``status: incomplete``, every name the run may write, the skipped
    folder entries); ``setup`` is :meth:`LungSegmenter.describe`."""
    planned = (list(RUN_FILES) + [layout.mask_png(s).name for s in stems]
               + ([layout.overlay_png(s).name for s in stems] if overlay else []))
    skipped = [{"file": str(s.path), "status": "skipped", "reason": s.reason} for s in listing.skipped]
    return {"format": PREDICT_FORMAT, "status": "incomplete", "created": utc_now(), "finished": None,
            "segmenter": setup, "inputs": len(listing.files), "ok": 0, "failed": 0, "skipped": len(skipped),
            "seconds": None, "error": None, "outputs": _outputs_line(layout, ground_truth),
            "outputs_planned": planned, "skipped_files": skipped, "versions": package_versions()}


class JsonlJournal:
    """``predictions.jsonl`` opened unbuffered: each appended line is in the kernel once written, and a write
    that fails part-way is truncated back to the last whole line."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb", buffering=0)
        self.complete = 0  # bytes that hold whole lines

    def append(self, rec: dict) -> None:
        view = memoryview((dumps_json(rec) + "\n").encode("utf-8"))
        try:
            while view:
                view = view[self.f.write(view):]
        except OSError:
            _try(lambda: os.ftruncate(self.f.fileno(), self.complete))  # never leave a partial last line
            raise
        self.complete = self.f.tell()

    def sync(self) -> None:
        os.fsync(self.f.fileno())

    def __enter__(self) -> "JsonlJournal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


@dataclass
class InputOutputs:
    """What :func:`_record` writes for each input: the folder, overlays, ground truth, the hook, the sheet."""

    out: Path
    overlay: bool
    gt_dir: Path | None
    record_hook: RecordHook | None
    sheet: ContactSheet | None


@dataclass
class RunRecord:
    """``predict.json`` of a run in progress and the run's counts; rewritten as the run goes."""

    layout: PredictLayout
    summary: PredictSummary
    t0: float
    record: dict

    def write(self) -> None:
        self.record.update(ok=self.summary.ok, failed=self.summary.failed,
                           seconds=round(time.perf_counter() - self.t0, 3))
        write_json_atomic(self.layout.predict_json, self.record)

    def fail(self, error: str) -> None:
        """Record ``error`` (the run stays ``incomplete``); a disk that refuses this too is ignored."""
        self.record["error"] = error
        _try(self.write)

    def open_journal(self) -> JsonlJournal:
        """Create the folder, write ``predict.json`` (incomplete) and open ``predictions.jsonl``."""
        out = self.layout.root
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.write()
            return JsonlJournal(self.layout.predictions_jsonl)
        except OSError as e:
            raise PredictOutputError(f"--out {out} is not writable: {_write_error(Path(e.filename or out), e)}") from e

    def stopped(self) -> str:
        s = self.summary
        return f"stopped after {s.ok} ok / {s.failed} failed inputs"

    @contextmanager
    def recording_errors(self) -> Iterator[None]:
        """Record in ``predict.json`` why the body stopped: a write error (as :class:`PredictOutputError`), the
        run's own error, or an interruption (Ctrl-C), which is re-raised."""
        try:
            yield
        except OSError as e:
            self.fail(_write_error(Path(e.filename or self.summary.jsonl), e))
            raise PredictOutputError(
                f"{self.record['error']}; {self.stopped()} (the lines written to {self.summary.jsonl} before it are "
                "complete; predict.json says incomplete)") from e
        except PredictOutputError as e:
            self.fail(str(e))
            raise
        except BaseException as e:  # Ctrl-C: say so, then stop
            self.fail(f"interrupted ({type(e).__name__})")
            raise

    def complete(self, ground_truth: str | Path | None, threshold: float) -> None:
        """With ``ground_truth``, score the run into ``metrics.json``; then mark ``predict.json`` complete."""
        try:
            if ground_truth is not None:
                self.summary.scores = summary_scores(self.summary)
                write_metrics(self.layout, ground_truth, threshold, self.record["segmenter"], self.summary.scores)
            self.record.update(status="complete", finished=utc_now())
            self.write()
        except OSError as e:
            self.record["status"] = "incomplete"
            self.fail(_write_error(Path(e.filename or self.layout.root), e))
            raise PredictOutputError(f"{self.record['error']}; every input is recorded in {self.summary.jsonl}, but "
                                     "the run's summary could not be written (predict.json says incomplete)") from e


def _record_skipped(summary: PredictSummary, journal: JsonlJournal, skipped: list[dict],
                    on_skip: Callable[[dict], None] | None) -> None:
    """The ``skipped`` lines first, as the folder scan found them."""
    for rec in skipped:
        summary.skipped += 1
        summary.records.append(rec)
        journal.append(rec)
        if on_skip is not None:
            on_skip(rec)


def _record_results(summary: PredictSummary, journal: JsonlJournal,
                    results: Iterable[tuple[Path, str, SegmentationResult | SegmentationFailure]],
                    outputs: InputOutputs) -> None:
    """Write each input's files and line as its result arrives; a full or read-only folder stops the run."""
    for path, stem, r in results:
        rec = _record(path, stem, r, outputs.out, outputs.overlay, outputs.gt_dir, outputs.record_hook, outputs.sheet)
        summary.ok += rec["status"] == "ok"
        summary.failed += rec["status"] != "ok"
        fatal = rec.pop("_fatal", False)
        summary.records.append(rec)
        journal.append(rec)
        if fatal:
            raise PredictOutputError(
                f"{rec['error']}; stopped after {summary.ok} ok / {summary.failed} failed inputs, recorded in "
                f"{summary.jsonl} (predict.json says incomplete)")


def summary_scores(summary: PredictSummary) -> dict:
    """``{"n", "f1", "iou", "unscored"}`` over the records scored against ground truth."""
    scored = [r for r in summary.records if "f1" in r]
    return {"n": len(scored), "f1": summarize(r["f1"] for r in scored), "iou": summarize(r["iou"] for r in scored),
            "unscored": [r["file"] for r in summary.records if r["status"] == "ok" and "f1" not in r]}


def write_metrics(layout: PredictLayout, ground_truth: str | Path, threshold: float, setup: dict, scores: dict) -> None:
    """``metrics.json``: the scores beside the threshold and what ran (``setup``: :meth:`LungSegmenter.describe`)."""
    write_json_atomic(layout.metrics_json, {
        "ground_truth": str(ground_truth), "threshold": threshold, "frame": "original image size", **scores,
        "segmenter": {k: setup[k] for k in ("bundle", "backend", "device", "precision", "fallbacks")}})


def _try(fn: Callable[[], None]) -> None:
    try:
        fn()
    except OSError:
        pass  # the disk refused the status update as well; the error raised next names the cause


def _record(path: Path, stem: str, r: SegmentationResult | SegmentationFailure, out: Path, overlay: bool,
            gt_dir: Path | None, record_hook: Callable[[Path, str, SegmentationResult, Path], dict] | None = None,
            sheet: ContactSheet | None = None) -> dict:
    """One ``predictions.jsonl`` record, writing the input's mask (and overlay: a red frame where the quality
    flag is raised, and a thumbnail on the contact ``sheet``) first; on a write error the
    input's files are removed and the record says ``stage: write`` (``_fatal`` when the folder is full or
    read-only, which stops the run)."""
    rec: dict = {"file": str(path)}
    if not isinstance(r, SegmentationResult):
        assert isinstance(r, SegmentationFailure)
        rec.update(status="error", error=r.error, stage=r.stage, timings=_round(r.timings))
        return rec
    written: list[Path] = []
    layout = PredictLayout(out)
    target = layout.mask_png(stem)
    try:
        save_png(target, mask_png(r.mask))
        written.append(target)
        rec.update(status="ok", error=None, mask=target.name)
        if overlay:
            target = layout.overlay_png(stem)
            ov_rgb = overlay_image(r.pixels, r.mask)
            if r.qc and r.qc["flag"]:  # a flagged image carries a red frame
                ov_rgb = flag_frame(ov_rgb)
            save_png(target, ov_rgb)
            written.append(target)
            rec["overlay"] = target.name
            if sheet is not None:
                sheet.add(ov_rgb, stem, r.qc)
    except OSError as e:
        for p in written:  # a failed input keeps no mask
            _try(p.unlink)
        return {"file": str(path), "status": "error", "error": _write_error(target, e), "stage": "write",
                "timings": _round(r.timings), "_fatal": _fatal(e)}
    if record_hook is not None:
        try:
            rec.update(record_hook(path, stem, r, out))
        except (OSError, ValueError) as e:
            for p in written:
                _try(p.unlink)
            return {"file": str(path), "status": "error", "error": f"cannot write outputs: {e}", "stage": "write",
                    "timings": _round(r.timings), "_fatal": isinstance(e, OSError) and _fatal(e)}
    if gt_dir is not None:
        rec.update(score_against(r.mask, gt_dir, path.stem))
    rec.update(area_px=r.area_px, area_mm2=None if r.area_mm2 is None else round(r.area_mm2, 3),
               pixel_spacing_mm=None if r.pixel_spacing_mm is None else list(r.pixel_spacing_mm),
               score=round(r.score, 6), threshold=r.threshold, size=list(r.original_hw),
               qc=r.qc, prompt={"kind": r.prompt, "box_source": r.box_source}, timings=_round(r.timings),
               warnings=list(r.warnings))
    return rec


# ---------------------------------------------------------------------------------------------
# the per-input and summary steps, public for other drivers (lungsam.runtime.ray_batch)
# ---------------------------------------------------------------------------------------------

def output_stems(paths: list[Path]) -> list[str]:
    """Unique output stems for ``paths``, as :func:`predict_files` names its outputs."""
    return _output_stems(paths)


def record_outputs(out: Path, path: Path, stem: str, r: SegmentationResult | SegmentationFailure, *,
                   overlay: bool = False, ground_truth: str | Path | None = None,
                   record_hook: Callable[[Path, str, SegmentationResult, Path], dict] | None = None) -> dict:
    """One input's ``predictions.jsonl`` record, written exactly as :func:`predict_files` writes it (mask and
    overlay first, atomically; then ``record_hook``'s outputs, e.g. DICOM-SEG; a write failure becomes an error
    record)."""
    rec = _record(path, stem, r, out, overlay, None if ground_truth is None else Path(ground_truth), record_hook)
    rec.pop("_fatal", None)
    return rec


def write_summary(out: Path, summary: PredictSummary, setup: dict, n_inputs: int, *,
                  ground_truth: str | Path | None = None, extra: dict | None = None) -> None:
    """Write ``out/predict.json`` of a finished run (``status: complete``; ``setup``: :meth:`LungSegmenter.describe`
    of what ran; ``extra``: more top-level keys, e.g. the Ray run's) and, with ``ground_truth``, ``metrics.json``;
    sets ``summary.scores``."""
    layout = PredictLayout(out)
    write_json_atomic(layout.predict_json, {
        "format": PREDICT_FORMAT, "status": "complete", "created": utc_now(), "finished": utc_now(),
        "segmenter": setup, "inputs": n_inputs, "ok": summary.ok, "failed": summary.failed,
        "skipped": summary.skipped, "seconds": round(summary.seconds, 3), "error": None,
        "outputs": _outputs_line(layout, ground_truth), **(extra or {}), "versions": package_versions()})
    if ground_truth is not None:
        summary.scores = summary_scores(summary)
        write_metrics(layout, ground_truth, setup["threshold"], setup, summary.scores)
