"""Latency statistics for ``lungsam bench``. Torch-free.

Percentiles use linear interpolation between closest ranks (numpy's default, ``method="linear"``):
for sorted samples ``x[0..n-1]`` the q-th percentile is at rank ``(n - 1) * q / 100``.
Throughput is images divided by the wall time of the timed passes that processed them.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

STAGES: tuple[str, ...] = ("preprocess", "encoder", "decoder", "postprocess")
LATENCY_KEYS: tuple[str, ...] = STAGES + ("end_to_end",)


def percentile(samples: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) of ``samples`` with linear interpolation; NaN for no samples."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    v = np.sort(np.asarray(list(samples), np.float64))
    if v.size == 0:
        return float("nan")
    rank = (v.size - 1) * q / 100.0
    lo = int(np.floor(rank))
    hi = min(lo + 1, v.size - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (rank - lo))


def latency_summary(samples_s: Iterable[float]) -> dict[str, float]:
    """Seconds per call -> ``{"p50", "p95", "p99", "mean", "min", "max", "n"}`` in **milliseconds**."""
    ms = [1000.0 * float(s) for s in samples_s]
    if not ms:
        nan = float("nan")
        return {"p50": nan, "p95": nan, "p99": nan, "mean": nan, "min": nan, "max": nan, "n": 0}
    return {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
            "mean": float(np.mean(ms)), "min": float(np.min(ms)), "max": float(np.max(ms)), "n": len(ms)}


def throughput(n_images: int, wall_s: float) -> float:
    """Images per second; raises on a non-positive wall time."""
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    return float(n_images) / float(wall_s)


def throughput_summary(batch: int, batch_wall_s: Sequence[float]) -> dict[str, float]:
    """Timed batched calls of ``batch`` images each -> images/s over their total wall time, and the
    per-batch latency percentiles (ms)."""
    total = float(np.sum(batch_wall_s))
    n = batch * len(batch_wall_s)
    lat = latency_summary(batch_wall_s)
    return {"batch": int(batch), "images": int(n), "wall_s": total, "images_per_s": throughput(n, total),
            "ms_per_image": 1000.0 * total / n, "batch_latency_ms": lat}


def stage_breakdown(batch: int, stage_s: dict[str, Sequence[float]]) -> dict:
    """Per-stage seconds of timed batched calls (``batch`` images each) -> ``stage_ms_per_image`` (each
    stage's total time divided by the images) and ``images_per_s_without_preprocess``: the rate of the
    model stages alone (encoder + decoder + postprocess), i.e. with host preprocessing done elsewhere
    (data-loader workers); ``None`` when those stages took no measurable time."""
    n = batch * len(stage_s.get("encoder", []))
    per_image = {k: (1000.0 * float(np.sum(stage_s.get(k, []))) / n if n else float("nan")) for k in STAGES}
    model_s = sum(float(np.sum(stage_s.get(k, []))) for k in STAGES[1:])
    return {"stage_ms_per_image": per_image,
            "images_per_s_without_preprocess": throughput(n, model_s) if n and model_s > 0 else None}


def ratio(a: float, b: float) -> float | None:
    """``a / b``, or ``None`` when either is missing/NaN or ``b`` is zero."""
    if a is None or b is None:
        return None
    a, b = float(a), float(b)
    if not np.isfinite(a) or not np.isfinite(b) or b == 0.0:
        return None
    return a / b


def default_preprocess_threads() -> int:
    """Threads for host preprocessing of a batch: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


class ThreadMap:
    """``[fn(x) for x in items]`` over a batch in up to ``threads`` threads (Pillow's resize and numpy's
    large-array arithmetic release the GIL, so a batch's images are preprocessed in parallel); a single
    item, or ``threads <= 1``, runs inline. Results keep the input order; the first error is raised."""

    def __init__(self, threads: int | None = None):
        self.threads = default_preprocess_threads() if threads is None else max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1 or self.threads <= 1:
            return [fn(x) for x in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="preprocess")
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class StageTimer:
    """Collects per-stage wall times (seconds). ``sync`` (e.g. ``torch.cuda.synchronize``) is called
    before reading the clock at both ends of each stage so GPU work is attributed to its stage."""

    def __init__(self, sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self.sync = sync or (lambda: None)
        self.clock = clock
        self.samples: dict[str, list[float]] = {k: [] for k in LATENCY_KEYS}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sync()
        t0 = self.clock()
        yield
        self.sync()
        self.samples.setdefault(name, []).append(self.clock() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(float(seconds))

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: latency_summary(v) for k, v in self.samples.items()}
