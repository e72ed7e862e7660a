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

The pieces: :mod:`~lungsam.benchmarks.plan` (which rows), :mod:`~lungsam.benchmarks.inputs` (which images),
:mod:`~lungsam.benchmarks.backends` (the rows' backends), :mod:`~lungsam.benchmarks.timing` (measuring),
:mod:`~lungsam.benchmarks.report` (results.md, latency.png); this module runs them in order and writes the
results (:class:`lungsam.layout.BenchLayout`).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..artifacts import read_json, utc_now, write_json_atomic, write_text_atomic
from ..layout import BenchLayout, RunLayout
from .backends import FIRST_PASS_MODE
from .inputs import Images, bundle_run, load_images
from .machine import full_machine_record, versions
from .plan import BenchError, Plan, make_plan
from .report import compare, latency_chart, markdown_report
from .schema import BACKENDS, FORMAT, check_results
from .stats import default_preprocess_threads, ratio
from .timing import bench_interleaved, bench_one, parity

Log = Callable[[str], None]
_LOG = logging.getLogger(__name__)
REFERENCE = ("torch", "fp32", "eager")  # (backend, precision, mode) of the row every other row is compared with
DEFAULT_PRECISIONS = ["fp32", "fp16", "int8"]


def run_bench(bundle_dir: str | Path, out_dir: str | Path, *, data_dir: str | None = None, run_dir: str | None = None,
              backends: list[str] | None = None, precisions: list[str] | None = None, device: str = "cpu",
              batches: list[int] | None = None, warmup: int = 2, repeats: int = 3, limit: int | None = None,
              threads: int | None = None, compare_path: str | None = None, progress: bool = True,
              box_from_first_pass: bool | None = None, interleave: bool = False, log: Log = _LOG.info) -> dict:
    """Benchmark a bundle; writes ``results.json``, ``results.md`` and ``latency.png`` to ``out_dir``.

    ``interleave``: every row side by side, image by image (:func:`bench_interleaved`), for ratios on a shared
    machine; otherwise one row after the other.

    ``box_from_first_pass`` (bundles prompted with a box): every backend takes each image's box from the
    model's own first mask (two decoder calls, timed together in the decoder stage); ``None``: the bundle's
    default (``manifest["inference"]``). Otherwise ``box``/``both`` bundles get the ground-truth box.
    """
    t_start = time.perf_counter()
    backends = backends or list(BACKENDS)
    precisions = precisions or list(DEFAULT_PRECISIONS)
    batches = batch_sizes(batches)
    bundle, box_from_first_pass = open_bundle(bundle_dir, box_from_first_pass)
    run_model, run_path, fold = reference_run(bundle, run_dir, backends, data_dir, log)
    data = load_images(bundle.working_size, data_dir, None if run_model is None else run_model.run,
                       None if run_model is None else run_model.split, limit, log)
    plans = make_plan(backends, precisions, device, bundle)
    log(f"bench: {len(data.ids)} images, device {device}, batches {batches}, warm-up {warmup}, repeats {repeats}; "
        f"{sum(p.skip is None for p in plans)} backend/precision pairs to run")
    schedule = bench_side_by_side if interleave else bench_sequential
    results = schedule(plans, bundle, run_model, data, device, batches, warmup, repeats, threads, log, progress,
                       box_from_first_pass)
    del run_model
    add_reference_ratios(results)
    settings = {"device": device, "backends": backends, "precisions": precisions, "batches": batches,
                "warmup": warmup, "repeats": repeats, "threads": threads, "interleave": interleave,
                "preprocess_threads": default_preprocess_threads()}
    out = results_record(bundle, bundle_dir, box_from_first_pass, run_path, fold, data, settings, results)
    compare_lines = None
    if compare_path:
        compare_lines, records = compare(out, read_json(compare_path))
        out["compare"] = {"against": str(compare_path), "rows": records}
        log("compared with " + str(compare_path) + ":\n" + "\n".join(compare_lines))
    out["wall_s"] = time.perf_counter() - t_start
    out = _finite(out)
    check_results(out)
    write_report(out, out_dir, compare_lines)
    return out


def batch_sizes(batches: list[int] | None) -> list[int]:
    """The throughput batch sizes, sorted, always with 1 (the latency rows)."""
    out = sorted(set(batches or [1]))
    if 1 not in out:
        out = [1] + out
    if any(b < 1 for b in out):
        raise BenchError("batch sizes must be >= 1")
    return out


def open_bundle(bundle_dir: str | Path, box_from_first_pass: bool | None):
    """``(Bundle, whether boxes come from a first pass)``: the bundle loaded and verified; ``None`` takes the
    bundle's default, and a first-pass box on a bundle prompted without a box fails before any backend opens."""
    from ..prompts import first_pass_prompt
    from ..runtime.bundle import Bundle
    from ..runtime.segmenter import bundle_box_from_first_pass

    bundle = Bundle.load(bundle_dir, verify=True)
    if box_from_first_pass is None:
        box_from_first_pass = bundle_box_from_first_pass(bundle)
    if box_from_first_pass:
        try:
            first_pass_prompt(bundle.prompt)
        except ValueError as e:
            raise BenchError(f"bundle {bundle_dir}: {e}") from None
    return bundle, box_from_first_pass


def reference_run(bundle, run_dir: str | None, backends: list[str], data_dir: str | None, log: Log):
    """``(RunModel or None, run folder or None, fold)``: the training run behind the torch reference (``run_dir``,
    else the one the bundle records, ``Bundle.meta.run``), loaded when torch is benchmarked or its test split is
    the data; it must match the bundle's working size and prompt."""
    rec_run, rec_fold = bundle_run(bundle.meta)
    run_path = run_dir or rec_run
    if run_path is None:
        return None, None, rec_fold
    if not RunLayout(run_path).run_json.exists():
        log(f"note: the bundle's run {run_path} is not here; torch is skipped" + ("" if data_dir else
            " and --data is needed"))
        return None, None, rec_fold
    if "torch" not in backends and data_dir is not None:
        return None, run_path, rec_fold
    from ..runs import load_run

    run_model = load_run(run_path, fold=rec_fold)
    if run_model.working_size != bundle.working_size or run_model.prompt.mode != bundle.prompt.mode:
        raise BenchError(f"run {run_path} (working size {run_model.working_size}, prompt "
                         f"{run_model.prompt.mode}) does not match the bundle ({bundle.working_size}, "
                         f"{bundle.prompt.mode})")
    return run_model, run_path, rec_fold


def bench_sequential(plans: list[Plan], bundle, run_model, data: Images, device: str, batches: list[int],
                     warmup: int, repeats: int, threads: int | None, log: Log, progress: bool = True,
                     box_from_first_pass: bool = False) -> list[dict]:
    """Every plan one after the other (:func:`bench_one`), each row logged as it finishes; the torch reference
    (planned first) gives the parity reference of the rows after it."""
    results = []
    ref = None
    for plan in plans:
        r, outputs = bench_one(plan, bundle, run_model, data, device, batches, warmup, repeats, threads, ref, log,
                               progress, box_from_first_pass)
        if is_reference(plan) and outputs is not None:
            ref = outputs
            r["parity"] = parity(outputs, outputs)
        results.append(r)
        log(summary_line(r))
    return results


def bench_side_by_side(plans: list[Plan], bundle, run_model, data: Images, device: str, batches: list[int],
                       warmup: int, repeats: int, threads: int | None, log: Log, progress: bool = True,
                       box_from_first_pass: bool = False) -> list[dict]:
    """Every plan interleaved (:func:`bench_interleaved`), then each measured row's parity against the torch
    reference's outputs (when the reference ran); the rows are logged at the end."""
    rows = bench_interleaved(plans, bundle, run_model, data, device, batches, warmup, repeats, threads, log,
                             progress, box_from_first_pass)
    ref = next((o for (_, o), p in zip(rows, plans) if o is not None and is_reference(p)), None)
    results = []
    for r, outputs in rows:
        if outputs is not None and ref is not None:
            r["parity"] = parity(outputs, ref)
        results.append(r)
        log(summary_line(r))
    return results


def is_reference(plan: Plan) -> bool:
    return (plan.backend, plan.precision, plan.mode) == REFERENCE


def add_reference_ratios(results: list[dict]) -> None:
    """Each measured row's ``vs_reference``: its latency and best throughput over the torch reference's."""
    ref = next((r for r in results if (r["backend"], r["precision"], r.get("mode")) == REFERENCE
                and r["status"] == "ok"), None)
    if ref is None:
        return
    best = lambda r: max(t["images_per_s"] for t in r["throughput"])  # noqa: E731
    for r in results:
        if r["status"] != "ok":
            continue
        r["vs_reference"] = {
            "end_to_end_p50": ratio(r["latency_ms"]["end_to_end"]["p50"], ref["latency_ms"]["end_to_end"]["p50"]),
            "end_to_end_mean": ratio(r["latency_ms"]["end_to_end"]["mean"],
                                     ref["latency_ms"]["end_to_end"]["mean"]),
            "best_throughput": ratio(best(r), best(ref)),
        }


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------

def results_record(bundle, bundle_dir: str | Path, box_from_first_pass: bool, run_path: str | None,
                   fold: int | None, data: Images, settings: dict, results: list[dict]) -> dict:
    """``results.json`` (format :data:`lungsam.benchmarks.schema.FORMAT`) before the comparison and wall time."""
    ref_rec = next((r for r in results if (r["backend"], r["precision"], r.get("mode")) == REFERENCE), None)
    return {
        "format": FORMAT,
        "created": utc_now(),
        "command": [Path(sys.argv[0]).name] + sys.argv[1:],
        "bundle": bundle_record(bundle, bundle_dir, box_from_first_pass, run_path, fold),
        "data": {"source": data.source, "n_images": len(data.ids), "ids": data.ids},
        "settings": settings,
        "machine": full_machine_record(),
        "versions": versions(),
        "reference": {"backend": "torch", "precision": "fp32", "mode": "eager",
                      "status": ref_rec["status"] if ref_rec else "skipped"},
        "results": results,
    }


def bundle_record(bundle, bundle_dir: str | Path, box_from_first_pass: bool, run_path: str | None,
                  fold: int | None) -> dict:
    """What results.json says about the bundle (read from ``Bundle.meta``) and where its boxes came from."""
    from ..prompts import BOX_PROMPT_MODES

    return {"path": str(Path(bundle_dir).resolve()), "backbone": str(bundle.meta.backbone),
            "working_size": bundle.working_size, "img_size": bundle.spec.img_size,
            "prompt": bundle.prompt.mode, "threshold": bundle.threshold,
            "box_source": ("first pass (the model's own first mask)" if box_from_first_pass else
                           "ground truth" if bundle.prompt.needs_ground_truth else
                           "mean-mask box" if bundle.prompt.mode in BOX_PROMPT_MODES else None),
            "run": None if run_path is None else str(run_path), "fold": fold,
            "int8_method": None if bundle.meta is None else bundle.meta.int8_method()}


def write_report(results: dict, out_dir: str | Path, compare_lines: list[str] | None = None) -> BenchLayout:
    """``results.json``, the ``results.md`` rendered from it (:func:`lungsam.benchmarks.report.markdown_report`)
    and ``latency.png``, into ``out_dir``."""
    layout = BenchLayout(Path(out_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.results_json, results)
    write_text_atomic(layout.results_md, markdown_report(results, compare_lines))
    latency_chart(results, layout.latency_png)
    return layout


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
    """One row in a line: F1, end-to-end latency and parity with the reference (or why it did not run)."""
    name = f"{r['backend']} {r['precision']}" + (f" ({r['mode']})" if r.get("mode") else "")
    if r["status"] != "ok":
        return f"  {name}: {r['status']}: {r['reason']}"
    lat = r["latency_ms"]["end_to_end"]
    acc = r["accuracy"]["f1"]
    s = (f"  {name}: F1 {acc['mean']:.4f} (min {acc['min']:.4f}), end-to-end p50 {lat['p50']:.1f} ms "
         f"p95 {lat['p95']:.1f} ms")
    if r.get("parity"):
        p = r["parity"]
        s += (f", vs ref: mask F1 min {p['mask_f1']['min']:.4f}, max |dlogit| {p['max_abs_logit_diff']:.2e}, "
              f"changed {p['changed_masks']}")
    return s


__all__ = ["FIRST_PASS_MODE", "BenchError", "Images", "Plan", "bench_interleaved", "bench_one", "make_plan",
           "parity", "run_bench"]
