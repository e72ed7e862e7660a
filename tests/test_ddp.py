"""``torchrun --nproc-per-node 2 -m lungsam train``: DDP on CPU (gloo) gives one process's weights."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from .conftest import REPO

ARGS = ["train", "--backbone", "tiny", "--prompt", "points", "--folds", "1", "--epochs", "2", "--batch-size", "4",
        "--lr", "1e-3", "--quiet"]
TOLERANCE = 1e-5  # max |w_ddp - w_one| over the decoder's weights; measured 1.2e-6 (2 epochs, 2026-12-01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", LUNGSAM_DDP_BACKEND="gloo")
    env.pop("WORLD_SIZE", None)
    return env


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.e2e  # trains three times in subprocesses (about 40 s): not the fast tier
def test_two_process_ddp_matches_one_process_and_refuses_another_world_size(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "lungsam", *ARGS, "--out", str(one)], env=_env(), cwd=tmp_path,
                        capture_output=True, text=True, timeout=240, check=False)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                         "127.0.0.1", "--master-port", str(_free_port()), "-m", "lungsam", *ARGS, "--out", str(two)],
                        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("test F1") == 1  # rank 0 reports, once
    for name in ("decoder_last", "decoder_best"):
        a, b = (_weights(d / "folds" / "fold_0" / f"{name}.safetensors") for d in (one, two))
        assert a.keys() == b.keys()
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        assert diff < TOLERANCE, f"{name}: max |Δw| {diff:.2e}"
    assert any(float(np.abs(v).max()) > 0 for v in a.values())
    run = json.loads((two / "run.json").read_text())
    assert run["distributed"]["world_size"] == 2 and "distributed" not in json.loads((one / "run.json").read_text())
    h1, h2 = (json.loads((d / "folds" / "fold_0" / "metrics.json").read_text()) for d in (one, two))
    assert h1["best_epoch"] == h2["best_epoch"] and abs(h1["test"]["f1"]["mean"] - h2["test"]["f1"]["mean"]) < 1e-4

    # a one-process --resume of the 2-process run is refused, naming both world sizes
    r3 = subprocess.run([sys.executable, "-m", "lungsam", *ARGS, "--epochs", "3", "--resume", "--out", str(two)],
                        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert r3.returncode != 0 and "trained with 2 process(es)" in r3.stderr, r3.stderr[-2000:]
