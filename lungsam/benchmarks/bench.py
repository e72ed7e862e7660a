"""``lungsam bench``: accuracy, parity and latency of an exported bundle across backends and precisions.

What is measured (docs/benchmarks.md has the full description):

* images: the working-frame images (``S x S``) of the bundle run's test split (or ``--data``), fed as
  arrays, so file decoding is not timed; masks are compared at the working resolution, the frame
  training evaluates in.
* backends: ``torch`` (the run rebuilt with :func:`lungsam.runs.load_run`; FP32 eager is the
  reference), ``onnxruntime`` and ``tensorrt`` through :class:`lungsam.runtime.LungSegmenter` (exactly
  what users run); each in every requested precision the machine can run. The rest are reported as
  skipped with the reason.
* latency: four stages per image at batch 1 (``preprocess``, ``encoder``, ``decoder``, ``postprocess``;
  device synchronised around each on GPU) and the end-to-end wall time of those four calls, over
  ``repeats`` passes after ``warmup`` calls; throughput at each ``--batch`` size over timed batched
  passes; peak RSS (sampled every 5 ms by a thread) and GPU memory (``torch.cuda.mem_get_info``
  sampled likewise, and torch's allocator peak for torch).
* parity vs the torch FP32 reference on the same images: mask F1 mean/min, max abs difference of the
  low-res logits, number of images whose mask changed.
"""
from __future__ import annotations

import gc
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..artifacts import read_json, utc_now, write_json_atomic, write_text_atomic
from ..errors import LungsamError
from ..metrics import f1_score, iou_score, summarize
from ..runtime.backends import int8_unsupported
from .machine import full_machine_record, versions
from .report import compare, latency_chart, markdown_report
from .schema import BACKENDS, FORMAT, PRECISIONS, check_results
from .stats import (
    LATENCY_KEYS,
    StageTimer,
    ThreadMap,
    default_preprocess_threads,
    latency_summary,
    ratio,
    stage_breakdown,
    throughput_summary,
)

FIRST_PASS_MODE = "first-pass box: two decoder calls"
INTERLEAVED_NOTE = ("interleaved with the other rows image by image; memory: RSS growth while this backend opened "
                    "and warmed up")


class BenchError(LungsamError, ValueError):
    pass


class Skip(Exception):
    """A backend/precision this machine or bundle cannot run; the message is the reason."""


@dataclass
class Images:
    source: str
    ids: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]


@dataclass
class Plan:
    backend: str
    precision: str
    mode: str | None = None
    skip: str | None = None


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def bundle_run(manifest: dict) -> tuple[str | None, int | None]:
    """``(run folder, fold)`` recorded by ``lungsam export`` in ``manifest["run"]``."""
    run = manifest.get("run") or {}
    path = None
    for key in ("dir", "path", "run_dir", "source"):
        v = run.get(key)
        if isinstance(v, str):
            path = v
            break
        if isinstance(v, dict):
            for k2 in ("dir", "path", "run_dir", "run"):
                if isinstance(v.get(k2), str):
                    path = v[k2]
                    break
            if path:
                fold = v.get("fold")
                return path, None if fold is None else int(fold)
    fold = run.get("fold")
    return path, None if fold is None else int(fold)


def load_images(working_size: int, data_dir: str | None, run_info: dict | None, split: dict | None,
                limit: int | None, log: Callable[[str], None]) -> Images:
    """Working-frame images/masks: ``data_dir`` (all pairs) or the run's test split."""
    from ..data import load_dataset, pool

    if data_dir is not None:
        ds = load_dataset(data_dir, working_size, log=log)
        samples = ds.samples
        source = f"{data_dir} (all {len(samples)} pairs)"
    else:
        if run_info is None or split is None:
            raise BenchError("the bundle's run is unknown or missing, so its test split cannot be used: pass --data DIR "
                             "(or --run RUN)")
        datasets = [load_dataset(p, working_size, log=log) for p in run_info["config"]["data"]]
        by_id = pool(datasets).by_id()
        missing = [i for i in split["test"] if i not in by_id]
        if missing:
            raise BenchError(f"{len(missing)} test ids of the run are not in its data ({missing[:3]}...); pass --data")
        samples = [by_id[i] for i in split["test"]]
        source = f"run test split ({', '.join(run_info['config']['data'])}; {len(samples)} images)"
    if limit:
        samples = samples[:limit]
    if not samples:
        raise BenchError("no images to benchmark")
    return Images(source=source, ids=[s.id for s in samples], images=[s.image for s in samples],
                  masks=[s.mask for s in samples])


def make_plan(backends: list[str], precisions: list[str], device: str, bundle) -> list[Plan]:
    """Every backend x precision asked for; the torch FP32 eager reference first (whenever torch is asked)."""
    for b in backends:
        if b not in BACKENDS:
            raise BenchError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    for p in precisions:
        if p not in PRECISIONS:
            raise BenchError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    plans: list[Plan] = []
    if "torch" in backends:
        plans.append(Plan("torch", "fp32", "eager"))
        for p in precisions:
            if p == "int8":
                plans.append(Plan("torch", p, "eager", skip="int8 is the bundle's onnxruntime CPU quantisation; torch "
                                                           "is the FP32 reference it is compared with"))
            elif device == "cuda":  # eager autocast and CUDA graphs side by side, so the graphs' gain is visible
                if p != "fp32":
                    plans.append(Plan("torch", p, "eager"))
                plans.append(Plan("torch", p, "cuda_graph"))
            elif p != "fp32":
                plans.append(Plan("torch", p, "eager"))
    for b in ("onnxruntime", "openvino", "tensorrt"):
        if b not in backends:
            continue
        for p in precisions:
            plan = Plan(b, p)
            if p == "bf16" and b != "openvino":
                plan.skip = ("bundles carry fp32/fp16/int8 models only; bf16 is measured for torch (GPU) and OpenVINO "
                             "(its bfloat16 hint on a CPU with native bfloat16)")
            elif b == "openvino" and (why := openvino_unavailable(device, p)):
                plan.skip = why
            elif b == "tensorrt" and device != "cuda":
                plan.skip = "TensorRT runs on a GPU only (use --device cuda)"
            elif p == "int8" and (why := int8_unsupported(b, device)):
                plan.skip = why
            elif not bundle.has_model("encoder", "fp32" if p == "bf16" else p):
                plan.skip = f"the bundle has no {p} models (export with --{p})"
            plans.append(plan)
    return plans


def openvino_unavailable(device: str, precision: str) -> str | None:
    """Why an OpenVINO row cannot run here (``None`` when it can, as far as the machine goes; the bundle's
    own checks come when the runtime opens it)."""
    from ..runtime.openvino_backend import bf16_unsupported, openvino_version

    if device != "cpu":
        return "OpenVINO is measured on the CPU only (use --device cpu)"
    if openvino_version() is None:
        return "openvino is not installed: pip install 'lungsam[openvino]'"
    if precision == "bf16":
        return bf16_unsupported()
    return None


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------

class RuntimeBackend:
    """:class:`lungsam.runtime.LungSegmenter` in the bench's four-stage interface."""

    def __init__(self, bundle, backend: str, device: str, precision: str, threads: int | None,
                 box_from_first_pass: bool = False):
        from ..runtime.backends import BackendUnavailableError
        from ..runtime.segmenter import LungSegmenter

        try:
            self.seg = LungSegmenter.load(bundle, backend=backend, device=device, precision=precision,
                                          allow_fallback=False, threads=threads, box_from_first_pass=box_from_first_pass)
        except BackendUnavailableError as e:
            raise Skip(str(e)) from e
        d = self.seg.describe()
        self.providers = sorted({p for ps in d["providers"].values() for p in ps})
        self.mode = (FIRST_PASS_MODE if box_from_first_pass else
                     "fixed-prompt decoder" if self.seg.uses_fixed_decoder else None)
        self.notes: list[str] = list(d["fallbacks"])
        self._map = ThreadMap()

    def sync(self) -> None:  # the runtime returns host arrays: every stage is complete when it returns
        pass

    def preprocess(self, images, masks=None):
        prepared = self._map(self.seg.preprocess, images)
        prompts = None
        if self.seg.needs_box:
            from ..prompts import mask_box

            prompts = [self.seg.model_prompts(p.original_hw, box=mask_box(m)) for p, m in zip(prepared, masks)]
        return prepared, np.stack([p.model_input for p in prepared]), prompts

    def encode(self, pre):
        prepared, x, prompts = pre
        return prepared, self.seg.encode(x), prompts

    def decode(self, enc):
        prepared, emb, prompts = enc
        if self.seg.box_from_first_pass:  # two decoder calls: the box of the model's own first mask
            prompts = self.seg.first_pass_prompts(emb, prepared, [None] * len(prepared))
        low, _ = self.seg.decode(emb, prompts)
        return prepared, low

    def postprocess(self, dec) -> np.ndarray:
        prepared, low = dec
        return np.stack([self.seg.postprocess(low[i], p)[0] for i, p in enumerate(prepared)])

    def low_res(self, dec) -> np.ndarray:
        return np.asarray(dec[1], np.float32)[:, 0]

    def close(self) -> None:
        self._map.close()
        self.seg = None


def open_backend(plan: Plan, bundle, run_model, device: str, threads: int | None, box_from_first_pass: bool = False):
    if plan.backend == "torch":
        from .torch_backend import TorchBackend, TorchUnavailable

        if run_model is None:
            raise Skip("the bundle's training run is not available here (pass --run RUN) to rebuild the torch model")
        try:
            return TorchBackend(run_model.sam, run_model.spec, run_model.prompt, run_model.threshold,
                                run_model.working_size, device=device, precision=plan.precision,
                                mode=plan.mode or "eager", threads=threads, first_pass=box_from_first_pass)
        except TorchUnavailable as e:
            raise Skip(str(e)) from e
    return RuntimeBackend(bundle, plan.backend, device, plan.precision, threads, box_from_first_pass)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------

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
    rec: dict[str, Any] = {"backend": plan.backend, "precision": plan.precision, "device": device,
                           "status": "skipped", "reason": plan.skip, "mode": plan.mode}
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


def row_models(bundle, plan: Plan) -> dict[str, str]:
    """``{model name: file}`` a runtime row runs (OpenVINO int8: the NNCF IR; bf16: the FP32 files)."""
    src = "fp32" if plan.precision == "bf16" else plan.precision
    out = {}
    for name, precs in bundle.manifest["models"].items():
        if src in precs:
            ov = precs[src].get("openvino") if plan.backend == "openvino" and src == "int8" else None
            out[name] = ov["file"] if ov else precs[src]["file"]
    return out


def bench_interleaved(plans: list[Plan], bundle, run_model, data: Images, device: str, batches: list[int],
                      warmup: int, repeats: int, threads: int | None, log: Callable[[str], None],
                      progress: bool = True, box_from_first_pass: bool = False) -> list[tuple[dict, Outputs | None]]:
    """Every runnable plan side by side: all backends are opened (each with its warm-up, its memory measured
    as the RSS growth while it opens and warms up), then each image runs through every backend in turn (the
    order rotated image by image) for ``repeats`` passes, so a machine shared with other jobs slows every row
    alike and the ratios hold. Batch sizes > 1 are then timed backend after backend. Same records as
    :func:`bench_one`."""
    from tqdm import tqdm

    recs: list[dict] = []
    live: list[tuple[int, Any, StageTimer, Outputs]] = []
    for plan in plans:
        rec: dict[str, Any] = {"backend": plan.backend, "precision": plan.precision, "device": device,
                               "status": "skipped", "reason": plan.skip, "mode": plan.mode}
        recs.append(rec)
        if plan.skip:
            continue
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
            live.append((len(recs) - 1, be, StageTimer(sync=be.sync), Outputs()))
        except Skip as e:
            rec.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001
            log(f"{plan.backend} {plan.precision} failed:\n{traceback.format_exc()}")
            rec.update(status="failed", reason=f"{type(e).__name__}: {e}")
    n = len(data.images)
    bar = tqdm(total=repeats * n * len(live), unit="call", leave=False, disable=not progress, desc="interleaved")
    failed: set[int] = set()
    for rep in range(repeats):
        for j in range(n):
            k = (rep * n + j) % max(len(live), 1)
            for idx, be, timer, outputs in live[k:] + live[:k]:
                if idx in failed:
                    continue
                try:
                    be.sync()
                    t0 = time.perf_counter()
                    out, dec = run_pipeline(be, [data.images[j]], [data.masks[j]], timer)
                    be.sync()
                    timer.add("end_to_end", time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001
                    log(f"{recs[idx]['backend']} {recs[idx]['precision']} failed:\n{traceback.format_exc()}")
                    recs[idx].update(status="failed", reason=f"{type(e).__name__}: {e}")
                    failed.add(idx)
                    continue
                if rep == 0:
                    outputs.masks.append(np.asarray(out[0], bool))
                    outputs.low_res.append(be.low_res(dec)[0])
                bar.update(1)
    bar.close()
    results: list[tuple[dict, Outputs | None]] = [(r, None) for r in recs]
    for idx, be, timer, outputs in live:
        rec = recs[idx]
        try:
            if idx not in failed:
                notes: list[str] = list(getattr(be, "notes", []) or [])
                tput = [throughput_summary(1, timer.samples["end_to_end"]) | stage_breakdown(1, timer.samples)]
                tput += time_batches(be, data.images, data.masks, [b for b in batches if b > 1], repeats,
                                     notes=notes)
                rec.update(status="ok", reason=None, accuracy=accuracy(outputs, data), throughput=tput,
                           latency_ms={k: latency_summary(timer.samples[k]) for k in LATENCY_KEYS})
                rec["notes"] = [*notes, INTERLEAVED_NOTE]
                results[idx] = (rec, outputs)
        finally:
            if hasattr(be, "close"):
                be.close()
    gc.collect()
    return results


def add_reference_ratios(results: list[dict]) -> None:
    ref = next((r for r in results if (r["backend"], r["precision"], r.get("mode")) == ("torch", "fp32", "eager")
                and r["status"] == "ok"), None)
    if ref is None:
        return
    best = lambda r: max(t["images_per_s"] for t in r["throughput"])  # noqa: E731
    for r in results:
        if r["status"] != "ok":
            continue
        r["vs_reference"] = {
            "end_to_end_p50": ratio(r["latency_ms"]["end_to_end"]["p50"], ref["latency_ms"]["end_to_end"]["p50"]),
            "end_to_end_mean": ratio(r["latency_ms"]["end_to_end"]["mean"], ref["latency_ms"]["end_to_end"]["mean"]),
            "best_throughput": ratio(best(r), best(ref)),
        }


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------

def run_bench(bundle_dir: str | Path, out_dir: str | Path, *, data_dir: str | None = None, run_dir: str | None = None,
              backends: list[str] | None = None, precisions: list[str] | None = None, device: str = "cpu",
              batches: list[int] | None = None, warmup: int = 2, repeats: int = 3, limit: int | None = None,
              threads: int | None = None, compare_path: str | None = None, progress: bool = True,
              box_from_first_pass: bool | None = None, interleave: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Benchmark a bundle; writes ``results.json``, ``results.md`` and ``latency.png`` to ``out_dir``.

    ``interleave``: every row side by side, image by image (:func:`bench_interleaved`), for ratios on a shared
    machine; otherwise one row after the other.

    ``box_from_first_pass`` (bundles prompted with a box): every backend takes each image's box from the
    model's own first mask (two decoder calls, timed together in the decoder stage); ``None``: the bundle's
    default (``manifest["inference"]``). Otherwise ``box``/``both`` bundles get the ground-truth box.
    """
    from ..prompts import BOX_PROMPT_MODES, first_pass_prompt
    from ..runtime.bundle import Bundle
    from ..runtime.segmenter import bundle_box_from_first_pass

    t_start = time.perf_counter()
    backends = backends or list(BACKENDS)
    precisions = precisions or ["fp32", "fp16", "int8"]
    batches = sorted(set(batches or [1]))
    if 1 not in batches:
        batches = [1] + batches
    if any(b < 1 for b in batches):
        raise BenchError("batch sizes must be >= 1")
    bundle = Bundle.load(bundle_dir, verify=True)
    manifest = bundle.manifest
    if box_from_first_pass is None:
        box_from_first_pass = bundle_box_from_first_pass(bundle)
    if box_from_first_pass:
        try:
            first_pass_prompt(bundle.prompt)  # fails before any backend is opened
        except ValueError as e:
            raise BenchError(f"bundle {bundle_dir}: {e}") from None

    rec_run, rec_fold = bundle_run(manifest)
    run_path = run_dir or rec_run
    run_model = None
    run_info = split = None
    if run_path is not None and Path(run_path, "run.json").exists():
        if "torch" in backends or data_dir is None:
            from ..runs import load_run

            run_model = load_run(run_path, fold=rec_fold)
            run_info, split = run_model.run, run_model.split
            if run_model.working_size != bundle.working_size or run_model.prompt.mode != bundle.prompt.mode:
                raise BenchError(f"run {run_path} (working size {run_model.working_size}, prompt "
                                 f"{run_model.prompt.mode}) does not match the bundle ({bundle.working_size}, "
                                 f"{bundle.prompt.mode})")
    elif run_path is not None:
        log(f"note: the bundle's run {run_path} is not here; torch is skipped" + ("" if data_dir else
            " and --data is needed"))
        run_path = None
    data = load_images(bundle.working_size, data_dir, run_info, split, limit, log)

    plans = make_plan(backends, precisions, device, bundle)
    log(f"bench: {len(data.ids)} images, device {device}, batches {batches}, warm-up {warmup}, repeats {repeats}; "
        f"{sum(p.skip is None for p in plans)} backend/precision pairs to run")
    results, ref = [], None
    if interleave:
        rows = bench_interleaved(plans, bundle, run_model, data, device, batches, warmup, repeats, threads, log,
                                 progress, box_from_first_pass)
        ref = next((o for (r, o), p in zip(rows, plans) if o is not None
                    and (p.backend, p.precision, p.mode) == ("torch", "fp32", "eager")), None)
        for r, outputs in rows:
            if outputs is not None and ref is not None:
                r["parity"] = parity(outputs, ref)
            results.append(r)
            log(summary_line(r))
    for plan in ([] if interleave else plans):
        r, outputs = bench_one(plan, bundle, run_model, data, device, batches, warmup, repeats, threads, ref, log,
                               progress, box_from_first_pass)
        if (plan.backend, plan.precision, plan.mode) == ("torch", "fp32", "eager") and outputs is not None:
            ref = outputs
            r["parity"] = parity(outputs, outputs)
        results.append(r)
        log(summary_line(r))
    del run_model
    add_reference_ratios(results)

    machine = full_machine_record()
    ref_rec = next((r for r in results if (r["backend"], r["precision"], r.get("mode")) == ("torch", "fp32", "eager")),
                   None)
    out = {
        "format": FORMAT,
        "created": utc_now(),
        "command": [Path(sys.argv[0]).name] + sys.argv[1:],
        "bundle": {"path": str(Path(bundle_dir).resolve()), "backbone": str(manifest.get("backbone")),
                   "working_size": bundle.working_size, "img_size": bundle.spec.img_size,
                   "prompt": bundle.prompt.mode, "threshold": bundle.threshold,
                   "box_source": ("first pass (the model's own first mask)" if box_from_first_pass else
                                  "ground truth" if bundle.prompt.needs_ground_truth else
                                  "mean-mask box" if bundle.prompt.mode in BOX_PROMPT_MODES else None),
                   "run": None if run_path is None else str(run_path), "fold": rec_fold},
        "data": {"source": data.source, "n_images": len(data.ids), "ids": data.ids},
        "settings": {"device": device, "backends": backends, "precisions": precisions, "batches": batches,
                     "warmup": warmup, "repeats": repeats, "threads": threads, "interleave": interleave,
                     "preprocess_threads": default_preprocess_threads()},
        "machine": machine,
        "versions": versions(),
        "reference": {"backend": "torch", "precision": "fp32", "mode": "eager",
                      "status": ref_rec["status"] if ref_rec else "skipped"},
        "results": results,
    }
    compare_lines = None
    if compare_path:
        compare_lines, records = compare(out, read_json(compare_path))
        out["compare"] = {"against": str(compare_path), "rows": records}
        log("compared with " + str(compare_path) + ":\n" + "\n".join(compare_lines))
    out["wall_s"] = time.perf_counter() - t_start
    out = _finite(out)
    check_results(out)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "results.json", out)
    write_text_atomic(out_dir / "results.md", markdown_report(out, compare_lines))
    latency_chart(out, out_dir / "latency.png")
    return out


def _finite(obj: Any) -> Any:
    """NaN/inf -> None so results.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def summary_line(r: dict) -> str:
    name = f"{r['backend']} {r['precision']}" + (f" ({r['mode']})" if r.get("mode") else "")
    if r["status"] != "ok":
        return f"  {name}: {r['status']}: {r['reason']}"
    lat = r["latency_ms"]["end_to_end"]
    acc = r["accuracy"]["f1"]
    s = f"  {name}: F1 {acc['mean']:.4f} (min {acc['min']:.4f}), end-to-end p50 {lat['p50']:.1f} ms p95 {lat['p95']:.1f} ms"
    if r.get("parity"):
        p = r["parity"]
        s += f", vs ref: mask F1 min {p['mask_f1']['min']:.4f}, max |dlogit| {p['max_abs_logit_diff']:.2e}, changed {p['changed_masks']}"
    return s


def run_bench_cli(*, bundle, data_dir, out_dir, backends, precisions, device, batches, warmup, repeats, limit,
                  compare_path, threads, run_dir=None, box_from_first_pass=None, interleave=False) -> None:
    import click

    from ..data import DataError
    from ..runs import RunError
    from ..runtime.bundle import BundleError

    try:
        res = run_bench(bundle, out_dir, data_dir=data_dir, run_dir=run_dir, backends=backends, precisions=precisions,
                        device=device, batches=batches, warmup=warmup, repeats=repeats, limit=limit, threads=threads,
                        compare_path=compare_path, box_from_first_pass=box_from_first_pass, interleave=interleave,
                        log=lambda m: click.echo(m, err=True))
    except (BenchError, BundleError, RunError, DataError) as e:
        raise click.ClickException(str(e)) from e
    for r in res["results"]:
        vs = (r.get("vs_reference") or {}).get("end_to_end_p50")
        if vs is not None and (r["backend"], r["precision"], r.get("mode")) != ("torch", "fp32", "eager"):
            click.echo(f"{r['backend']} {r['precision']}: end-to-end p50 = {vs:.2f}x torch fp32 eager (same images, same run)")
    click.echo(f"wrote {Path(out_dir) / 'results.json'}, results.md, latency.png ({res['wall_s']:.0f} s)")
