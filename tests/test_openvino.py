"""OpenVINO backend, static INT8 and the CPU-feature rules (issue 19), on the real tiny bundle."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from lungsam.cpufeatures import cpu_features, isa_summary

from .conftest import TINY_JITTER_SHIFT

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'lungsam[openvino]'); "
                                            "CI installs it through .[dev]")


def _demo_images(n: int = 2) -> list[np.ndarray]:
    from lungsam.data import load_dataset

    return [s.image for s in load_dataset("demo:montgomery", 256).samples[:n]]


def _bundle(path, **changes):
    """The bundle at ``path`` with its manifest changed in memory only (the files stay verified)."""
    from lungsam.runtime.bundle import Bundle

    b = Bundle.load(path)
    b.manifest = copy.deepcopy(b.manifest)
    for key, value in changes.items():
        b.manifest[key] = value
    return b


def _features(native_bf16: bool) -> dict:
    f = copy.deepcopy(cpu_features())
    f["native_bf16"] = native_bf16
    f["isa"]["avx512_bf16"] = native_bf16
    return f


def test_cpu_features_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_vnni "
                    "avx512_bf16\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2\n")
    f = cpu_features(info)
    assert f["model"] == "Test CPU 9000" and f["vnni"] and f["native_bf16"] and not f["amx"]
    assert f["isa"]["avx2"] and not f["isa"]["amx_int8"]
    assert "avx512_vnni" in isa_summary(f) and "no amx_tile" in isa_summary(f)
    empty = cpu_features(tmp_path / "absent")
    assert not empty["native_bf16"] and empty["source"].startswith("no CPU flags")


def _dynamic_batch_model(path):
    """A small ONNX model with dynamic batch and feature-count axes: y = relu(x @ W) summed over the features."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.linspace(-1, 1, 2 * 8, dtype=np.float32).reshape(2, 8), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceSum", ["r", "axes"], ["y"], keepdims=0)]
    axes = numpy_helper.from_array(np.asarray([1], np.int64), "axes")
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[w, axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_ov_model_compiles_the_first_shapes_statically_and_agrees(tmp_path):
    """OvModel runs each of its first STATIC_SHAPES input shapes seen twice on a static compilation of its own
    (faster kernels on the CPU plugin), later shapes on the dynamic one; the outputs are the same either way."""
    from lungsam.runtime.openvino_backend import OvModel

    path = _dynamic_batch_model(tmp_path / "m.onnx")
    static, dynamic = OvModel(path, "fp32", threads=1, static_shapes=2), OvModel(path, "fp32", threads=1,
                                                                                   static_shapes=0)
    rng = np.random.default_rng(0)
    for shape in ((1, 7, 2), (4, 7, 2), (1, 7, 2), (4, 7, 2), (6, 6, 2), (6, 6, 2), (1, 7, 2)):
        x = rng.normal(size=shape).astype(np.float32)
        ref = np.maximum(x @ np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8), 0).sum(1)
        np.testing.assert_allclose(static.run({"x": x})["y"], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dynamic.run({"x": x})["y"], ref, rtol=1e-5, atol=1e-5)
    # compiled on a shape's second call, the first two shapes only; the third ran on the dynamic model throughout
    assert static.static_compiled == [((1, 7, 2),), ((4, 7, 2),)]
    assert dynamic.static_compiled == []


def test_openvino_bundle_matches_onnxruntime(tiny_bundle):
    """The export gated OpenVINO too, and the runtime's openvino backend gives onnxruntime's masks."""
    from lungsam.runtime import LungSegmenter

    m = json.loads((tiny_bundle / "manifest.json").read_text())
    res = m["parity"]["results"]
    for dec in ("decoder", "decoder_fixed"):
        ovr = res[f"openvino-fp32/{dec}"]
        assert ovr["agreement_min"] >= 0.999 and ovr["max_abs_logit_diff"] < 1e-3 and ovr["ms_per_image"] > 0
    assert m["parity"]["machine"]["cpu_features"]["isa"] == cpu_features()["isa"]

    seg_ov = LungSegmenter.load(tiny_bundle, backend="openvino", threads=1, performance_hint="throughput")
    seg_ort = LungSegmenter.load(tiny_bundle, backend="onnxruntime", threads=1)
    d = seg_ov.describe()
    assert d["backend"] == "openvino" and d["providers"]["encoder"] == ["OpenVINO CPU (f32, throughput)"]
    enc = seg_ov._models["encoder"].compiled
    assert int(enc.get_property("INFERENCE_NUM_THREADS")) == 1
    assert str(enc.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")
    for image in _demo_images():
        a, b = seg_ov.segment(image), seg_ort.segment(image)
        assert np.abs(a.probability - b.probability).max() < 1e-4
        assert (a.mask == b.mask).mean() > 0.9999
    # batched: the dynamic batch axis works through OpenVINO
    x = np.stack([seg_ov.preprocess(i).model_input for i in _demo_images()])
    np.testing.assert_allclose(seg_ov.encode(x), seg_ort.encode(x), atol=1e-4, rtol=0)


def test_performance_hint_is_openvino_only(tiny_bundle):
    from lungsam.runtime import LungSegmenter
    from lungsam.runtime.backends import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="performance hint.*OpenVINO setting"):
        LungSegmenter.load(tiny_bundle, backend="onnxruntime", performance_hint="latency")


def test_bf16_refused_without_native_bfloat16(tiny_bundle, monkeypatch):
    from lungsam.runtime import openvino_backend
    from lungsam.runtime.backends import BackendUnavailableError, resolve_backend

    b = _bundle(tiny_bundle)
    monkeypatch.setattr(openvino_backend, "cpu_features", lambda: _features(False))
    with pytest.raises(BackendUnavailableError,
                       match="native bfloat16 \\(AVX512-BF16 or AMX-BF16\\).*--precision fp32"):
        resolve_backend(b, "openvino", "cpu", "bf16")
    with pytest.raises(BackendUnavailableError, match="native bfloat16"):
        openvino_backend.OvModel(tiny_bundle / "encoder.onnx", "bf16")
    with pytest.warns(RuntimeWarning, match="falling back"):  # a fallback says so and gives up bf16
        c = resolve_backend(b, "openvino", "cpu", "bf16", allow_fallback=True)
    assert c.precision == "fp32" and c.fallbacks and "native bfloat16" in c.fallbacks[0]
    with pytest.raises(BackendUnavailableError, match="bf16.*--backend openvino"):
        resolve_backend(b, "onnxruntime", "cpu", "bf16")
    # a CPU with native bf16 passes the CPU check; a bundle not gated at bf16 (as one exported on a CPU without
    # native bf16 is; the test's own export may have been gated at bf16 if this CPU has it) is still refused
    monkeypatch.setattr(openvino_backend, "cpu_features", lambda: _features(True))
    ungated = _bundle(tiny_bundle, parity={**b.manifest["parity"], "results": {
        k: v for k, v in b.manifest["parity"]["results"].items() if not k.startswith("openvino-bf16/")}})
    with pytest.raises(BackendUnavailableError, match="not checked with OpenVINO at bf16.*native bfloat16"):
        resolve_backend(ungated, "openvino", "cpu", "bf16")
    gated = _bundle(tiny_bundle, parity={**b.manifest["parity"], "results": {
        **b.manifest["parity"]["results"], "openvino-bf16/decoder_fixed": {}}})
    c = resolve_backend(gated, "openvino", "cpu", "bf16")
    assert (c.backend, c.precision) == ("openvino", "bf16")
    assert openvino_backend.compile_config("bf16", None, "latency")["INFERENCE_PRECISION_HINT"] == "bf16"
    assert openvino_backend.compile_config("fp32", 2, "latency") == {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": "2"}


def test_openvino_refusals(tiny_bundle):
    from lungsam.runtime.backends import BackendUnavailableError, resolve_backend

    b = _bundle(tiny_bundle)
    with pytest.raises(BackendUnavailableError, match="openvino' runs on the CPU"):
        resolve_backend(b, "openvino", "cuda", "fp32")
    with pytest.raises(BackendUnavailableError, match="no int8 ONNX model"):
        resolve_backend(b, "openvino", "cpu", "int8")
    ungated = _bundle(tiny_bundle, parity={**b.manifest["parity"], "results": {
        k: v for k, v in b.manifest["parity"]["results"].items() if not k.startswith("openvino-")}})
    with pytest.raises(BackendUnavailableError, match="not checked with OpenVINO at fp32.*re-export"):
        resolve_backend(ungated, "openvino", "cpu", "fp32")


def _with_times(path, learned, variants=(0.0, 0.0), features=None, fixed=None):
    """The bundle at ``path`` with the export's timings replaced: ``learned`` = ``(onnxruntime, openvino)``
    ``ms_per_image`` of every pipeline (``fixed``: other ones for the ``decoder_fixed`` pipelines), ``variants``
    the same for the prompted decoders' ``jitter.ms_per_image`` (``None``: not timed, as in bundles exported
    before it was); ``features``: the recorded CPU."""
    par = _bundle(path).manifest["parity"]
    res = {}
    for k, v in par["results"].items():
        i = 0 if k.startswith("onnx-") else 1
        row = {**v, "ms_per_image": (fixed if fixed and k.endswith("/decoder_fixed") else learned)[i]}
        if "jitter" in v:
            jit = {kk: vv for kk, vv in v["jitter"].items() if kk != "ms_per_image"}
            row["jitter"] = jit if variants[i] is None else {**jit, "ms_per_image": variants[i]}
        res[k] = row
    machine = {**par["machine"], "cpu_features": features or par["machine"]["cpu_features"]}
    return _bundle(path, parity={**par, "results": res, "machine": machine})


def test_auto_picks_the_recorded_fastest_on_this_cpu_only(tiny_bundle):
    from lungsam.runtime.backends import resolve_backend

    par = _bundle(tiny_bundle).manifest["parity"]

    def with_times(ort_ms, ov_ms, features=None):
        return _with_times(tiny_bundle, (ort_ms, ov_ms), features=features)

    c = resolve_backend(with_times(10.0, 5.0), "auto", "cpu", "fp32")
    assert (c.backend, c.precision) == ("openvino", "fp32") and "openvino" in c.why and not c.fallbacks
    c = resolve_backend(with_times(5.0, 10.0), "auto", "cpu", "fp32")
    assert c.backend == "onnxruntime"
    assert "fp32, with the flag's prompt variants: onnxruntime 5 ms, openvino 10 ms" in c.why
    c = resolve_backend(with_times(5.0, None), "auto", "cpu", "fp32")  # OpenVINO not timed at export
    assert c.backend == "onnxruntime" and "openvino not timed" in c.why
    other = copy.deepcopy(par["machine"]["cpu_features"])
    other["model"] = "another CPU"
    c = resolve_backend(with_times(10.0, 5.0, other), "auto", "cpu", "fp32")
    assert c.backend == "onnxruntime" and "from another CPU, or absent" in c.why
    # auto never changes the precision: int8 is absent from this bundle, so it is refused as before
    from lungsam.runtime.backends import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="no int8"):
        resolve_backend(with_times(10.0, 5.0), "auto", "cpu", "int8")


def test_auto_counts_the_quality_flags_variant_decodes(tiny_bundle, tmp_path):
    """The flag's prompt variants run on the prompted decoder for every image: auto adds their recorded time
    (``jitter.ms_per_image``), so a backend faster at the learned prompt but slower at the variants loses, and
    wins again when the variants are dropped (``--no-qc-jitter``)."""
    from lungsam.runtime.backends import resolve_backend
    from lungsam.runtime.segmenter import LungSegmenter

    b = _bundle(tiny_bundle)
    par = b.manifest["parity"]
    assert b.quality_model.jitter is not None
    for name in ("onnx-fp32/decoder", "openvino-fp32/decoder"):  # the export times them
        assert par["results"][name]["jitter"]["ms_per_image"] > 0
    assert "jitter.ms_per_image" in par["timing"]

    def with_times(learned, variants):
        return _with_times(tiny_bundle, learned, variants)

    slow_variants = with_times((10.0, 5.0), (1.0, 20.0))  # OpenVINO: faster encoder, slower variant decodes
    c = resolve_backend(slow_variants, "auto", "cpu", "fp32")
    assert c.backend == "onnxruntime", c.why
    assert "with the flag's prompt variants: onnxruntime 11 ms, openvino 25 ms" in c.why
    c = resolve_backend(slow_variants, "auto", "cpu", "fp32", qc_jitter=False)
    assert c.backend == "openvino" and "5 ms per image against onnxruntime's 10 ms" in c.why
    seg = LungSegmenter.load(slow_variants, qc_jitter=False)  # what `lungsam predict --no-qc-jitter` loads
    assert seg.backend == "openvino" and seg.describe()["qc_jitter"] is False
    assert LungSegmenter.load(slow_variants).backend == "onnxruntime"
    c = resolve_backend(with_times((10.0, 5.0), (1.0, 2.0)), "auto", "cpu", "fp32")
    assert c.backend == "openvino" and "7 ms per image against onnxruntime's 11 ms" in c.why
    untimed = with_times((10.0, 5.0), (None, None))  # a bundle exported before the variants were timed
    c = resolve_backend(untimed, "auto", "cpu", "fp32")
    assert c.backend == "openvino" and "variant decodes were not timed at export" in c.why
    from click.testing import CliRunner

    from lungsam.cli import main
    from lungsam.data import demo_data_dir

    image = sorted((demo_data_dir() / "images").iterdir())[0]
    for extra, said in (([], "with the flag's prompt variants"), (["--no-qc-jitter"], "fp32: ")):
        r = CliRunner().invoke(main, ["predict", str(tiny_bundle), str(image), "--out", str(tmp_path / str(len(extra))),
                                      "--threads", "1", "--no-progress", *extra])
        assert r.exit_code == 0, r.output
        assert "auto: " in r.output and said in r.output  # the CLI says how auto chose


def test_auto_times_the_decoder_that_runs_the_learned_prompt(tiny_bundle):
    """A points bundle decodes the learned prompt with ``decoder_fixed``: auto compares that pipeline's recorded
    time, not the prompted decoder's (which only the flag's variants, a caller's box or a first pass use)."""
    from lungsam.runtime.prompting import PromptPolicy
    from lungsam.runtime.segmenter import LungSegmenter, learned_prompt_decoder

    b = _bundle(tiny_bundle)
    assert {"decoder", "decoder_fixed"} <= set(b.model_names())
    assert learned_prompt_decoder(b.model_names(), PromptPolicy(None), b.prompt) == "decoder_fixed"
    for source in ("given", "first-pass"):  # a box from the caller or the first mask: the prompted decoder
        assert learned_prompt_decoder(b.model_names(), PromptPolicy(source), b.prompt) == "decoder"
    assert learned_prompt_decoder(["encoder", "decoder"], PromptPolicy(None), b.prompt) == "decoder"
    # onnxruntime's fixed-prompt pipeline is the fastest; its prompted one the slowest
    timed = _with_times(tiny_bundle, (10.0, 5.0), fixed=(3.0, 5.0))
    seg = LungSegmenter.load(timed, qc_jitter=False)
    assert seg.uses_fixed_decoder
    assert seg.backend == "onnxruntime" and "onnxruntime 3 ms, openvino 5 ms" in seg.choice.why, seg.choice.why
    from lungsam.runtime.backends import resolve_backend

    c = resolve_backend(timed, "auto", "cpu", "fp32", qc_jitter=False)  # the prompted decoder, by default
    assert c.backend == "openvino" and "5 ms per image against onnxruntime's 10 ms" in c.why


# ---------------------------------------------------------------------------------------------
# static INT8
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def static_int8_bundle(tiny_run, tmp_path_factory):
    """``tiny_run`` exported with plain --int8 (static, calibrated INT8 is the default method), 4 calibration
    images. The tiny backbone is untrained noise (F1 ~0.2, logits near the threshold), so its masks flip more
    easily than a real model's: the agreement floor is 0.98 here (real bundles: the default 0.99)."""
    from click.testing import CliRunner

    from lungsam.cli import main

    out = tmp_path_factory.mktemp("int8") / "bundle"
    res = CliRunner().invoke(main, ["export", str(tiny_run), "--out", str(out), "--int8", "--calibration-images", "4",
                                    "--min-agreement", "0.98", "--max-jitter-log-odds-shift", str(TINY_JITTER_SHIFT)])
    assert res.exit_code == 0, res.output
    return out


def test_static_int8_export(static_int8_bundle, tiny_run):
    import onnx

    m = json.loads((static_int8_bundle / "manifest.json").read_text())
    q = m["quantization"]["int8"]
    split = json.loads((tiny_run / "folds" / "fold_0" / "split.json").read_text())
    assert q["method"] == "static" and q["calibration"]["n"] == 4 and q["calibration"]["split"] == "train"
    assert set(q["calibration"]["ids"]) <= set(split["train"]) and not set(q["calibration"]["ids"]) & set(split["test"])
    assert q["onnxruntime"]["per_channel"] and q["onnxruntime"]["format"] == "QDQ"
    assert q["openvino"]["function"] == "nncf.quantize" and q["openvino"]["model_type"] == "transformer"
    enc = m["models"]["encoder"]["int8"]
    assert enc["file"] == "encoder_int8.onnx"
    assert enc["openvino"]["files"] == ["encoder_int8_ov.xml", "encoder_int8_ov.bin"]
    assert {"encoder_int8_ov.xml", "encoder_int8_ov.bin"} <= set(m["files"])
    graph = onnx.load(str(static_int8_bundle / "encoder_int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul"} <= ops and "MatMulInteger" not in ops
    produced_by = {o: n.op_type for n in graph.node for o in n.output}
    for n in graph.node:  # LayerNorm / Softmax read float tensors, not dequantised ones
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert produced_by.get(n.input[0]) != "DequantizeLinear", n.name
    for n in graph.node:  # convolutions stay FP32 (quantising them broke LiteMedSAM), weight MatMuls are int8
        dequantised = [produced_by.get(i) == "DequantizeLinear" for i in n.input[:2]]
        if n.op_type == "Conv":
            assert dequantised == [False, False], n.name
    assert any(n.op_type == "MatMul" and produced_by.get(n.input[1]) == "DequantizeLinear" for n in graph.node)
    assert m["parity"]["max_int8_f1_drop"] == 0.002
    for backend in ("onnx", "openvino"):
        r = m["parity"]["results"][f"{backend}-int8/decoder_fixed"]
        assert r["agreement_mean"] >= 0.98 and r["f1_gt_mean"] >= r["f1_gt_torch_mean"] - 0.002


def test_no_openvino_int8_keeps_onnxruntime_int8_only(tiny_run, tmp_path):
    """--no-openvino-int8: the static INT8 encoder for onnxruntime alone (no NNCF model, no openvino-int8 gate rows;
    the runtime refuses OpenVINO int8 for it with the reason)."""
    from click.testing import CliRunner

    from lungsam.cli import main
    from lungsam.runtime.backends import BackendUnavailableError, resolve_backend
    from lungsam.runtime.bundle import Bundle

    out = tmp_path / "bundle"
    res = CliRunner().invoke(main, ["export", str(tiny_run), "--out", str(out), "--int8", "--calibration-images", "4",
                                    "--no-openvino-int8", "--parity-images", "2", "--min-agreement", "0.98",
                                    "--max-jitter-log-odds-shift", str(TINY_JITTER_SHIFT)])
    assert res.exit_code == 0, res.output
    assert "--no-openvino-int8: no OpenVINO (NNCF) INT8 encoder" in res.output
    m = json.loads((out / "manifest.json").read_text())
    assert "openvino" not in m["models"]["encoder"]["int8"] and not list(out.glob("*_ov.*"))
    assert "onnx-int8/decoder" in m["parity"]["results"]
    assert not [k for k in m["parity"]["results"] if k.startswith("openvino-int8/")]
    assert m["export"]["openvino_int8"] is False
    with pytest.raises(BackendUnavailableError, match="no OpenVINO \\(NNCF\\) model"):
        resolve_backend(Bundle.load(out), "openvino", "cpu", "int8")


def test_static_int8_runs_on_both_cpu_backends(static_int8_bundle):
    from lungsam.runtime import LungSegmenter

    ov_seg = LungSegmenter.load(static_int8_bundle, backend="openvino", precision="int8")
    assert ov_seg._models["encoder"].path.name == "encoder_int8_ov.xml"
    assert ov_seg._models["decoder_fixed"].path.name == "decoder_fixed.onnx"
    ort_seg = LungSegmenter.load(static_int8_bundle, backend="onnxruntime", precision="int8")
    fp32 = LungSegmenter.load(static_int8_bundle, backend="onnxruntime", precision="fp32")
    for image in _demo_images():
        ref = fp32.segment(image).mask
        for seg in (ov_seg, ort_seg):
            got = seg.segment(image).mask
            assert 0.95 < (got == ref).mean() and not np.array_equal(seg.segment(image).probability,
                                                                     fp32.segment(image).probability)


def test_int8_gate_refuses_a_degraded_model(tiny_run, tmp_path, monkeypatch):
    """A real INT8 encoder calibrated on images at 1/100 of their brightness (activation ranges far too narrow,
    so real inputs saturate): refused, nothing written, and the message says which option to change."""
    from lungsam.export import quantize
    from lungsam.export.bundle import ParityGateError, export_bundle
    from lungsam.export.config import ExportOptions

    real = quantize.calibration_inputs

    def too_dark(run_model, n):
        inputs, record = real(run_model, n)
        return [x * 0.01 for x in inputs], record

    monkeypatch.setattr(quantize, "calibration_inputs", too_dark)
    out = tmp_path / "bad"
    with pytest.raises(ParityGateError, match="int8.*--int8-method dynamic.*--calibration-images") as e:
        export_bundle(tiny_run, out, ExportOptions(int8=True, int8_method="static", calibration_images=2,
                                                min_agreement=0.98), log=lambda m: None)
    assert not out.exists() and not list(tmp_path.glob(".bad.*"))
    res = e.value.parity["results"]
    assert res["onnx-int8/decoder_fixed"]["agreement_mean"] < 0.98
    assert res["onnx-fp32/decoder_fixed"]["agreement_mean"] >= 0.999  # the FP32 models were fine


def test_int8_options_need_int8(tiny_run, tmp_path):
    from click.testing import CliRunner

    from lungsam.cli import main

    res = CliRunner().invoke(main, ["export", str(tiny_run), "--out", str(tmp_path / "b"), "--int8-method", "dynamic"])
    assert res.exit_code != 0 and "--int8-method only apply with --int8" in res.output
    assert not (tmp_path / "b").exists()
