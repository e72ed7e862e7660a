"""``lungsam.train.resolve.resolve``: a TrainConfig -> device, precision, preprocessing, weights and their sha256,
derived once, and what cannot run here refused before any work."""
from __future__ import annotations

import pytest
import torch

from lungsam.artifacts import sha256_file
from lungsam.backbones import preprocess_for
from lungsam.embeddings import weights_fingerprint
from lungsam.errors import ArgumentError, UnsupportedHereError
from lungsam.train.config import TrainConfig
from lungsam.train.engine import cpu_has_native_bf16
from lungsam.train.resolve import precision_name, resolve, resolve_checkpoint


def test_resolve_the_seeded_tiny_backbone_on_the_cpu():
    r = resolve(TrainConfig(backbone="tiny", device="cpu"))
    assert (r.device, r.mixed, r.precision, r.checkpoint) == ("cpu", False, "float32", None)
    assert r.preprocess == preprocess_for("tiny")
    assert r.weights_sha256 == weights_fingerprint("tiny", None)
    rec = r.record()
    assert rec["preprocess"] == preprocess_for("tiny").to_dict() and rec["device"] == "cpu"


def test_a_checkpoint_path_is_made_absolute_and_hashed(tmp_path, monkeypatch):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not really weights, but a file with a sha256")
    monkeypatch.chdir(tmp_path)
    r = resolve(TrainConfig(backbone="tiny", checkpoint="w.pt", device="cpu"))
    assert r.checkpoint == str(weights.resolve()) and r.weights_sha256 == sha256_file(weights)
    with pytest.raises(FileNotFoundError, match="--checkpoint nope.pt"):
        resolve_checkpoint("tiny", "nope.pt")


def test_what_cannot_run_is_refused_before_any_work():
    with pytest.raises(ArgumentError, match="has no downloadable weights"):
        resolve(TrainConfig(backbone="vit_b", device="cpu"))
    with pytest.raises(ArgumentError, match="encoder size"):
        resolve(TrainConfig(backbone="mobile_sam", encoder_size=1000, device="cpu"))
    if not cpu_has_native_bf16():
        with pytest.raises(UnsupportedHereError, match="--cpu-bf16"):
            resolve(TrainConfig(backbone="tiny", device="cpu", cpu_bf16=True))
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedHereError, match="--device cuda"):
            resolve(TrainConfig(backbone="tiny", device="cuda"))
        assert resolve(TrainConfig(backbone="tiny")).device == "cpu"  # auto


def test_precision_names():
    assert [precision_name(d, m) for d, m in (("cpu", False), ("cpu", True), ("cuda", True), ("cuda:1", False))] == \
        ["float32", "cpu-bfloat16", "cuda-amp", "float32"]
