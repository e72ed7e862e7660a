"""In-graph preprocessing bundles (lungsam export --in-graph-preprocess, lungsam predict --preprocess graph)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from lungsam import preprocess as pp
from lungsam.export.ingraph import MIN_RESIZE_OPSET, postprocess_graph, preprocess_graph, resize_difference
from lungsam.imageio import read_image

from .conftest import TINY_JITTER_SHIFT

DEMO = Path(__file__).resolve().parents[1] / "lungsam" / "demo_data" / "montgomery"


def _demo_pixels(n: int) -> list[np.ndarray]:
    return [read_image(p).pixels for p in sorted((DEMO / "images").glob("*.png"))[:n]]


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("img_size,working", [(256, 256), (1024, 256), (192, 256), (64, 128)])
def test_preprocess_graph_matches_pillow(img_size, working):
    """The graph's two-pass antialiased Resize with uint8 rounding is Pillow's BILINEAR: equal values on whole-factor
    and equal sizes, at most 1 grey level (and rarely) elsewhere."""
    spec = pp.PreprocessSpec(img_size=img_size, embedding_size=img_size // 16)
    d = resize_difference(_demo_pixels(3), spec, working)
    assert d["max_abs"] <= 1.0 and d["equal_fraction"] >= 0.99, d
    if img_size % working == 0 or working % img_size == 0:
        src = _demo_pixels(1)[0].shape[0]
        if src % working == 0:
            assert d["max_abs"] == 0.0, d


def test_preprocess_graph_rgb_odd_sizes_and_minmax():
    """RGB (H, W, 3) and odd sizes go through the same graph; the output is the host's raw model input."""
    spec = pp.PreprocessSpec(img_size=192, embedding_size=12, normalization="minmax")
    grey = _demo_pixels(1)[0][:301, :257]
    rgb = np.stack([grey, np.flipud(grey), grey // 2], axis=-1)
    d = resize_difference([grey, rgb], spec, 256)
    assert d["max_abs"] <= 1.0 and d["equal_fraction"] >= 0.95, d
    with pytest.raises(ValueError, match="opset >= 18"):
        preprocess_graph(spec, 256, MIN_RESIZE_OPSET - 1)


def test_postprocess_graph_matches_the_runtime_matrices():
    """decoder_mask's tail: low-res logits -> working (SAM's matrices) -> original (bilinear) -> threshold, against
    the host's composed matrices (LungSegmenter.output_matrices)."""
    spec = pp.PreprocessSpec(img_size=256, embedding_size=16)
    s, threshold = 256, 0.4
    rng = np.random.default_rng(0)
    low = (rng.normal(size=(2, 1, 64, 64)) * 4).astype(np.float32)
    sess = _session(postprocess_graph(spec, s, threshold, 17))
    for hw in [(512, 512), (300, 411), (200, 100)]:
        mask, prob, iou, working = sess.run(None, {"low_res_logits": low, "iou_in": np.ones((2, 1), np.float32),
                                                   "original_hw": np.array(hw, np.int64)})
        assert mask.dtype == np.uint8 and mask.shape == (2, 1, *hw) and working.shape == (2, 1, s, s)
        ay, ax = pp.postprocess_matrices(spec, (256, 256), (s, s))
        my = (pp.bilinear_matrix(s, hw[0]) @ ay.astype(np.float64)).astype(np.float32)
        mx = (pp.bilinear_matrix(s, hw[1]) @ ax.astype(np.float64)).astype(np.float32)
        for b in range(2):
            host = pp.sigmoid(my @ low[b, 0] @ mx.T)
            np.testing.assert_allclose(prob[b, 0], host, atol=2e-5)
            assert np.mean((host > threshold) == mask[b, 0].astype(bool)) > 0.9995
            np.testing.assert_allclose(working[b, 0], pp.sigmoid(ay @ low[b, 0] @ ax.T), atol=2e-5)


# ---------------------------------------------------------------------------------------------
# e2e: the tiny run exported with the in-graph models
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph_bundle(tiny_run, tmp_path_factory) -> Path:
    from lungsam.export.bundle import export_bundle
    from lungsam.export.config import ExportOptions

    out = tmp_path_factory.mktemp("ingraph") / "bundle"
    export_bundle(tiny_run, out, ExportOptions(in_graph=True, max_jitter_log_odds_shift=TINY_JITTER_SHIFT),
                  parity_images=4, log=lambda m: None)
    return out


def test_export_records_the_in_graph_models_and_gate(graph_bundle):
    from lungsam.runtime.bundle import Bundle

    m = json.loads((graph_bundle / "manifest.json").read_text())
    raw, dec = m["models"]["encoder_raw"]["fp32"], m["models"]["decoder_mask"]["fp32"]
    assert raw["inputs"] == [{"name": "image_u8", "shape": [1, "height", "width", "channels"], "dtype": "uint8"}]
    assert [t["name"] for t in dec["inputs"]] == ["embeddings", "original_hw"]
    assert [(t["name"], t["dtype"]) for t in dec["outputs"]][:2] == [("mask", "uint8"), ("probability", "float32")]
    rec = m["parity"]["in_graph"]
    assert rec["tolerance"]["min_agreement_mean"] == 0.995 and "onnxruntime" in rec["results"]
    for r in rec["results"].values():
        assert r["agreement_mean"] >= 0.995 and abs(r["f1_gt_mean"] - r["f1_gt_host_mean"]) <= 0.001
        assert set(r["stages_ms"]["graph"]) == {"preprocess_s", "encode_s", "decode_s", "postprocess_s"}
    b = Bundle.load(graph_bundle)
    assert b.model_names() == ("encoder", "decoder", "decoder_fixed")  # the host path's models, unchanged
    assert b.meta.graph_model_names() == ("encoder_raw", "decoder_mask")


@pytest.mark.parametrize("backend", ["onnxruntime"])  # OpenVINO is refused (test_graph_path_refusals)
def test_graph_path_matches_host_path(graph_bundle, backend):
    """Through the runtime, original PNGs: the in-graph path's masks equal the host path's (the tiny model at its
    threshold), the record says which path ran."""
    from lungsam.metrics import f1_score
    from lungsam.runtime import LungSegmenter

    host = LungSegmenter.load(graph_bundle, backend=backend)
    graph = LungSegmenter.load(graph_bundle, backend=backend, preprocess="graph")
    assert host.describe()["preprocess"] == "host" and graph.describe()["preprocess"] == "graph"
    paths = sorted((DEMO / "images").glob("*.png"))[:3]
    rgb = np.stack([read_image(paths[0]).pixels] * 3, axis=-1)[:400, :333]
    for src in [*paths, rgb]:
        h, g = host.segment(src), graph.segment(src)
        assert g.mask.shape == h.mask.shape and g.mask.dtype == bool
        assert np.mean(g.mask == h.mask) >= 0.999 and (not h.mask.any() or f1_score(g.mask, h.mask) >= 0.99)
        assert abs(g.score - h.score) < 5e-3  # predicted IoU; the odd-size RGB input differs by a grey level
        np.testing.assert_allclose(g.probability, h.probability, atol=2e-3)
        assert (g.qc is None) == (h.qc is None)
        assert {"preprocess_s", "encode_s", "decode_s", "postprocess_s"} <= set(g.timings)


def test_graph_path_refusals(graph_bundle, tiny_bundle):
    from lungsam.runtime import LungSegmenter
    from lungsam.runtime.ingraph import InGraphUnavailableError

    with pytest.raises(InGraphUnavailableError, match="--in-graph-preprocess"):
        LungSegmenter.load(tiny_bundle, preprocess="graph")
    with pytest.raises(InGraphUnavailableError, match="fp32 only"):
        LungSegmenter.load(graph_bundle, preprocess="graph", precision="int8")
    seg = LungSegmenter.load(graph_bundle, preprocess="graph")
    with pytest.raises(InGraphUnavailableError, match="interactive prompts"):
        seg.segment(sorted((DEMO / "images").glob("*.png"))[0], box=np.array([10, 10, 200, 200]))
    assert LungSegmenter.load(tiny_bundle, preprocess="auto").describe()["preprocess"] == "host"
    if _has_openvino():
        with pytest.raises(InGraphUnavailableError, match="OpenVINO's CPU plugin does not compute ONNX Resize"):
            LungSegmenter.load(graph_bundle, preprocess="graph", backend="openvino")
        assert LungSegmenter.load(graph_bundle, preprocess="auto", backend="openvino").describe()["preprocess"] == \
            "host"


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _rewrite_manifest(bundle: Path) -> None:
    """Re-list the bundle's files after a model was replaced (as an export would have listed them)."""
    from lungsam.export.bundle import file_records, write_manifest
    from lungsam.manifest import parse_manifest

    manifest = parse_manifest((bundle / "manifest.json").read_bytes())
    manifest.files = file_records(bundle)
    write_manifest(bundle, manifest)


def _halve_pixels(path: Path) -> None:
    """Make encoder_raw wrong the way a normalisation bug would: every pixel value halved before the resize."""
    model = onnx.load(str(path))
    cast = next(n for n in model.graph.node if n.op_type == "Cast" and n.input[0] == "image_u8")
    out = cast.output[0]
    cast.output[0] = out + "_unscaled"
    model.graph.node.insert(0, helper.make_node("Constant", [], ["wrong_scale"],
                                                value=numpy_helper.from_array(np.array(0.5, np.float32))))
    model.graph.node.insert(2, helper.make_node("Mul", [out + "_unscaled", "wrong_scale"], [out]))
    onnx.save(model, str(path))


def _lower_threshold(path: Path) -> None:
    """Make decoder_mask wrong the way a frame bug would: the threshold baked in moved to 1e-6."""
    model = onnx.load(str(path))
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0].endswith("post_threshold"):
            n.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(1e-6, np.float32), n.attribute[0].t.name))
    onnx.save(model, str(path))


@pytest.mark.parametrize("model,break_it", [("encoder_raw", _halve_pixels), ("decoder_mask", _lower_threshold)])
def test_in_graph_gate_refuses_a_wrong_model(graph_bundle, tmp_path, model, break_it):
    """The export's in-graph gate (the code export runs after the parity gate) refuses a forced wrong model."""
    from lungsam.data import DEMO_DATA, load_dataset
    from lungsam.export.bundle import ParityGateError, gate_in_graph
    from lungsam.manifest import parse_manifest

    bundle = tmp_path / "b"
    shutil.copytree(graph_bundle, bundle)
    break_it(bundle / f"{model}.onnx")
    _rewrite_manifest(bundle)
    manifest = parse_manifest((bundle / "manifest.json").read_bytes())
    samples = load_dataset(DEMO_DATA, manifest.working_size).samples[:3]
    with pytest.raises(ParityGateError, match="in-graph gate failed for onnxruntime") as e:
        gate_in_graph(bundle, manifest, samples, tmp_path / "out", "", lambda m: None)
    assert "FAIL" in e.value.table


def test_predict_cli_preprocess_graph(graph_bundle, tmp_path):
    """``lungsam predict --preprocess graph``: the same masks as the host path, predict.json says which path ran."""
    from click.testing import CliRunner

    from lungsam.runtime.commands import predict

    images = [str(p) for p in sorted((DEMO / "images").glob("*.png"))[:2]]
    for path in ("host", "graph"):
        r = CliRunner().invoke(predict, [str(graph_bundle), *images, "--out", str(tmp_path / path), "--preprocess",
                                         path, "--batch-size", "2", "-q"])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / path / "predict.json").read_text())["segmenter"]["preprocess"] == path
    for p in images:
        stem = Path(p).stem
        assert (tmp_path / "host" / f"{stem}_mask.png").read_bytes() == (tmp_path / "graph" / f"{stem}_mask.png"
                                                                         ).read_bytes()
    r = CliRunner().invoke(predict, [str(graph_bundle), images[0], "--out", str(tmp_path / "ray"), "--preprocess",
                                     "graph", "--ray"])
    assert r.exit_code == 2 and "--ray" in r.output
