"""lungsam bench: statistics, skip paths, the results.json schema, reports, and an end-to-end bench of the
tiny bundle on CPU (train -> export -> bench)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from lungsam.benchmarks import report, schema, stats
from lungsam.benchmarks.bench import Images, Plan, bench_one, make_plan, parity
from lungsam.benchmarks.timing import Outputs
from lungsam.metrics import f1_score

# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def test_percentile_matches_numpy_linear_and_known_values():
    rng = np.random.default_rng(0)
    x = rng.lognormal(size=257)
    for q in (0, 1, 50, 95, 99, 100):
        assert stats.percentile(x, q) == pytest.approx(float(np.percentile(x, q)), rel=1e-12)
    assert stats.percentile([1, 2, 3, 4], 50) == 2.5
    assert stats.percentile([4, 1, 3, 2], 0) == 1 and stats.percentile([4, 1, 3, 2], 100) == 4
    assert stats.percentile([10.0], 99) == 10.0
    assert math.isnan(stats.percentile([], 50))
    with pytest.raises(ValueError):
        stats.percentile([1, 2], 101)


def test_latency_summary_is_in_milliseconds():
    s = stats.latency_summary([0.003, 0.001, 0.002, 0.010])
    assert s["n"] == 4
    assert s["p50"] == pytest.approx(2.5)
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(10.0)
    assert s["mean"] == pytest.approx(4.0)
    assert s["p95"] == pytest.approx(float(np.percentile([3, 1, 2, 10], 95)))
    assert s["p50"] <= s["p95"] <= s["p99"] <= s["max"]
    assert stats.latency_summary([])["n"] == 0


def test_throughput_from_synthetic_timings():
    assert stats.throughput(10, 2.0) == 5.0
    with pytest.raises(ValueError):
        stats.throughput(10, 0.0)
    t = stats.throughput_summary(4, [0.5, 0.25, 0.25])  # 12 images in 1 s
    assert t["images"] == 12 and t["wall_s"] == pytest.approx(1.0)
    assert t["images_per_s"] == pytest.approx(12.0)
    assert t["ms_per_image"] == pytest.approx(1000 / 12)
    assert t["batch_latency_ms"]["p50"] == pytest.approx(250.0)


def test_stage_breakdown_from_synthetic_timings():
    # two timed calls of 4 images: preprocessing 0.2 s each, model stages 0.05 + 0.02 + 0.01 s each
    t = stats.stage_breakdown(4, {"preprocess": [0.2, 0.2], "encoder": [0.05, 0.05], "decoder": [0.02, 0.02],
                                  "postprocess": [0.01, 0.01], "end_to_end": [0.28, 0.28]})
    assert t["stage_ms_per_image"]["preprocess"] == pytest.approx(50.0)
    assert t["stage_ms_per_image"]["encoder"] == pytest.approx(12.5)
    assert t["images_per_s_without_preprocess"] == pytest.approx(8 / 0.16)
    assert stats.stage_breakdown(4, {"encoder": []})["images_per_s_without_preprocess"] is None


def test_thread_map_keeps_order_runs_in_threads_and_raises():
    import threading

    m = stats.ThreadMap(4)
    names = set()

    def square(x):
        names.add(threading.current_thread().name)
        return x * x

    assert m(square, list(range(50))) == [x * x for x in range(50)]
    assert names and all(n.startswith("preprocess") for n in names)
    assert m(square, [3]) == [9]  # a single item runs inline
    with pytest.raises(ZeroDivisionError):
        m(lambda x: 1 / x, [1, 0, 2])
    m.close()
    assert stats.ThreadMap(1)(square, [1, 2]) == [1, 4]


def test_ratio_handles_missing_values():
    assert stats.ratio(1.0, 4.0) == 0.25
    assert stats.ratio(1.0, 0.0) is None
    assert stats.ratio(None, 1.0) is None
    assert stats.ratio(float("nan"), 1.0) is None


def test_stage_timer_synchronises_around_each_stage():
    ticks = iter([0.0, 1.0, 1.0, 3.5])
    calls = []
    t = stats.StageTimer(sync=lambda: calls.append(1), clock=lambda: next(ticks))
    with t.stage("encoder"):
        pass
    with t.stage("decoder"):
        pass
    assert t.samples["encoder"] == [1.0] and t.samples["decoder"] == [2.5]
    assert len(calls) == 4  # before reading the clock at both ends of both stages
    assert t.summary()["encoder"]["p50"] == pytest.approx(1000.0)


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------

def _lat(v):
    return {"p50": v, "p95": v * 1.1, "p99": v * 1.2, "mean": v, "min": v * 0.9, "max": v * 1.3, "n": 6}


def _summ(m):
    return {"mean": m, "std": 0.01, "min": m - 0.02, "max": m + 0.01, "n": 3}


def _ok(backend, precision, e2e, mode=None):
    return {"backend": backend, "precision": precision, "device": "cpu", "status": "ok", "reason": None, "mode": mode,
            "accuracy": {"f1": _summ(0.9), "iou": _summ(0.8)},
            "parity": {"mask_f1": _summ(0.99), "max_abs_logit_diff": 1e-4, "changed_masks": 1, "n": 3},
            "latency_ms": {k: _lat(e2e / 4) for k in stats.STAGES} | {"end_to_end": _lat(e2e)},
            "throughput": [stats.throughput_summary(1, [e2e / 1000] * 3)],
            "memory": {"peak_rss_mb": 500.0, "rss_growth_mb": 20.0, "gpu_peak_mb": None}}


def _results():
    return {
        "format": schema.FORMAT, "created": "2025-01-01T00:00:00Z", "command": ["lungsam", "bench"],
        "bundle": {"path": "/b", "backbone": "tiny", "working_size": 256, "img_size": 128, "prompt": "points",
                   "threshold": 0.5, "run": "/r", "fold": 0},
        "data": {"source": "x", "n_images": 3, "ids": ["a", "b", "c"]},
        "settings": {"device": "cpu", "backends": ["torch", "onnxruntime", "tensorrt"], "precisions": ["fp32"],
                     "batches": [1], "warmup": 1, "repeats": 2, "threads": None},
        "machine": {"cpu": "AMD EPYC", "cpu_count": 2, "gpu": None},
        "versions": {"python": "3.11"},
        "reference": {"backend": "torch", "precision": "fp32", "status": "ok"},
        "results": [_ok("torch", "fp32", 100.0, "eager"), _ok("onnxruntime", "fp32", 40.0),
                    {"backend": "tensorrt", "precision": "fp32", "device": "cpu", "status": "skipped",
                     "reason": "TensorRT runs on a GPU only", "mode": None}],
    }


def test_schema_accepts_a_complete_result():
    assert schema.validate_results(_results()) == []
    schema.check_results(_results())


@pytest.mark.parametrize("mutate, expect", [
    (lambda r: r.pop("machine"), "missing required key 'machine'"),
    (lambda r: r.update(format="other/1"), "expected 'lungsam-bench/1'"),
    (lambda r: r["results"][0].update(backend="tflite"), "is not one of"),
    (lambda r: r["results"][1]["latency_ms"]["encoder"].update(p50=float("nan")), "latency_ms.encoder.p50"),
    (lambda r: r["results"][1]["parity"].update(changed_masks=-1), "minimum"),
    (lambda r: r["results"][1].pop("latency_ms"), "status ok but no 'latency_ms'"),
    (lambda r: r["results"][2].update(reason=None), "needs a reason"),
    (lambda r: r["results"][2].update(latency_ms={}), "must not carry 'latency_ms'"),
    (lambda r: r["settings"].update(batches=[0]), "minimum"),
    (lambda r: r["bundle"].update(threshold=1.5), "maximum"),
])
def test_schema_rejects_violations(mutate, expect):
    r = copy.deepcopy(_results())
    mutate(r)
    errs = schema.validate_results(r)
    assert any(expect in e for e in errs), errs
    with pytest.raises(schema.SchemaError):
        schema.check_results(r)


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------

def test_markdown_table_has_every_row_and_the_skip_reason():
    res = _results()
    res["results"][1]["vs_reference"] = {"end_to_end_p50": 0.4}
    md = report.markdown_report(res)
    table = [l for l in md.splitlines() if l.startswith("| ")]
    assert len(table) == 1 + 3  # header + one row per result
    assert "TensorRT runs on a GPU only" in md and "**skipped**" in md
    assert "0.40x" in md and "reference" in md
    assert all(l.count("|") == table[0].count("|") for l in table)


def test_latency_chart_writes_png(tmp_path):
    p = report.latency_chart(_results(), tmp_path / "latency.png")
    assert p is not None and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = _results()
    empty["results"] = [empty["results"][2]]
    assert report.latency_chart(empty, tmp_path / "none.png") is None


def test_compare_ratios():
    old, new = _results(), _results()
    new["results"][1] = _ok("onnxruntime", "fp32", 20.0)
    new["results"][1]["accuracy"]["f1"]["mean"] = 0.91
    lines, records = report.compare(new, old)
    rec = {(r["backend"], r["precision"]): r for r in records}
    assert rec[("onnxruntime", "fp32")]["end_to_end_p50_ratio"] == pytest.approx(0.5)
    assert rec[("onnxruntime", "fp32")]["throughput_ratio"]["1"] == pytest.approx(2.0)
    assert rec[("onnxruntime", "fp32")]["f1_mean_delta"] == pytest.approx(0.01)
    assert rec[("torch", "fp32")]["end_to_end_p50_ratio"] == pytest.approx(1.0)
    assert ("tensorrt", "fp32") not in rec  # skipped in both
    assert any("0.50x" in l for l in lines)


def test_parity_counts_changed_masks():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    b[0, 0] = True
    ref = Outputs(masks=[a, a], low_res=[np.zeros((2, 2), np.float32)] * 2)
    out = Outputs(masks=[a, b], low_res=[np.zeros((2, 2), np.float32), np.full((2, 2), -0.25, np.float32)])
    p = parity(out, ref)
    assert p["changed_masks"] == 1 and p["n"] == 2
    assert p["max_abs_logit_diff"] == pytest.approx(0.25)
    assert p["mask_f1"]["min"] == 0.0 and p["mask_f1"]["max"] == 1.0  # empty vs empty is 1.0 by definition


def test_machine_record_has_cpu_and_versions():
    from lungsam.benchmarks.machine import full_machine_record, versions

    rec = full_machine_record()
    assert rec["cpu_count"] >= 1 and isinstance(rec["cpu"], str)
    assert "CPUExecutionProvider" in rec["onnxruntime_providers"]
    v = versions()
    assert v["torch"] and v["onnxruntime"] and v["python"]


# ---------------------------------------------------------------------------------------------
# skip paths (this machine: no GPU, no TensorRT)
# ---------------------------------------------------------------------------------------------

class _NoFp16Bundle:
    def has_model(self, name, precision="fp32"):
        return precision == "fp32"


def test_plan_skips_what_cannot_run_here():
    plans = make_plan(["torch", "onnxruntime", "tensorrt"], ["fp32", "fp16", "bf16"], "cpu", _NoFp16Bundle())
    by = {(p.backend, p.precision): p for p in plans}
    assert plans[0].backend == "torch" and plans[0].precision == "fp32" and plans[0].mode == "eager"
    assert by[("tensorrt", "fp32")].skip.startswith("TensorRT runs on a GPU only")
    assert "no fp16 models" in by[("onnxruntime", "fp16")].skip
    assert "bf16" in by[("onnxruntime", "bf16")].skip
    assert by[("onnxruntime", "fp32")].skip is None
    int8 = make_plan(["torch", "onnxruntime", "tensorrt"], ["fp32", "int8"], "cpu", _NoFp16Bundle())
    by = {(p.backend, p.precision): p for p in int8}
    assert "onnxruntime CPU quantisation" in by[("torch", "int8")].skip
    assert "export with --int8" in by[("onnxruntime", "int8")].skip
    assert "GPU only" in by[("tensorrt", "int8")].skip
    cuda = {p.backend: p for p in make_plan(["onnxruntime"], ["int8"], "cuda", _NoFp16Bundle())}
    assert "CPU only" in cuda["onnxruntime"].skip
    with pytest.raises(ValueError):
        make_plan(["tflite"], ["fp32"], "cpu", _NoFp16Bundle())


def test_cuda_plan_puts_eager_and_cuda_graph_rows_side_by_side():
    plans = make_plan(["torch"], ["fp32", "fp16", "bf16"], "cuda", _NoFp16Bundle())
    assert [(p.precision, p.mode) for p in plans] == [
        ("fp32", "eager"), ("fp32", "cuda_graph"), ("fp16", "eager"), ("fp16", "cuda_graph"),
        ("bf16", "eager"), ("bf16", "cuda_graph")]


def test_torch_on_missing_cuda_is_skipped_with_reason(tiny_run):
    import torch

    from lungsam.runs import load_run

    if torch.cuda.is_available():
        pytest.skip("this test covers machines without CUDA")
    rm = load_run(tiny_run)
    data = Images("x", ["a"], [np.zeros((rm.working_size,) * 2 + (3,), np.uint8)], [np.ones((rm.working_size,) * 2, bool)])
    for device, precision, expect in [("cuda", "fp32", "no CUDA device"), ("cpu", "fp16", "GPU only")]:
        rec, out = bench_one(Plan("torch", precision, "eager"), None, rm, data, device, [1], 0, 1, None, None,
                             log=lambda m: None, progress=False)
        assert rec["status"] == "skipped" and expect in rec["reason"] and out is None
        assert "latency_ms" not in rec


def _with_cleanup(bundle, spec):
    """``bundle`` (loaded) as if exported with the mask clean-up ``spec`` (manifest ``postprocess``)."""
    import dataclasses

    section = spec.to_dict()
    return dataclasses.replace(bundle, manifest={**bundle.manifest, "postprocess": section},
                               meta=dataclasses.replace(bundle.meta, postprocess=section))


def test_torch_reference_cleans_masks_as_the_bundle_records_like_the_runtime(tiny_bundle, tiny_run):
    """The torch reference row applies the bundle's recorded clean-up (manifest ``postprocess``) as the runtime
    does: on logits with a speck outside the lungs and a hole inside one, torch drops the speck and fills the hole,
    and its masks agree with the onnxruntime row's on the same logits."""
    import torch

    from lungsam.benchmarks.backends import open_backend
    from lungsam.postprocess import CleanupSpec, clean_mask
    from lungsam.runs import load_run
    from lungsam.runtime.bundle import Bundle

    rm = load_run(tiny_run)
    loaded = Bundle.load(tiny_bundle)
    on, off = _with_cleanup(loaded, CleanupSpec(enabled=True)), _with_cleanup(loaded, CleanupSpec(enabled=False))
    side = 4 * rm.spec.embedding_size
    low = torch.full((1, 1, side, side), -20.0)
    low[..., 4:side - 4, 3:side // 2 - 2] = 20.0  # right lung
    low[..., 4:side - 4, side // 2 + 2:side - 3] = 20.0  # left lung
    low[..., side // 2, side // 4] = -20.0  # a hole in the right lung
    low[..., 1, side // 2] = 20.0  # a speck between them, at the top
    raw = open_backend(Plan("torch", "fp32", "eager"), off, rm, "cpu", 1).postprocess(low)
    torch_masks = open_backend(Plan("torch", "fp32", "eager"), on, rm, "cpu", 1).postprocess(low)
    want = clean_mask(raw[0], CleanupSpec(enabled=True))
    assert not np.array_equal(raw[0], want)  # the logits do need cleaning
    np.testing.assert_array_equal(torch_masks[0], want)

    ort = open_backend(Plan("onnxruntime", "fp32"), on, rm, "cpu", 1)
    s = rm.working_size
    image = np.random.default_rng(0).integers(0, 256, (s, s, 3), dtype=np.uint8)
    prepared, _, _ = ort.preprocess([image], [np.zeros((s, s), bool)])
    ort_masks = ort.postprocess((prepared, low.numpy()))
    ort.close()
    assert ort_masks.shape == torch_masks.shape
    assert f1_score(ort_masks[0], torch_masks[0]) > 0.99


def test_torch_batch_preprocess_in_threads_equals_image_by_image(tiny_run):
    """The torch backend's batch (parallel threads writing into one reused host buffer) holds exactly each
    image's encoder_input, in order, on every call."""
    from lungsam.benchmarks.torch_backend import TorchBackend
    from lungsam.preprocess import encoder_input
    from lungsam.runs import load_run

    rm = load_run(tiny_run)
    be = TorchBackend(rm.sam, rm.spec, rm.prompt, rm.threshold, rm.working_size, preprocess_threads=3)
    rng = np.random.default_rng(0)
    s = rm.working_size
    for _ in range(2):  # the second call rewrites the same buffer
        images = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for _ in range(4)]
        images[0] = np.repeat(images[0][..., :1], 3, axis=2)  # a grey one too
        x = be.preprocess(images, None)["x"].numpy()
        np.testing.assert_array_equal(x, np.stack([encoder_input(im, rm.spec) for im in images]))
    be.close()


def test_resize_encoder_equals_a_natively_built_encoder():
    import torch

    from lungsam.backbones import TINY_PREPROCESS, build_tiny, resize_encoder
    from lungsam.modeling.tiny_vit import TinyViT

    sam = build_tiny()
    small, spec = resize_encoder(sam, TINY_PREPROCESS, 64)
    assert spec.img_size == 64 and spec.embedding_size == 4 and small.prompt_encoder.image_embedding_size == (4, 4)
    native = TinyViT(img_size=64, patch_stride=4, embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1),
                     num_heads=(1, 2, 2, 2), window_sizes=(4, 4, 4, 4), out_chans=32)
    native.load_state_dict(sam.image_encoder.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(small.image_encoder(x), native.eval()(x), atol=1e-6)
        assert sam.image_encoder(torch.randn(1, 3, 128, 128)).shape[-1] == 8  # the original is untouched
    with pytest.raises(ValueError):
        resize_encoder(sam, TINY_PREPROCESS, 72)


# ---------------------------------------------------------------------------------------------
# end to end: train tiny -> export -> bench (CPU)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bundle(tiny_run, tmp_path_factory):
    from click.testing import CliRunner

    from lungsam.export.commands import export

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    res = CliRunner().invoke(export, [str(tiny_run), "--out", str(out), "--fp16", "--int8", "--int8-method", "dynamic",
                                      "--provenance"],
                             catch_exceptions=False)  # --provenance: bench finds the run (torch reference)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def tiny_bench(tiny_bundle, tmp_path_factory):
    from click.testing import CliRunner

    from lungsam.benchmarks.commands import bench

    out = tmp_path_factory.mktemp("bench") / "tiny"
    res = CliRunner().invoke(bench, [str(tiny_bundle), "--out", str(out), "--limit", "3", "--repeats", "2",
                                     "--warmup", "1", "--batch", "1,2", "--threads", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, res.output


def test_bench_tiny_bundle_end_to_end(tiny_bench, tiny_run):
    from lungsam.artifacts import read_json

    out, stdout = tiny_bench
    results = read_json(out / "results.json")
    assert schema.validate_results(results) == []
    assert results["data"]["n_images"] == 3
    assert results["bundle"]["int8_method"] == "dynamic"  # from the manifest's quantization record
    test_ids = read_json(tiny_run / "folds" / "fold_0" / "split.json")["test"]
    assert set(results["data"]["ids"]) <= set(test_ids)  # the bundle run's test split by default
    by = {(r["backend"], r["precision"]): r for r in results["results"]}

    ref = by[("torch", "fp32")]
    assert ref["status"] == "ok" and ref["mode"] == "eager"
    assert ref["parity"]["changed_masks"] == 0 and ref["parity"]["max_abs_logit_diff"] == 0.0
    ort = by[("onnxruntime", "fp32")]
    assert ort["status"] == "ok"
    assert ort["parity"]["mask_f1"]["min"] >= 0.98 and ort["parity"]["max_abs_logit_diff"] < 0.05
    assert abs(ort["accuracy"]["f1"]["mean"] - ref["accuracy"]["f1"]["mean"]) < 0.02
    assert ort["vs_reference"]["end_to_end_p50"] > 0
    assert by[("onnxruntime", "fp16")]["status"] == "ok"
    q = by[("onnxruntime", "int8")]  # in the default --precisions; the bundle was exported with --int8
    assert q["status"] == "ok" and q["parity"]["mask_f1"]["mean"] >= 0.98 and q["parity"]["max_abs_logit_diff"] > 0
    assert q["models"] == {"encoder": "encoder_int8.onnx", "decoder": "decoder.onnx",
                           "decoder_fixed": "decoder_fixed.onnx"}
    assert by[("torch", "int8")]["status"] == "skipped"
    for key in (("tensorrt", "fp32"), ("tensorrt", "fp16"), ("tensorrt", "int8")):
        assert by[key]["status"] == "skipped" and "GPU only" in by[key]["reason"]
    assert by[("torch", "fp16")]["status"] == "skipped" and by[("torch", "fp16")]["reason"]
    for r in (ref, ort):
        lat = r["latency_ms"]
        assert lat["end_to_end"]["n"] == 3 * 2
        assert all(lat[s]["p50"] > 0 for s in stats.STAGES)
        assert lat["end_to_end"]["p50"] >= lat["encoder"]["p50"]
        assert [t["batch"] for t in r["throughput"]] == [1, 2]
        assert r["memory"]["peak_rss_mb"] > 0
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 1 + len(results["results"])
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "x torch fp32 eager" in stdout


def test_bench_times_the_first_pass_box_on_every_backend(tiny_both_bundle, tmp_path):
    """A ``both`` bundle exported with --box-from-first-pass: torch and onnxruntime both run two decoder calls
    without ground truth, and agree with each other."""
    from lungsam.benchmarks.bench import FIRST_PASS_MODE, run_bench

    run, bundle = tiny_both_bundle
    res = run_bench(bundle, tmp_path / "b", backends=["torch", "onnxruntime"], precisions=["fp32"], warmup=1,
                    repeats=1, limit=3, batches=[1, 2], threads=1, progress=False, log=lambda m: None)
    assert schema.validate_results(res) == []
    assert res["bundle"]["box_source"].startswith("first pass")
    by = {r["backend"]: r for r in res["results"]}
    assert by["torch"]["status"] == "ok" and by["torch"]["mode"] == "eager"  # still the reference (ratios below)
    assert by["onnxruntime"]["status"] == "ok" and by["onnxruntime"]["mode"] == FIRST_PASS_MODE
    assert by["onnxruntime"]["vs_reference"]["end_to_end_p50"] > 0
    assert by["onnxruntime"]["parity"]["mask_f1"]["min"] >= 0.98
    assert "first pass" in (tmp_path / "b" / "results.md").read_text()
    gt = run_bench(bundle, tmp_path / "g", backends=["onnxruntime"], precisions=["fp32"], warmup=0, repeats=1, limit=2,
                   threads=1, progress=False, log=lambda m: None, box_from_first_pass=False, data_dir=None)
    assert gt["bundle"]["box_source"] == "ground truth" and gt["results"][0]["mode"] != FIRST_PASS_MODE


def test_bench_refuses_a_first_pass_box_for_a_points_bundle(tiny_bundle, tmp_path):
    from lungsam.benchmarks.bench import BenchError, run_bench

    with pytest.raises(BenchError, match="prompted with a box"):
        run_bench(tiny_bundle, tmp_path / "b", backends=["onnxruntime"], precisions=["fp32"], warmup=0, repeats=1,
                  limit=1, threads=1, progress=False, log=lambda m: None, box_from_first_pass=True)
    assert not (tmp_path / "b").exists()


def test_bench_compare_prints_ratios(tiny_bench, tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from lungsam.artifacts import read_json
    from lungsam.benchmarks.commands import bench

    old, _ = tiny_bench
    res = CliRunner().invoke(bench, [str(tiny_bundle), "--out", str(tmp_path / "new"), "--backends", "onnxruntime",
                                     "--precisions", "fp32", "--limit", "2", "--repeats", "1", "--warmup", "0",
                                     "--compare", str(old / "results.json")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    new = read_json(tmp_path / "new" / "results.json")
    rows = new["compare"]["rows"]
    assert [(r["backend"], r["precision"]) for r in rows] == [("onnxruntime", "fp32")]
    assert rows[0]["end_to_end_p50_ratio"] > 0
    assert "compared with" in res.output and "compared with an earlier result" in (tmp_path / "new" / "results.md").read_text()
    assert "parity" not in new["results"][0]  # no torch reference in this run


def test_sweep_tiny_run(tiny_run, tmp_path):
    from click.testing import CliRunner

    from lungsam.artifacts import read_json
    from lungsam.benchmarks.commands import bench
    from lungsam.benchmarks.sweep import validate_sweep

    res = CliRunner().invoke(bench, ["--sweep", "--run", str(tiny_run), "--out", str(tmp_path), "--sizes", "128,64",
                                     "--precisions", "fp32,bf16,int8", "--limit", "2", "--repeats", "1", "--warmup",
                                     "0"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sw = read_json(tmp_path / "sweep.json")
    assert validate_sweep(sw) == []
    ok = [(r["img_size"], r["decoder"]) for r in sw["rows"] if r["status"] == "ok"]
    assert ok == [(128, "tuned"), (128, "zero-shot"), (64, "tuned"), (64, "zero-shot")]
    assert all(r["status"] == "skipped" for r in sw["rows"] if r["precision"] == "bf16")
    int8 = [r for r in sw["rows"] if r["precision"] == "int8"]
    assert int8 and all(r["status"] == "skipped" and "lungsam bench BUNDLE" in r["reason"] for r in int8)
    tuned128 = next(r for r in sw["rows"] if r["img_size"] == 128 and r["decoder"] == "tuned")
    # at its native size the tuned row reproduces the run's own per-image test scores (training scores
    # float16-cached embeddings, hence the tolerance)
    per_image = {r["id"]: r["f1"] for r in read_json(tiny_run / "folds" / "fold_0" / "metrics.json")["per_image"]}
    want = np.mean([per_image[i] for i in sw["data"]["ids"]])
    assert tuned128["accuracy"]["f1"]["n"] == 2
    assert tuned128["accuracy"]["f1"]["mean"] == pytest.approx(want, abs=5e-3)
    assert tuned128["embedding_size"] == 8 and next(r for r in sw["rows"] if r["img_size"] == 64)["embedding_size"] == 4
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "zero-shot" in (tmp_path / "sweep.md").read_text()


def test_gpu_check_dry_run(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    env = dict(os.environ, KIT=str(kit), OUT=str(tmp_path / "out"), PYTHON=sys.executable, DEVICE="cpu")
    p = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for step in ("[train]", "[export]", "[bench]", "[sweep]"):
        assert step in p.stdout
    assert "lungsam bench" in p.stdout and "--device cpu" in p.stdout
    assert "onnxruntime" in p.stdout and "torch" in p.stdout  # the environment report
    assert (tmp_path / "out" / "summary.md").exists() and (tmp_path / "out" / "gpu_check.log").exists()


def test_bench_train_reports_the_encoder_size_and_per_sample_decoder_time(tmp_path):
    """``lungsam bench-train`` on the tiny backbone at a smaller encoder input: both epochs timed, the decoder step
    per sample at each batch size that fits, the grid recorded; a size that does not fit is a clear error."""
    from click.testing import CliRunner

    from lungsam.artifacts import read_json
    from lungsam.benchmarks.commands import bench_train

    res = CliRunner().invoke(bench_train, ["--backbone", "tiny", "--encoder-size", "64", "--images", "4",
                                           "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    r = read_json(tmp_path / "t" / "train_speed.json")
    assert (r["encoder_size"], r["embedding_grid"], r["images"]) == (64, 4, 4)
    assert r["epoch_cached_s"] > 0 and r["epoch_recompute_s"] > 0 and r["epoch_recompute_encoder_s"] > 0
    assert [p["batch_size"] for p in r["decoder_step_per_sample"]] == [1, 4]
    assert all(p["seconds_per_sample"] > 0 for p in r["decoder_step_per_sample"])
    assert "encoder input 64 (4x4 embedding grid)" in (tmp_path / "t" / "train_speed.md").read_text()
    bad = CliRunner().invoke(bench_train, ["--backbone", "tiny", "--encoder-size", "72", "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "multiple of 16" in bad.output and not (tmp_path / "b").exists()
