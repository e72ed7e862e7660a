"""``lungsam reproduce --ray [ADDRESS]``: the protocol's independent training steps as Ray tasks.

The same steps, ``step.json`` records, results and resume behaviour as one process or ``--jobs``: a task runs
:func:`lungsam.reproduce.steps._train_step_in_worker` (which resumes a killed run from its ``train_state.pt``),
the driver records each finished step in the protocol's order. Ray schedules by resources: each step asks for
``cpus_per_step`` CPUs (its torch threads) and, when the cluster has GPUs and the device is not ``cpu``, one GPU;
a task lost with its node is retried by Ray (``max_retries``) and resumes where its files stopped. The results
folder must be on storage every node sees. Without an address (``local``) a local Ray starts (loopback,
dashboard and usage stats off) and stops at the end.

``--jobs`` stays for one machine without Ray (a plain process pool); ``--ray`` is for clusters (and works locally).
"""
from __future__ import annotations

import os
from collections.abc import Callable

LOCAL = "local"


def _run_step(name: str, model: str, config: dict, out, threads: int, gpu: bool):
    """One training step inside a Ray worker, with ``threads`` torch threads (Ray sets ``CUDA_VISIBLE_DEVICES`` to
    the task's GPU when ``gpu``; the step's device ``auto`` then picks it)."""
    import torch

    from .steps import _train_step_in_worker

    torch.set_num_threads(threads)
    return _train_step_in_worker(name, model, config, out)


def run_on_ray(steps, todo: list, done: Callable, address: str, *, cpus_per_step: int = 1,
               device: str = "auto", max_retries: int = 2) -> None:
    """Run the training steps ``todo`` as Ray tasks; ``steps`` is the protocol's :class:`Steps` (records and log),
    ``done(step)`` follows each recorded step. Failures are raised together once the others are done."""
    from .steps import ProtocolError

    try:
        import ray
    except ImportError as e:
        raise ProtocolError("--ray needs Ray: pip install 'lungsam[ray]'") from e
    started_here = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address in (None, LOCAL):
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, _node_ip_address="127.0.0.1",
                     configure_logging=False)
        else:
            ray.init(address=address, configure_logging=False)
        started_here = True
    try:
        resources = ray.cluster_resources()
        gpu = device != "cpu" and resources.get("GPU", 0) >= 1
        at_once = max(1, int(resources.get("GPU", 0) if gpu else resources.get("CPU", 1) // cpus_per_step))
        steps.log(f"running {len(todo)} training steps on Ray ({address or LOCAL}: {resources.get('CPU', 0):g} CPUs, "
                  f"{resources.get('GPU', 0):g} GPUs; {cpus_per_step} CPU{' + 1 GPU' if gpu else ''} per step, "
                  f"up to {at_once} at a time)")
        task = ray.remote(_run_step).options(num_cpus=cpus_per_step, num_gpus=1 if gpu else 0,
                                             max_retries=max_retries)
        pending = {}
        for s in sorted(todo, key=lambda s: -s.work):
            steps.log(f"[{s.name}] queued on Ray -> {s.out}")
            pending[task.remote(s.name, s.model, s.config, s.out, cpus_per_step, gpu)] = s
        errors = []
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # 1 s waits: Ctrl-C is seen at once
                for ref in ready:
                    s = pending.pop(ref)
                    try:
                        started, seconds, info = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 -- reported with the step's name, after the rest
                        steps.log(f"[{s.name}] failed: {e}")
                        errors.append((s, e))
                        continue
                    info = {**info, "jobs": at_once, "threads": cpus_per_step, "ray": address or LOCAL,
                            "gpu": gpu}
                    steps.record(s.name, s.kind, s.out, s.settings, started, seconds, info)
                    done(s)
        except BaseException:  # Ctrl-C: stop the tasks now (a rerun resumes their steps)
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if errors:
            raise ProtocolError("training step(s) failed: " + "; ".join(f"[{s.name}] {e}" for s, e in errors)
                                ) from errors[0][1]
    finally:
        if started_here:
            ray.shutdown()
