"""Timing ``lungsam bench``'s rows: the four stages per image at batch 1 and the end to end of those calls,
throughput at each batch size, memory sampled by a thread, and the outputs of the first timed pass (scored
against ground truth and the torch reference by :func:`accuracy` and :func:`parity`).

Two schedules: :func:`bench_one` measures one row after the other; :func:`bench_interleaved` opens every row and
runs each image through all of them in turn, so a machine shared with other jobs slows every row alike.
"""
from __future__ import annotations

import gc
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..metrics import f1_score, iou_score, summarize
from .backends import Skip, open_backend
from .inputs import Images
from .plan import Plan, row_models
from .stats import LATENCY_KEYS, StageTimer, latency_summary, stage_breakdown, throughput_summary

INTERLEAVED_NOTE = ("interleaved with the other rows image by image; memory: RSS growth while this backend opened "
                    "and warmed up")
Log = Callable[[str], None]


class MemorySampler:
    """Peak RSS (psutil) and device memory in use (torch.cuda.mem_get_info) sampled by a thread."""

    def __init__(self, device: str, interval_s: float = 0.005):
        self.device, self.interval = device, interval_s
        self._stop = threading.Event()
        self.peak_rss = self.start_rss = self.peak_gpu = self.start_gpu = None
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None
        self._cuda = None
        if device == "cuda":
            try:
                import torch

                if torch.cuda.is_available():
                    self._cuda = torch.cuda
            except ImportError:
                pass

    def _sample(self) -> None:
        if self._proc is not None:
            rss = self._proc.memory_info().rss
            self.peak_rss = rss if self.peak_rss is None else max(self.peak_rss, rss)
        if self._cuda is not None:
            free, total = self._cuda.mem_get_info()
            used = total - free
            self.peak_gpu = used if self.peak_gpu is None else max(self.peak_gpu, used)

    def __enter__(self) -> "MemorySampler":
        self._sample()
        self.start_rss, self.start_gpu = self.peak_rss, self.peak_gpu
        self._thread = threading.Thread(target=self._run, daemon=True, name="lungsam-bench-mem")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def record(self) -> dict[str, float | None]:
        mb = lambda x: None if x is None else x / 2**20  # noqa: E731
        out = {"peak_rss_mb": mb(self.peak_rss),
               "rss_growth_mb": None if self.peak_rss is None else mb(self.peak_rss - self.start_rss),
               "gpu_peak_mb": None}
        if self.peak_gpu is not None:
            out["gpu_peak_mb"] = mb(self.peak_gpu - self.start_gpu)  # device memory this backend added
        return out



@dataclass
class Outputs:
    masks: list[np.ndarray] = field(default_factory=list)
    low_res: list[np.ndarray] = field(default_factory=list)


def run_pipeline(be, images, masks, timer: StageTimer | None = None, *, with_encoding: bool = False):
    """One call of the four stages on a batch; returns ``(masks, decoder output)``, and the encoder
    output too with ``with_encoding``."""
    if timer is None:
        enc = be.encode(be.preprocess(images, masks))
        dec = be.decode(enc)
        out = be.postprocess(dec)
    else:
        with timer.stage("preprocess"):
            pre = be.preprocess(images, masks)
        with timer.stage("encoder"):
            enc = be.encode(pre)
        with timer.stage("decoder"):
            dec = be.decode(enc)
        with timer.stage("postprocess"):
            out = be.postprocess(dec)
    return (out, dec, enc) if with_encoding else (out, dec)


def measure(be, data: Images, batches: list[int], warmup: int, repeats: int, progress: bool = True,
            clock: Callable[[], float] = time.perf_counter) -> tuple[dict, Outputs]:
    """Latency (batch 1), throughput (each batch size) and the outputs of the first timed pass."""
    from tqdm import tqdm

    n = len(data.images)
    big = [b for b in batches if b > 1]
    total = warmup + repeats * n + sum(len(range(0, n, b)) * repeats + 1 for b in big)
    bar = tqdm(total=total, unit="call", leave=False, disable=not progress,
               desc=getattr(be, "label", "bench"))
    for i in range(warmup):
        j = i % n
        run_pipeline(be, [data.images[j]], [data.masks[j]])
        bar.update(1)
    be.sync()
    timer = StageTimer(sync=be.sync, clock=clock)
    outputs = Outputs()
    for rep in range(repeats):
        for j in range(n):
            be.sync()
            t0 = clock()
            out, dec = run_pipeline(be, [data.images[j]], [data.masks[j]], timer)
            be.sync()
            timer.add("end_to_end", clock() - t0)
            if rep == 0:
                outputs.masks.append(np.asarray(out[0], bool))
                outputs.low_res.append(be.low_res(dec)[0])
            bar.update(1)
    tput = [throughput_summary(1, timer.samples["end_to_end"]) | stage_breakdown(1, timer.samples)]
    notes: list[str] = getattr(be, "notes", None) if isinstance(getattr(be, "notes", None), list) else []
    tput += time_batches(be, data.images, data.masks, big, repeats, bar.update, clock, notes)
    bar.close()
    lat = {k: latency_summary(timer.samples[k]) for k in LATENCY_KEYS}
    return {"latency_ms": lat, "throughput": tput}, outputs


def time_batches(be, images: list[np.ndarray], masks: list[np.ndarray], batches: list[int], repeats: int,
                 tick: Callable[[int], Any] = lambda n: None, clock: Callable[[], float] = time.perf_counter,
                 notes: list[str] | None = None) -> list[dict]:
    """Throughput at each batch size: ``repeats`` passes over the images in full batches (the last batch
    wraps around to the first images), after one warm-up call at that shape. A batch size the backend
    cannot run (e.g. beyond a TensorRT profile) is left out and explained in ``notes``."""
    n = len(images)
    out = []
    for b in batches:
        chunks = [[(s + k) % n for k in range(b)] for s in range(0, n, b)]
        ims = [[images[k] for k in c] for c in chunks]
        mks = [[masks[k] for k in c] for c in chunks]
        try:
            run_pipeline(be, ims[0], mks[0])  # warm-up at this shape (CUDA graph capture, allocator)
        except Exception as e:  # noqa: BLE001
            if notes is None:
                raise
            notes.append(f"batch {b} not measured: {type(e).__name__}: {e}")
            tick(1 + repeats * len(chunks))
            continue
        tick(1)
        walls = []
        timer = StageTimer(sync=be.sync, clock=clock)
        for _ in range(repeats):
            for im, mk in zip(ims, mks):
                be.sync()
                t0 = clock()
                run_pipeline(be, im, mk, timer)
                be.sync()
                walls.append(clock() - t0)
                tick(1)
        out.append(throughput_summary(b, walls) | stage_breakdown(b, timer.samples))
    return out


def accuracy(outputs: Outputs, data: Images) -> dict:
    """F1 / IoU summaries against ground truth, and HD95 / ASD (pixels of the masks' frame, MONAI)."""
    from ..boundary import boundary_scores
    from ..metrics import boundary_summary

    return {"f1": summarize(f1_score(p, g) for p, g in zip(outputs.masks, data.masks)),
            "iou": summarize(iou_score(p, g) for p, g in zip(outputs.masks, data.masks)),
            **boundary_summary(*boundary_scores(outputs.masks, data.masks))}


def parity(outputs: Outputs, ref: Outputs) -> dict:
    f1 = [f1_score(a, b) for a, b in zip(outputs.masks, ref.masks)]
    diff = max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
               for a, b in zip(outputs.low_res, ref.low_res))
    changed = sum(int(not np.array_equal(a, b)) for a, b in zip(outputs.masks, ref.masks))
    return {"mask_f1": summarize(f1), "max_abs_logit_diff": diff, "changed_masks": changed, "n": len(f1)}


def bench_one(plan: Plan, bundle, run_model, data: Images, device: str, batches: list[int], warmup: int,
              repeats: int, threads: int | None, ref: Outputs | None, log: Callable[[str], None],
              progress: bool = True, box_from_first_pass: bool = False) -> tuple[dict, Outputs | None]:
    rec = _skipped_record(plan, device)
    if plan.skip:
        return rec, None
    be = None
    try:
        with MemorySampler(device) as mem:
            t0 = time.perf_counter()
            be = open_backend(plan, bundle, run_model, device, threads, box_from_first_pass)
            be.label = f"{plan.backend} {plan.precision}"
            rec["setup_s"] = time.perf_counter() - t0
            rec["mode"] = getattr(be, "mode", None) or plan.mode
            rec["providers"] = list(getattr(be, "providers", []) or [])
            if plan.backend in ("onnxruntime", "openvino"):  # the files this row ran (int8 decoders: the FP32 ones)
                rec["models"] = row_models(bundle, plan)
            if device == "cuda" and plan.backend == "torch":
                import torch

                torch.cuda.reset_peak_memory_stats()
            timing, outputs = measure(be, data, batches, warmup, repeats, progress)
        rec.update(status="ok", reason=None)
        rec["accuracy"] = accuracy(outputs, data)
        if ref is not None:
            rec["parity"] = parity(outputs, ref)
        rec.update(timing)
        rec["memory"] = mem.record()
        if device == "cuda" and plan.backend == "torch":
            import torch

            rec["memory"]["torch_allocator_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        notes = list(getattr(be, "notes", []) or [])
        if notes:
            rec["notes"] = notes
        return rec, outputs
    except Skip as e:
        rec.update(status="skipped", reason=str(e))
        return rec, None
    except Exception as e:  # noqa: BLE001 - one backend failing must not lose the others' numbers
        log(f"{plan.backend} {plan.precision} failed:\n{traceback.format_exc()}")
        rec.update(status="failed", reason=f"{type(e).__name__}: {e}")
        return rec, None
    finally:
        if be is not None and hasattr(be, "close"):
            be.close()
        del be
        gc.collect()



@dataclass
class LiveRow:
    """An opened row of :func:`bench_interleaved`: its index in the records, backend, timer and outputs."""

    idx: int
    be: Any
    timer: StageTimer
    outputs: Outputs = field(default_factory=Outputs)
    failed: bool = False


def _skipped_record(plan: Plan, device: str) -> dict[str, Any]:
    """A row's record before it runs (skipped with the plan's reason until it has numbers)."""
    return {"backend": plan.backend, "precision": plan.precision, "device": device, "status": "skipped",
            "reason": plan.skip, "mode": plan.mode}


def bench_interleaved(plans: list[Plan], bundle, run_model, data: Images, device: str, batches: list[int],
                      warmup: int, repeats: int, threads: int | None, log: Log,
                      progress: bool = True, box_from_first_pass: bool = False) -> list[tuple[dict, Outputs | None]]:
    """Every runnable plan side by side: all backends are opened (each with its warm-up, its memory measured
    as the RSS growth while it opens and warms up), then each image runs through every backend in turn (the
    order rotated image by image) for ``repeats`` passes, so a machine shared with other jobs slows every row
    alike and the ratios hold. Batch sizes > 1 are then timed backend after backend. Same records as
    :func:`bench_one`."""
    recs: list[dict] = []
    live: list[LiveRow] = []
    for plan in plans:
        recs.append(_skipped_record(plan, device))
        if plan.skip is None:
            row = _open_row(plan, recs[-1], len(recs) - 1, bundle, run_model, data, device, warmup, threads, log,
                            box_from_first_pass)
            if row is not None:
                live.append(row)
    _interleave(live, recs, data, repeats, log, progress)
    results: list[tuple[dict, Outputs | None]] = [(r, None) for r in recs]
    for row in live:
        try:
            if not row.failed:
                _finish_row(row, recs[row.idx], data, batches, repeats)
                results[row.idx] = (recs[row.idx], row.outputs)
        finally:
            if hasattr(row.be, "close"):
                row.be.close()
    gc.collect()
    return results


def _open_row(plan: Plan, rec: dict, idx: int, bundle, run_model, data: Images, device: str, warmup: int,
              threads: int | None, log: Log, box_from_first_pass: bool) -> LiveRow | None:
    """Open ``plan``'s backend and warm it up, recording setup time, memory, mode, providers and model files in
    ``rec``; ``None`` (and ``rec`` says skipped or failed) when it cannot run."""
    try:
        with MemorySampler(device) as mem:
            t0 = time.perf_counter()
            be = open_backend(plan, bundle, run_model, device, threads, box_from_first_pass)
            rec["setup_s"] = time.perf_counter() - t0
            for i in range(warmup):
                j = i % len(data.images)
                run_pipeline(be, [data.images[j]], [data.masks[j]])
        rec["memory"] = mem.record()
        rec["mode"] = getattr(be, "mode", None) or plan.mode
        rec["providers"] = list(getattr(be, "providers", []) or [])
        if plan.backend in ("onnxruntime", "openvino"):
            rec["models"] = row_models(bundle, plan)
        return LiveRow(idx, be, StageTimer(sync=be.sync))
    except Skip as e:
        rec.update(status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001
        log(f"{plan.backend} {plan.precision} failed:\n{traceback.format_exc()}")
        rec.update(status="failed", reason=f"{type(e).__name__}: {e}")
    return None


def _interleave(live: list[LiveRow], recs: list[dict], data: Images, repeats: int, log: Log, progress: bool) -> None:
    """``repeats`` passes over the images at batch 1, each image through every live row in turn (the starting
    row rotated image by image); a row that fails is marked and left out from then on."""
    from tqdm import tqdm

    n = len(data.images)
    bar = tqdm(total=repeats * n * len(live), unit="call", leave=False, disable=not progress, desc="interleaved")
    for rep in range(repeats):
        for j in range(n):
            k = (rep * n + j) % max(len(live), 1)
            for row in live[k:] + live[:k]:
                if not row.failed and _time_one(row, recs[row.idx], data, j, rep == 0, log):
                    bar.update(1)
    bar.close()


def _time_one(row: LiveRow, rec: dict, data: Images, j: int, keep: bool, log: Log) -> bool:
    """Image ``j`` through ``row`` at batch 1, timed (its outputs kept when ``keep``); ``False`` when it failed."""
    be, timer = row.be, row.timer
    try:
        be.sync()
        t0 = time.perf_counter()
        out, dec = run_pipeline(be, [data.images[j]], [data.masks[j]], timer)
        be.sync()
        timer.add("end_to_end", time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        log(f"{rec['backend']} {rec['precision']} failed:\n{traceback.format_exc()}")
        rec.update(status="failed", reason=f"{type(e).__name__}: {e}")
        row.failed = True
        return False
    if keep:
        row.outputs.masks.append(np.asarray(out[0], bool))
        row.outputs.low_res.append(be.low_res(dec)[0])
    return True


def _finish_row(row: LiveRow, rec: dict, data: Images, batches: list[int], repeats: int) -> None:
    """Time ``row``'s batch sizes > 1 and complete its record (accuracy, throughput, latency, notes)."""
    notes: list[str] = list(getattr(row.be, "notes", []) or [])
    tput = [throughput_summary(1, row.timer.samples["end_to_end"]) | stage_breakdown(1, row.timer.samples)]
    tput += time_batches(row.be, data.images, data.masks, [b for b in batches if b > 1], repeats, notes=notes)
    rec.update(status="ok", reason=None, accuracy=accuracy(row.outputs, data), throughput=tput,
               latency_ms={k: latency_summary(row.timer.samples[k]) for k in LATENCY_KEYS})
    rec["notes"] = [*notes, INTERLEAVED_NOTE]
