"""Triton model repository (``lungsam export --triton``) and the ``triton`` runtime backend."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed (lungsam[triton])")

from lungsam.export.triton import (
    TritonRepositoryError,
    model_names,
    validate_config,
    write_repository,
)
from lungsam.runtime.segmenter import LungSegmenter

from .conftest import REPO

DEMO = REPO / "lungsam" / "demo_data" / "montgomery" / "images"


@pytest.fixture(scope="module")
def repo(tiny_bundle, tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("triton") / "models"
    write_repository(tiny_bundle, r, max_batch=4, instances=2, kind="KIND_CPU")
    return r


def test_every_config_is_valid_triton_model_config(repo):
    names = model_names("lungsam")
    configs = {p.parent.name: validate_config(p) for p in repo.glob("*/config.pbtxt")}
    assert set(configs) == set(names.values())
    for name in ("encoder", "decoder_fixed", "decoder"):
        cfg = configs[names[name]]
        assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 4
        assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
        assert cfg.HasField("dynamic_batching")
        assert (repo / names[name] / "1" / "model.onnx").is_file()
    enc = configs[names["encoder"]]
    assert [i.name for i in enc.input] == ["image"] and list(enc.input[0].dims) == [3, 128, 128]
    assert [o.name for o in enc.output] == ["embeddings"]
    dec = configs[names["decoder"]]
    assert list(dec.input[1].dims) == [-1, 2]  # point_coords (num_points dynamic)
    ens = configs[names["ensemble"]]
    assert ens.platform == "ensemble" and (repo / names["ensemble"] / "1").is_dir()
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [names["encoder"], names["decoder_fixed"]]


def test_validation_rejects_a_bad_config(repo, tmp_path):
    bad = tmp_path / "lungsam_encoder" / "config.pbtxt"
    bad.parent.mkdir()
    bad.write_text((repo / "lungsam_encoder" / "config.pbtxt").read_text().replace("max_batch_size", "max_batch"))
    with pytest.raises(TritonRepositoryError, match="not a valid Triton model configuration"):
        validate_config(bad)
    with pytest.raises(TritonRepositoryError, match="exist already"):
        write_repository(repo.parent.parent / "missing", repo)  # names taken: refused before reading anything


def test_ensemble_steps_run_in_order_give_the_bundles_masks(tiny_bundle, repo):
    """Run the ensemble's models with onnxruntime in the order and tensor maps its config names."""
    import onnxruntime as ort

    ens = validate_config(repo / "lungsam" / "config.pbtxt")
    seg = LungSegmenter.load(tiny_bundle)
    images = sorted(DEMO.glob("*.png"))[:3]
    prepared = [seg.preprocess(p) for p in images]
    tensors = {"image": np.stack([p.model_input for p in prepared])}  # batch of 3 <= max_batch_size
    for step in ens.ensemble_scheduling.step:
        sess = ort.InferenceSession(str(repo / step.model_name / "1" / "model.onnx"),
                                    providers=["CPUExecutionProvider"])
        feeds = {inner: tensors[outer] for inner, outer in step.input_map.items()}
        outs = sess.run(list(step.output_map), feeds)
        tensors.update({step.output_map[k]: v for k, v in zip(step.output_map, outs)})
    assert [o.name for o in ens.output] == ["low_res_logits", "iou_predictions"]
    for i, (path, p) in enumerate(zip(images, prepared)):
        mask, _ = seg.postprocess(tensors["low_res_logits"][i], p)
        ref = seg.segment(path)
        assert np.array_equal(mask, ref.mask), path.name
        assert abs(float(tensors["iou_predictions"][i, 0]) - ref.score) < 1e-5


@pytest.mark.skipif(not os.environ.get("LUNGSAM_TRITON_URL"),
                    reason="no live Triton server: set LUNGSAM_TRITON_URL (http://host:8000 or grpc://host:8001) to a "
                           "tritonserver serving this bundle's repository (docs/scale.md)")
def test_live_triton_backend_gives_the_bundles_masks():
    """Against a real server: LUNGSAM_TRITON_BUNDLE names the bundle whose repository the server serves."""
    bundle = os.environ.get("LUNGSAM_TRITON_BUNDLE")
    if not bundle:
        pytest.skip("LUNGSAM_TRITON_URL is set but LUNGSAM_TRITON_BUNDLE (the served bundle's folder) is not")
    local = LungSegmenter.load(bundle)
    remote = LungSegmenter.load(bundle, backend="triton")
    assert remote.describe()["backend"] == "triton"
    for path in sorted(DEMO.glob("*.png"))[:4]:
        a, b = local.segment(path), remote.segment(path)
        assert (a.mask == b.mask).mean() > 0.999, path.name


def test_triton_backend_without_a_server_says_what_is_missing(tiny_bundle, monkeypatch):
    """No fake server: unset address, and an address where nothing listens, are refused with the reason."""
    import socket

    from lungsam.runtime.backends import BackendUnavailableError

    monkeypatch.delenv("LUNGSAM_TRITON_URL", raising=False)
    with pytest.raises(BackendUnavailableError, match="LUNGSAM_TRITON_URL"):
        LungSegmenter.load(tiny_bundle, backend="triton")
    with socket.socket() as s:  # a free loopback port: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LUNGSAM_TRITON_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(BackendUnavailableError, match="not reachable"):
        LungSegmenter.load(tiny_bundle, backend="triton")
    monkeypatch.setenv("LUNGSAM_TRITON_URL", f"ftp://127.0.0.1:{port}")
    with pytest.raises(BackendUnavailableError, match="use http://"):
        LungSegmenter.load(tiny_bundle, backend="triton")
