"""``lungsam predict --ray``: the torch-free runtime over an archive on a Ray cluster (or a local Ray).

Ray Data maps the input list through a fixed pool of actors; each actor loads the bundle once
(:meth:`LungSegmenter.load`) and runs :meth:`LungSegmenter.segment_many` on its blocks, writing each mask with
:func:`lungsam.runtime.predict.record_outputs` (the same files and records as ``lungsam predict``) into ``--out``,
which must therefore be a folder every worker node sees (a shared filesystem; on one machine any folder).

The driver receives the small per-file records, appends them to ``predictions.partial.jsonl`` as they come
(one JSON line each, flushed), and at the end writes ``predictions.jsonl`` in input order, ``predict.json``
(with a ``ray`` section) and, with ground truth, ``metrics.json``, all atomically. A rerun into the same folder
skips every input whose record is ``ok`` and whose outputs exist (from ``predictions.jsonl`` or the partial
journal of an interrupted run); failed inputs are tried again. ``ray_run.json`` pins the bundle and options a
folder's results were made with; a rerun with others is refused instead of mixing results.

Failures: Ray Data restarts a dead actor and retries its block (``max_restarts=-1``, ``max_task_retries=-1``,
Ray Data's actor-pool defaults); mask writes are atomic and deterministic, so a retried block rewrites the same
files. The driver counts rows that arrive twice for one input (``ray.duplicate_rows`` in ``predict.json``) and
keeps one record per input.

Ray is imported when a run starts (it is torch-free); ``pip install 'lungsam[ray]'``.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import atomic_path, dumps_json, read_json, sha256_file, write_json_atomic
from ..errors import LungsamError
from ..imageio import list_inputs
from ..layout import PredictLayout
from ..manifest import MANIFEST_FILE
from .predict import PredictSummary, output_stems, record_outputs, write_summary

_NAMES = PredictLayout(Path("."))
RUN_FILE = _NAMES.ray_run_json.name
JOURNAL = _NAMES.partial_predictions_jsonl.name
RUN_FORMAT = "lungsam-ray-predict/1"
LOCAL = "local"  # --ray without an address: start a local Ray on this machine


class RayBatchError(LungsamError, RuntimeError):
    """A Ray batch run cannot start or resume (message names the file or option)."""


@dataclass(frozen=True)
class SegmenterOptions:
    """What each worker passes to :meth:`LungSegmenter.load` and how it batches and writes."""

    backend: str = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    allow_fallback: bool = False
    threads: int | None = None
    box_from_first_pass: bool | None = None  # the boolean alias of box_source
    box_source: str | None = None  # the prompt policy (lungsam.runtime.prompting); None: the bundle's
    batch_size: int = 1
    overlay: bool = False
    ground_truth: str | None = None
    expect_digest: str | None = None
    max_pixels: int | None = 64_000_000
    dicom_seg: bool = False  # DICOM-SEG (and SR / SC) beside the masks, as `lungsam predict --dicom-seg`
    fractional: bool = False
    sr: bool = False
    secondary_capture: bool = False
    qc_site: str | None = None  # a site's flag line (lungsam qc-site), as `lungsam predict --qc-site`
    qc_jitter: bool = True  # False: the flag without its prompt-jitter term, as `lungsam predict --no-qc-jitter`

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise RayBatchError("--ray needs Ray Data: pip install 'lungsam[ray]' (ray[data])") from e
    return ray


def connect(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Connect to Ray; returns True when this call started it (the caller then shuts it down).

    ``address`` ``None`` or ``"local"``: a Ray already initialised in this process is used as is; otherwise a
    local one starts with ``num_cpus`` (default: all cores), bound to loopback, dashboard off, usage stats off.
    Any other address (``auto``, ``ray://host:10001``, ``host:6379``) joins that cluster.
    """
    ray = _import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address in (None, LOCAL):
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except ConnectionError as e:
            raise RayBatchError(f"--ray {address}: cannot connect to a Ray cluster there ({e})") from e
    return True


class SegmentBlocks:
    """Ray Data actor: loads the bundle once, then segments each block of ``{"index", "file", "stem"}`` rows.

    Returns ``{"index", "record" (JSON line), "setup" (JSON of :meth:`LungSegmenter.describe` on the actor's
    first block, else "")}``.
    """

    def __init__(self, bundle: str, out_dir: str, options: dict[str, Any], cwd: str | None = None):
        from .segmenter import LungSegmenter

        if cwd and os.path.isdir(cwd):  # relative inputs/bundle/ground truth mean what they meant to the driver
            os.chdir(cwd)

        self.options = SegmenterOptions(**options)
        o = self.options
        self.out = Path(out_dir)
        self.segmenter = LungSegmenter.load(bundle, backend=o.backend, device=o.device, precision=o.precision,
                                            allow_fallback=o.allow_fallback, threads=o.threads,
                                            box_from_first_pass=o.box_from_first_pass, box_source=o.box_source,
                                            expect_digest=o.expect_digest, max_pixels=o.max_pixels,
                                            qc_jitter=o.qc_jitter)
        if o.qc_site is not None:
            self.segmenter.use_site_operating_point(o.qc_site)
        self.record_hook = None
        if o.dicom_seg:
            from .dicom_out import dicom_record_hook

            self.record_hook = dicom_record_hook(self.segmenter.bundle, fractional=o.fractional, sr=o.sr,
                                                 secondary_capture=o.secondary_capture)
        self._described = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        o = self.options
        paths = [Path(str(f)) for f in batch["file"]]
        records = []
        results = self.segmenter.segment_many(paths, batch_size=o.batch_size)
        for path, stem, r in zip(paths, batch["stem"], results):
            rec = record_outputs(self.out, path, str(stem), r, overlay=o.overlay, ground_truth=o.ground_truth,
                                 record_hook=self.record_hook)
            records.append(dumps_json(rec))
        setup = [""] * len(records)
        if records and not self._described:
            setup[0] = dumps_json(self.segmenter.describe())
            self._described = True
        return {"index": np.asarray(batch["index"], np.int64), "record": np.asarray(records, dtype=object),
                "setup": np.asarray(setup, dtype=object)}


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------

def run_identity(bundle: str | Path, options: SegmenterOptions) -> dict[str, Any]:
    """What a folder's results depend on: the bundle's manifest (sha256; it lists every model file's sha256)
    and the options that change outputs."""
    manifest = Path(bundle) / MANIFEST_FILE if Path(bundle).is_dir() else Path(bundle)
    if not manifest.is_file():
        raise RayBatchError(f"{bundle}: not a bundle (no {MANIFEST_FILE})")
    o = options.to_dict()
    keys = ("backend", "device", "precision", "box_from_first_pass", "overlay", "ground_truth")
    keys += ("box_source",) if o["box_source"] is not None else ()  # absent: folders of earlier versions resume
    site = {} if o["qc_site"] is None else {"qc_site_sha256": sha256_file(o["qc_site"])}  # the flags depend on it
    return {"format": RUN_FORMAT, "bundle_manifest_sha256": sha256_file(manifest), "options": {k: o[k] for k in keys},
            **site}


def read_records(path: Path) -> list[dict]:
    """JSON lines of ``path``; an incomplete last line (an interrupted write) is dropped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "file" in rec:
            out.append(rec)
    return out


def is_complete(rec: dict, out: Path, options: SegmenterOptions) -> bool:
    """An ``ok`` record whose mask (and overlay, when asked) exist in ``out`` and that carries its score
    (or the reason it has none) when ground truth is asked."""
    if rec.get("status") != "ok" or not rec.get("mask") or not (out / rec["mask"]).is_file():
        return False
    if options.overlay and not (rec.get("overlay") and (out / rec["overlay"]).is_file()):
        return False
    return options.ground_truth is None or "f1" in rec or "score_error" in rec


def completed(out: Path, identity: dict, options: SegmenterOptions) -> dict[str, dict]:
    """``{file: record}`` of inputs already complete in ``out`` (refuses a folder made with another bundle or
    options)."""
    layout = PredictLayout(out)
    run_file = layout.ray_run_json
    if run_file.exists():
        before = read_json(run_file)
        if before != identity:
            raise RayBatchError(
                f"{run_file}: {out} holds results of another bundle or options ({before.get('options')}, bundle "
                f"manifest sha256 {str(before.get('bundle_manifest_sha256'))[:12]}...); use a new --out or delete it")
    elif layout.predictions_jsonl.exists():
        raise RayBatchError(f"{layout.predictions_jsonl} exists but {RUN_FILE} does not (a plain `lungsam predict` "
                            "folder?): use a new --out to run with --ray")
    done: dict[str, dict] = {}
    for rec in read_records(layout.predictions_jsonl) + read_records(layout.partial_predictions_jsonl):
        if is_complete(rec, out, options):
            done[rec["file"]] = rec
    return done


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------

def _last_line(e: BaseException) -> str:
    """The innermost message of a (Ray-wrapped) exception: the last non-empty line of its text."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


@dataclass(frozen=True)
class RayPool:
    """Where and how wide a run goes: the Ray ``address``, ``workers`` actors with their resources, inputs per
    block (the unit a dead actor's retry redoes), and the CPUs of a local Ray started here."""

    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    block_size: int = 16
    num_cpus: int | None = None

    def check(self, options: SegmenterOptions) -> None:
        if self.workers < 1 or self.block_size < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("workers and block_size must be >= 1, cpus_per_worker > 0, gpus_per_worker >= 0")
        if self.gpus_per_worker > 0 and options.device != "cuda":
            raise RayBatchError("GPU workers (--ray-gpus-per-worker > 0) need --device cuda")


@dataclass
class RayProgress:
    """What the driver saw: the records by input index, the first actor's setup, duplicate rows, and the driver
    clock when Ray was connected and when the last new record came (throughput without Ray's start-up)."""

    records: dict[int, dict]
    setup: dict | None = None
    duplicates: int = 0
    t_ray: float | None = None
    t_last: float | None = None
    ran: int = 0

    def take(self, row: dict) -> dict | None:
        """One output row of the actors: its record when it is new (else ``None``: a retried block's duplicate)."""
        if row["setup"] and self.setup is None:
            self.setup = json.loads(row["setup"])
        i = int(row["index"])
        if i in self.records:
            self.duplicates += 1
            return None
        rec = self.records[i] = json.loads(row["record"])
        self.t_last = time.perf_counter()
        return rec

    def section(self, pool: RayPool, n_inputs: int, t0: float) -> dict:
        """``predict.json``'s ``ray`` section."""
        span = None if self.t_last is None else self.t_last - self.t_ray
        return {"address": pool.address or LOCAL, "workers": pool.workers, "cpus_per_worker": pool.cpus_per_worker,
                "gpus_per_worker": pool.gpus_per_worker, "block_size": pool.block_size, "ran": self.ran,
                "skipped_complete": n_inputs - self.ran, "duplicate_rows": self.duplicates,
                "start_s": None if self.t_ray is None else round(self.t_ray - t0, 3),
                "ray_s": None if span is None else round(span, 3),
                "images_per_s": None if span is None else round(self.ran / max(span, 1e-9), 4)}


def predict_ray(bundle: str | Path, inputs: Iterable[str | Path], out_dir: str | Path, *,
                options: SegmenterOptions = SegmenterOptions(), address: str | None = None, workers: int = 1,
                cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, block_size: int = 16,
                num_cpus: int | None = None, on_record: Callable[[dict], None] | None = None) -> PredictSummary:
    """Segment ``inputs`` (files/folders) into ``out_dir`` with a pool of ``workers`` Ray actors.

    Args:
        options: segmenter and output options (as ``lungsam predict``'s).
        address: ``None``/``"local"`` (a local Ray, or the one this process already initialised) or a
            cluster address.
        workers: actors in the pool (each loads the bundle once).
        cpus_per_worker, gpus_per_worker: Ray resources per actor (``gpus_per_worker > 0`` needs
            ``options.device == "cuda"``).
        block_size: inputs per Ray Data block (the unit a dead actor's retry redoes).
        num_cpus: CPUs of a local Ray started here (default all cores).
        on_record: called on the driver with each new record as it arrives.
    Returns the :class:`PredictSummary` of all inputs (records in input order, skipped ones included).
    """
    pool = RayPool(address, workers, cpus_per_worker, gpus_per_worker, block_size, num_cpus)
    pool.check(options)
    t0 = time.perf_counter()
    layout = PredictLayout(Path(out_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    paths = list_inputs(list(inputs))
    stems = output_stems(paths)
    identity = run_identity(bundle, options)
    done = completed(layout.root, identity, options)
    write_json_atomic(layout.ray_run_json, identity)
    progress = RayProgress(records={i: done[str(p)] for i, p in enumerate(paths) if str(p) in done})
    todo = [{"index": i, "file": str(p), "stem": s} for i, (p, s) in enumerate(zip(paths, stems))
            if i not in progress.records]
    if todo:
        run_actors(bundle, layout, todo, options, pool, progress, on_record)
    summary = write_records(layout, paths, progress.records)
    summary.seconds = time.perf_counter() - t0
    setup = progress.setup or earlier_setup(layout, bundle, options)
    write_summary(layout.root, summary, setup, len(paths), ground_truth=options.ground_truth,
                  extra={"ray": progress.section(pool, len(paths), t0)})
    return summary


def run_actors(bundle: str | Path, layout: PredictLayout, todo: list[dict], options: SegmenterOptions, pool: RayPool,
               progress: RayProgress, on_record: Callable[[dict], None] | None) -> None:
    """Map ``todo`` rows through a pool of :class:`SegmentBlocks` actors, journaling each new record in
    ``predictions.partial.jsonl`` as it arrives; shuts down a Ray it started."""
    ray = _import_ray()
    started = connect(pool.address, num_cpus=pool.num_cpus)
    progress.t_ray = time.perf_counter()
    progress.ran = len(todo)
    try:
        ds = ray.data.from_items(todo, override_num_blocks=max(1, -(-len(todo) // pool.block_size)))
        ds = ds.map_batches(SegmentBlocks, batch_size=pool.block_size, num_cpus=pool.cpus_per_worker,
                            compute=ray.data.ActorPoolStrategy(size=pool.workers),
                            num_gpus=pool.gpus_per_worker or None, batch_format="numpy",
                            fn_constructor_kwargs={"bundle": str(bundle), "out_dir": str(layout.root.resolve()),
                                                   "options": options.to_dict(), "cwd": os.getcwd()})
        with open(layout.partial_predictions_jsonl, "a", encoding="utf-8") as journal:
            for row in ds.iter_rows():
                rec = progress.take(row)
                if rec is None:
                    continue
                journal.write(row["record"] + "\n")
                journal.flush()
                if on_record is not None:
                    on_record(rec)
    except Exception as e:  # noqa: BLE001 -- Ray wraps the workers' errors; say what failed, keep the journal
        raise RayBatchError(f"the Ray run failed: {_last_line(e)}; {len(progress.records)} inputs are complete in "
                            f"{layout.root} (a rerun resumes)") from e
    finally:
        if started:
            ray.shutdown()


def write_records(layout: PredictLayout, paths: list[Path], records: dict[int, dict]) -> PredictSummary:
    """``predictions.jsonl`` in input order, atomically (the partial journal removed after it); refuses a run
    with an input Ray returned no record for."""
    missing = [str(paths[i]) for i in range(len(paths)) if i not in records]
    if missing:
        raise RayBatchError(f"Ray returned no record for {len(missing)} inputs (first: {missing[0]}); rerun to resume")
    summary = PredictSummary(jsonl=layout.predictions_jsonl)
    summary.records = [records[i] for i in range(len(paths))]
    summary.ok = sum(r["status"] == "ok" for r in summary.records)
    summary.failed = len(summary.records) - summary.ok
    with atomic_path(summary.jsonl) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in summary.records:
            f.write(dumps_json(rec) + "\n")
    layout.partial_predictions_jsonl.unlink(missing_ok=True)
    return summary


def earlier_setup(layout: PredictLayout, bundle: str | Path, options: SegmenterOptions) -> dict:
    """What ran, when every input was complete already: what the earlier run's ``predict.json`` recorded."""
    before = read_json(layout.predict_json) if layout.predict_json.exists() else {}
    return before.get("segmenter") or {"bundle": str(bundle), "threshold": None, "backend": options.backend,
                                       "device": options.device, "precision": options.precision, "fallbacks": []}
