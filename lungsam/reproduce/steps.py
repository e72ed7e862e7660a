"""The resumable step engine of ``lungsam reproduce``: step folders, ``step.json``, reuse, training steps run in
this process, in worker processes (``--jobs``) or as Ray tasks (``--ray``, :mod:`lungsam.reproduce.ray_steps`).

A step is a folder and the settings that define it. :class:`Steps` runs it once: a finished step holds
``step.json`` (:class:`lungsam.layout.StepLayout`: name, kind, folder, settings, start, seconds, info) and is reused
when its settings are the same; a folder holding other settings is an error (never overwritten); a killed training
step (its run folder without ``step.json``) is continued with ``resume=True``. What the steps are, and in which
order, is the protocol's business (:mod:`lungsam.reproduce.protocol`).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..artifacts import read_json, utc_now, write_json_atomic
from ..errors import LungsamError
from ..layout import RunLayout, StepLayout

Log = Callable[[str], None]
_LOG = logging.getLogger(__name__)


class ProtocolError(LungsamError, RuntimeError):
    # exit 2: what it reports is the command line or --out's contents (data root layout, option values, a step
    # folder holding other settings), as it always did
    exit_code = 2


class Steps:
    """Runs steps once: ``step.json`` (settings, seconds, finish time) marks a finished step."""

    def __init__(self, root: Path, log: Log, ray: str | None = None, ray_cpus: int = 1, device: str = "auto"):
        self.root, self.log = root, log
        self.records: list[dict] = []
        # a Ray address: run_training sends its steps to Ray (lungsam.reproduce.ray_steps)
        self.ray, self.ray_cpus, self.device = ray, ray_cpus, device

    def reuse(self, name: str, kind: str, out: Path, settings: dict,
              normalize: Callable[[dict], dict] | None = None) -> dict | None:
        """The record of ``out``'s finished step when it holds ``settings`` (``None`` when it is still to run).
        ``normalize`` maps recorded settings to today's form (a training step recorded before a config field
        existed gets its default); a folder holding other settings is an error."""
        sj = StepLayout(out).step_json
        if not sj.exists():
            return None
        old = read_json(sj)
        recorded = old.get("settings")
        if normalize is not None and isinstance(recorded, dict):
            recorded = json.loads(json.dumps(normalize(recorded)))
        if recorded != json.loads(json.dumps(settings)):
            raise ProtocolError(f"{out} holds step {old.get('name')!r} with different settings; remove that folder "
                                f"or choose another --out")
        earlier = next((r for r in self.records if r["out"] == old["out"]), None)
        if earlier is not None:  # the same run serves two parts of the protocol (e.g. a grid cell)
            self.log(f"[{name}] same settings as [{earlier['name']}], sharing {out}")
            rec = {**old, "name": name, "kind": kind, "status": f"shared with: {earlier['name']}"}
        else:
            self.log(f"[{name}] finished earlier ({old['seconds']:.0f} s), reusing {out}")
            rec = {**old, "name": name, "kind": kind, "status": "reused"}
        self.records.append(rec)
        return rec

    def record(self, name: str, kind: str, out: Path, settings: dict, started: str, seconds: float,
               info: dict) -> dict:
        """Write ``out/step.json`` for a step that just ran and keep its record."""
        rec = {"name": name, "kind": kind, "out": str(out.relative_to(self.root)),
               "settings": json.loads(json.dumps(settings)), "started": started, "finished": utc_now(),
               "seconds": seconds, "info": info}
        write_json_atomic(StepLayout(out).step_json, rec)
        self.log(f"[{name}] done in {seconds:.0f} s")
        self.records.append({**rec, "status": "ran"})
        return self.records[-1]

    def run(self, name: str, kind: str, out: Path, settings: dict, fn: Callable[[], dict | None],
            normalize: Callable[[dict], dict] | None = None) -> dict:
        """Run ``fn`` in this process unless ``out`` holds a finished step with the same settings."""
        rec = self.reuse(name, kind, out, settings, normalize)
        return rec if rec is not None else self.execute(name, kind, out, settings, fn)

    def execute(self, name: str, kind: str, out: Path, settings: dict, fn: Callable[[], dict | None]) -> dict:
        """Run ``fn`` in this process, timed, and record it."""
        self.log(f"[{name}] running -> {out}")
        started, t0 = utc_now(), time.perf_counter()
        info = fn() or {}
        return self.record(name, kind, out, settings, started, time.perf_counter() - t0, info)

    def run_training(self, steps: list["TrainingStep"], jobs: int, progress: bool,
                     finished: Callable[["TrainingStep"], None] = lambda step: None) -> None:
        """Run the training ``steps`` that are not finished yet; ``finished(step)`` follows each step reused or
        done, with the records in the order of ``steps`` (whatever order the steps finish in). The steps must not
        depend on each other.

        ``jobs`` 1 (or one step to run): one after another in this process; the first failure stops the batch.
        Otherwise ``jobs`` at a time in worker processes that split this process's torch threads, costliest step
        first; a failed step does not stop the others, and the failures are raised together once they are done.
        Worker log lines go to stderr, prefixed with the step's name."""
        first, order = len(self.records), {s.name: i for i, s in enumerate(steps)}

        def done(s: TrainingStep) -> None:
            self.records[first:] = sorted(self.records[first:], key=lambda r: order[r["name"]])
            finished(s)

        todo = []
        for s in steps:
            if self.reuse(s.name, s.kind, s.out, s.settings, s.normalize) is None:
                todo.append(s)
            else:
                done(s)
        if self.ray is not None and todo:
            from .ray_steps import run_on_ray

            run_on_ray(self, todo, done, self.ray, cpus_per_step=self.ray_cpus, device=self.device)
        elif jobs <= 1 or len(todo) <= 1:
            for s in todo:
                self.execute(s.name, s.kind, s.out, s.settings,
                             lambda s=s: train_step(s.model, s.config, s.out, _quiet(self.log), progress))
                done(s)
        else:
            self._run_in_workers(todo, min(jobs, len(todo)), done)

    def _run_in_workers(self, todo: list["TrainingStep"], jobs: int, done: Callable[["TrainingStep"], None]) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        import torch

        threads = max(1, torch.get_num_threads() // jobs)
        self.log(f"running {len(todo)} training steps, {jobs} at a time ({threads} torch thread(s) each)")
        errors = []
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            pending = {}
            for s in sorted(todo, key=lambda s: -s.work):
                self.log(f"[{s.name}] queued -> {s.out}")
                pending[pool.submit(_train_step_in_worker, s.name, s.model, s.config, s.out)] = s
            try:
                running = set(pending)
                while running:  # waits of at most a second, so Ctrl-C reaches this process at once
                    finished_now, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in finished_now:
                        s = pending[fut]
                        try:
                            started, seconds, info = fut.result()
                        except Exception as e:  # noqa: BLE001 -- reported with the step's name, after the rest
                            self.log(f"[{s.name}] failed: {e}")
                            errors.append((s, e))
                            continue
                        # how it ran, so cost estimates can tell overlapping step times apart
                        info = {**info, "jobs": jobs, "threads": threads}
                        self.record(s.name, s.kind, s.out, s.settings, started, seconds, info)
                        done(s)
            except BaseException:  # Ctrl-C, or a failure here: stop the workers now (a rerun resumes their steps)
                workers = list((pool._processes or {}).values())  # no public way before Python 3.14
                pool.shutdown(wait=False, cancel_futures=True)  # (this forgets the workers)
                for w in workers:
                    w.terminate()
                raise
        if errors:
            raise ProtocolError("training step(s) failed: " + "; ".join(f"[{s.name}] {e}" for s, e in errors)
                                ) from errors[0][1]


@dataclass
class TrainingStep:
    """One training step: a SAM decoder run (``model`` "sam", ``config`` a TrainConfig's dict) or the U-Net
    baseline ("unet", a UNetConfig's dict), in plain values a worker process receives.

    Attributes:
        settings: what ``step.json`` records and a rerun compares (the config's ``comparable()``).
        work: relative cost (training images x folds) to start the costliest steps first.
    """

    name: str
    kind: str
    out: Path
    model: str
    config: dict
    settings: dict
    work: float

    def normalize(self, recorded: dict) -> dict:
        """Recorded settings in today's form (fields added since get their defaults)."""
        config_class, _ = _model_api(self.model)
        return config_class.from_dict(recorded).comparable()


def _model_api(model: str) -> tuple[type, Callable[..., dict]]:
    """``(config class, run trainer)`` of a training step's ``model``: "unet" or "sam"."""
    if model == "unet":
        from ..train.unet import UNetConfig, train_unet_run

        return UNetConfig, train_unet_run
    from ..train.config import TrainConfig
    from ..train.run import train_run

    return TrainConfig, train_run


def train_step(model: str, config: dict, out: Path, log: Log = _LOG.info, progress: bool = True) -> dict:
    """Train the run ``config`` describes into ``out`` (continuing a killed one); returns the step's info."""
    config_class, train = _model_api(model)
    resume = RunLayout(out).run_json.exists()
    if resume:
        log(f"continuing the killed run in {out}")
    try:
        s = train(config_class.from_dict(config), out, resume=resume, log=log, progress=progress)
    except ValueError as e:
        raise ProtocolError(f"{out}: {e}") from e
    return {"test_f1": s["aggregate"]["test_f1_across_folds"], "folds": len(s["folds"])}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _train_step_in_worker(name: str, model: str, config: dict, out: Path) -> tuple[str, float, dict]:
    """:func:`train_step` in a worker process (no progress bars; log lines on stderr carry the step's name);
    returns ``(started, seconds, info)``."""
    log = _worker_log(name)
    started, t0 = utc_now(), time.perf_counter()
    info = train_step(model, config, out, _quiet(log), progress=False)
    return started, time.perf_counter() - t0, info


def _worker_log(name: str) -> Log:
    """A worker process's ``log``: INFO on ``lungsam.reproduce.worker``, which writes ``[step name] message`` lines
    to this process's stderr (a spawned worker or Ray task has no logging set up of its own)."""
    logger = logging.getLogger(f"{__name__}.worker")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return lambda m: logger.info(f"[{name}] {m}")


def _quiet(log: Log) -> Log:
    return lambda m: None if m.startswith("skipping pair") else log(m)
