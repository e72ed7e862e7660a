"""``lungsam export``: ONNX graphs equal the torch model, bundles carry a verifiable manifest, the
parity gate refuses a bad export, and ``--trt`` fails fast without TensorRT."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lungsam.artifacts import sha256_file
from lungsam.backbones import build_backbone, get_backbone
from lungsam.cli import main
from lungsam.export.config import ExportOptions
from lungsam.modeling.decoder import decode
from lungsam.preprocess import PreprocessSpec, encoder_input, model_input
from lungsam.prompts import LearnedPrompt, labelled_points

from .conftest import TINY_JITTER_SHIFT

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("tiny"), get_backbone("tiny").preprocess


@pytest.fixture(scope="module")
def decoder_session(tiny, tmp_path_factory):
    from lungsam.export.onnx_export import export_decoder

    path = tmp_path_factory.mktemp("decoder") / "decoder.onnx"
    export_decoder(tiny[0], path)
    return _session(path)


@pytest.fixture(scope="module")
def fp16_bundle(tiny_run, tmp_path_factory) -> tuple[Path, str]:
    """``tiny_run`` exported through the CLI with --fp16 --int8 --provenance (parity on the fold's 3 test images;
    the manifest keeps the run folder and parity image ids)."""
    out = tmp_path_factory.mktemp("export") / "bundle"
    res = CliRunner().invoke(main, ["export", str(tiny_run), "--out", str(out), "--fp16", "--int8", "--int8-method",
                                    "dynamic", "--provenance", "--max-jitter-log-odds-shift", str(TINY_JITTER_SHIFT)])
    assert res.exit_code == 0, res.output
    return out, res.output


def _session(path):
    from lungsam.export.parity import ort_session

    return ort_session(path)


def _onnx_points(coords, labels, boxes):
    """Per-row ``labelled_points`` stacked into ONNX inputs ``(B, N, 2)``, ``(B, N)``."""
    rows = [labelled_points(None if coords is None else coords[i], None if labels is None else labels[i],
                            None if boxes is None else boxes[i]) for i in range(len((coords if coords is not None else boxes)))]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


@pytest.mark.parametrize("kind", ["points", "box", "points+box"])
def test_decoder_onnx_equals_torch_decode(tiny, decoder_session, kind):
    sam, sess = tiny[0], decoder_session
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((3, 32, 8, 8)).astype(np.float32)
    n_pts = 5  # traced with 4 points: the number of points is dynamic
    coords = (rng.uniform(0, 128, (3, n_pts, 2)).astype(np.float32) if kind != "box" else None)
    labels = (rng.integers(0, 2, (3, n_pts)).astype(np.float32) if kind != "box" else None)
    boxes = (np.sort(rng.uniform(0, 128, (3, 2, 2)), axis=1).reshape(3, 4).astype(np.float32) if kind != "points" else None)
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    with torch.no_grad():  # decode uses sam.prompt_encoder for points and boxes
        ref, ref_iou = decode(sam, torch.from_numpy(emb), t(coords), t(labels), t(boxes))
    pts, pl = _onnx_points(coords, labels, boxes)
    low, iou = sess.run(None, {"embeddings": emb, "point_coords": pts, "point_labels": pl})
    assert low.shape == (3, 1, 32, 32) and iou.shape == (3, 1)
    np.testing.assert_allclose(low, ref.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(iou, ref_iou.numpy(), atol=1e-5, rtol=0)
    assert np.abs(ref.numpy()).max() > 1e-2  # not a trivially zero output


def test_encoder_normalises_in_graph_with_dynamic_batch_and_external_data(tiny, tmp_path):
    """Raw padded input -> embeddings equal SAM's preprocessing + encoder, for a batch of 3. The weights
    go to encoder.onnx.data as for models over 2 GB (forced here with a 0-byte limit)."""
    from lungsam.export.onnx_export import export_encoder

    sam, spec = tiny
    files = export_encoder(sam, spec, tmp_path / "encoder.onnx", external_data_bytes=0)
    assert [f.name for f in files] == ["encoder.onnx", "encoder.onnx.data"]
    assert files[1].stat().st_size > files[0].stat().st_size
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(3)]
    raw = np.stack([model_input(im, spec)[0] for im in imgs])
    out = _session(files[0]).run(None, {"image": raw})[0]
    with torch.no_grad():  # SAM's own preprocessing: normalise, then zero-pad
        ref = sam.image_encoder(torch.from_numpy(np.stack([encoder_input(im, spec) for im in imgs]))).numpy()
    assert out.shape == (3, 32, 8, 8)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_minmax_normalisation_matches_numpy(tiny):
    from dataclasses import replace

    from lungsam.export.graphs import EncoderGraph
    from lungsam.preprocess import normalize_model_input

    sam, spec = tiny
    mm = replace(spec, normalization="minmax")
    raw = np.stack([model_input(np.random.default_rng(i).integers(20, 200, (64, 80, 3), dtype=np.uint8), mm)[0]
                    for i in range(2)])
    got = EncoderGraph(sam, mm).normalize(torch.from_numpy(raw)).numpy()
    np.testing.assert_allclose(got, normalize_model_input(raw, mm), atol=1e-6)


def test_fixed_decoder_bakes_the_learned_prompt(tiny, tmp_path):
    from lungsam.export.graphs import fixed_prompt_points
    from lungsam.export.onnx_export import export_fixed_decoder
    from lungsam.prompts import model_prompt

    sam, spec = tiny
    prompt = LearnedPrompt("auto-box", None, None, np.asarray([0.1, 0.2, 0.8, 0.9], np.float32), 3)
    coords, labels = fixed_prompt_points(prompt, spec, 256)
    export_fixed_decoder(sam, coords, labels, tmp_path / "fixed.onnx")
    emb = np.random.default_rng(1).standard_normal((2, 32, 8, 8)).astype(np.float32)
    low = _session(tmp_path / "fixed.onnx").run(["low_res_logits"], {"embeddings": emb})[0]
    _, _, box = model_prompt(prompt, spec, (256, 256))
    with torch.no_grad():
        ref, _ = decode(sam, torch.from_numpy(emb), boxes=torch.from_numpy(np.stack([box, box])))
    np.testing.assert_allclose(low, ref.numpy(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="ground-truth box"):
        fixed_prompt_points(LearnedPrompt("box", None, None, prompt.box, 3), spec, 256)
    # auto-both: learned points and the mean-mask box baked in together
    both = LearnedPrompt("auto-both", np.asarray([[0.3, 0.5], [0.7, 0.5]], np.float32), np.ones(2, np.int32),
                         prompt.box, 1)
    coords, labels = fixed_prompt_points(both, spec, 256)
    np.testing.assert_array_equal(labels, [1, 1, 2, 3])
    export_fixed_decoder(sam, coords, labels, tmp_path / "fixed_both.onnx")
    low = _session(tmp_path / "fixed_both.onnx").run(["low_res_logits"], {"embeddings": emb})[0]
    pc, pl, box = model_prompt(both, spec, (256, 256))
    with torch.no_grad():
        ref, _ = decode(sam, torch.from_numpy(emb), torch.from_numpy(np.stack([pc, pc])),
                        torch.from_numpy(np.stack([pl, pl])), torch.from_numpy(np.stack([box, box])))
    np.testing.assert_allclose(low, ref.numpy(), atol=1e-5, rtol=0)


def test_export_bundle_manifest_and_parity(fp16_bundle, tiny_run):
    out, output = fp16_bundle
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "lungsam-bundle/1" and m["backbone"] == "tiny" and m["opset"] == 17
    assert PreprocessSpec.from_dict(m["preprocess"]) == get_backbone("tiny").preprocess
    assert m["prompt"]["mode"] == "points" and m["working_size"] == 256 and 0 < m["threshold"] < 1
    expected = {f"{n}{s}.onnx" for n in ("encoder", "decoder", "decoder_fixed") for s in ("", "_fp16")}
    expected.add("encoder_int8.onnx")  # the int8 pipeline's decoders are the FP32 files
    assert set(m["files"]) == expected == {p.name for p in out.iterdir()} - {"manifest.json", "manifest.json.sha256"}
    for rel, rec in m["files"].items():
        assert rec == {"sha256": sha256_file(out / rel), "bytes": (out / rel).stat().st_size}
    dec = m["models"]["decoder"]["fp16"]
    assert dec["file"] == "decoder_fp16.onnx"
    assert [i["name"] for i in dec["inputs"]] == ["embeddings", "point_coords", "point_labels"]
    assert dec["inputs"][1]["shape"] == ["batch", "num_points", 2] and dec["inputs"][0]["dtype"] == "float32"
    assert m["models"]["encoder"]["fp32"]["outputs"][0]["shape"] == ["batch", 32, 8, 8]
    split = json.loads((tiny_run / "folds" / "fold_0" / "split.json").read_text())
    par = m["parity"]
    assert par["source"]["ids"] == split["test"] and par["min_agreement"] == 0.99
    assert {k for k in par["results"] if k.startswith("onnx-")} == {f"onnx-{p}/{d}" for p in ("fp32", "fp16", "int8")
                                                                   for d in ("decoder", "decoder_fixed")}
    # with openvino installed the same gate runs through OpenVINO (dynamic int8 has no OpenVINO model), and at
    # bf16 only on a CPU that computes it natively (the export's machine decides; CI machines differ)
    native_bf16 = par["machine"]["cpu_features"]["native_bf16"]  # of the machine that exported
    ov_precisions = ("fp32", "fp16") + (("bf16",) if native_bf16 else ())
    assert {k for k in par["results"] if not k.startswith("onnx-")} <= {
        f"openvino-{p}/{d}" for p in ov_precisions for d in ("decoder", "decoder_fixed")}
    fp32, fp16 = par["results"]["onnx-fp32/decoder"], par["results"]["onnx-fp16/decoder_fixed"]
    assert fp32["n"] == 3 and fp32["agreement_min"] >= 0.999 and fp32["max_abs_logit_diff"] < 1e-3
    assert fp16["agreement_mean"] >= 0.99 and fp16["max_abs_logit_diff"] < 0.05
    # the run's quality flag has a prompt-jitter term: every prompted decoder is gated at its ten variants too
    assert par["max_jitter_log_odds_shift"] == TINY_JITTER_SHIFT and m["qc"]["jitter"]["variants"]
    for name, r in par["results"].items():
        if name.endswith("/decoder_fixed"):
            assert "jitter" not in r  # the learned prompt is baked in: no variants to feed it
        else:
            assert r["jitter"]["n"] == 3 * len(m["qc"]["jitter"]["variants"]), name
            assert r["jitter"]["agreement_mean"] >= 0.99 and r["jitter"]["max_log_odds_shift"] <= TINY_JITTER_SHIFT, name
    assert par["results"]["onnx-fp32/decoder"]["jitter"]["max_abs_jitter_iou_diff"] < 1e-6
    int8 = par["results"]["onnx-int8/decoder"]
    assert int8["agreement_mean"] >= 0.99 and 0 < int8["max_abs_logit_diff"] < 0.5  # quantised, so never exact
    assert m["precisions"] == ["fp16", "fp32", "int8"]
    assert m["models"]["decoder_fixed"]["int8"]["file"] == "decoder_fixed.onnx"
    assert m["models"]["decoder_fixed"]["int8"]["same_as"] == "fp32" and "same_as" not in m["models"]["encoder"]["int8"]
    q = m["quantization"]["int8"]
    assert q["op_types"] == ["MatMul"] and q["weight_type"] == "uint8" and q["quantised_models"] == ["encoder"]
    assert q["fp32_models"] == ["decoder", "decoder_fixed"] and par["machine"]["cpu_count"] >= 1
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "encoder_int8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "Conv" in ops  # weight MatMuls quantised, convs kept
    assert (out / "encoder_int8.onnx").stat().st_size < (out / "encoder.onnx").stat().st_size
    assert abs(fp32["f1_gt_torch_mean"] - m["run"]["fold_metrics"]["test"]["f1"]["mean"]) < 1e-3
    assert m["run"]["fold"] == 0 and m["run"]["source"] == str(tiny_run.resolve())
    assert m["versions"]["onnx"] and "onnxconverter-common" in m["versions"]
    assert "onnx-fp16/decoder_fixed" in output  # figures printed
    import hashlib

    digest = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()  # the bundle digest, printed last
    assert output.strip().splitlines()[-1].startswith(f"bundle digest sha256:{digest}")
    assert (out / "manifest.json.sha256").read_text() == f"{digest}  manifest.json\n"
    assert m["provenance"] is True and m["parity"]["machine"]["hostname"]  # --provenance keeps host and paths


def test_fp16_bundle_runs_end_to_end_like_torch(fp16_bundle, tiny, tiny_run):
    """The FP16 encoder + fixed decoder of the bundle on a batch of 2 demo images vs torch."""
    from lungsam.data import load_dataset
    from lungsam.prompts import model_prompt

    out, _ = fp16_bundle
    m = json.loads((out / "manifest.json").read_text())
    sam = build_backbone("tiny")
    from safetensors.torch import load_file

    sam.mask_decoder.load_state_dict(load_file(str(tiny_run / "folds/fold_0/decoder_best.safetensors")))
    spec = get_backbone("tiny").preprocess
    imgs = [s.image for s in load_dataset("demo:montgomery", 256).samples[:2]]
    emb = _session(out / "encoder_fp16.onnx").run(None, {"image": np.stack([model_input(i, spec)[0] for i in imgs])})[0]
    low = _session(out / "decoder_fixed_fp16.onnx").run(["low_res_logits"], {"embeddings": emb})[0]
    coords, labels, _ = model_prompt(LearnedPrompt.from_dict(m["prompt"]), spec, (256, 256))
    with torch.no_grad():
        ref_emb = sam.image_encoder(torch.from_numpy(np.stack([encoder_input(i, spec) for i in imgs])))
        ref, _ = decode(sam, ref_emb, torch.from_numpy(np.stack([coords] * 2)), torch.from_numpy(np.stack([labels] * 2)))
    assert np.abs(low - ref.numpy()).max() < 0.05


def test_gate_failure_writes_nothing(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    # the dynamic INT8 encoder cannot agree on every pixel (0.995 here); --min-agreement is refused above 1
    res = CliRunner().invoke(main, ["export", str(tiny_run), "--out", str(out), "--min-agreement", "1", "--int8",
                                    "--int8-method", "dynamic", "--parity-images", "1"])
    assert res.exit_code != 0
    assert "parity gate failed" in res.output and "agree mean" in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_gate_catches_a_decoder_that_ignores_the_prompt_variants(fp16_bundle, tiny_run):
    """A decoder exact at the learned prompt but blind to moved points (the fixed decoder fed as a prompted one)
    passes the learned-prompt check and fails at the quality flag's variants."""
    from lungsam.export.bundle import parity_samples, run_cleanup, run_qc
    from lungsam.export.parity import JitterVariants, Pipeline, compare, failing, make_cases, onnx_pipeline
    from lungsam.runs import load_run

    out, _ = fp16_bundle
    rm = load_run(tiny_run, None, None)
    samples, _ = parity_samples(rm, None, 2)
    cases = make_cases(samples, rm.prompt, rm.spec)
    fixed = onnx_pipeline(out / "encoder.onnx", out / "decoder_fixed.onnx", True)
    pipes = {"blind": Pipeline(fixed.encode, fixed.decode, fixed=False),
             "prompted": onnx_pipeline(out / "encoder.onnx", out / "decoder.onnx", False)}
    jitter = JitterVariants.of(run_qc(rm), rm.prompt, rm.spec, rm.working_size)
    res = compare(pipes, rm.sam, rm.spec, cases, rm.threshold, cleanup=run_cleanup(rm), jitter=jitter)
    blind = res["blind"].summary()
    assert blind["agreement_mean"] == 1.0  # exact where the learned-prompt check looks
    assert blind["jitter"]["max_log_odds_shift"] > 1.0 and res["prompted"].summary()["jitter"]["max_log_odds_shift"] < 1e-3
    assert list(failing(res, 0.99)) == ["blind"] and "prompt variants" in failing(res, 0.99)["blind"]


def test_gate_fails_on_the_prompt_variants_alone():
    from lungsam.export.parity import JitterParity, ParityResult, failing, format_table

    def result(name, variant_agreement, iou_diff):
        return ParityResult(name, agreement=[1.0, 1.0], f1_gt=[0.9, 0.9], f1_gt_torch=[0.9, 0.9], ids=["a", "b"],
                            jitter=JitterParity(0.005, 1.0, agreement=variant_agreement, iou_diff=iou_diff))

    res = {"ok": result("ok", [0.999] * 4, [0.001, 0.002]), "moved": result("moved", [0.95] * 4, [0.0, 0.0]),
           "score": result("score", [0.999] * 4, [0.001, 0.0075]),
           "fixed": ParityResult("fixed", agreement=[1.0], f1_gt=[0.9], f1_gt_torch=[0.9], ids=["a"])}
    why = failing(res, 0.99)
    assert set(why) == {"moved", "score"}
    assert "prompt variants 0.95000" in why["moved"] and "1.50 log-odds > 1.0" in why["score"]
    assert res["score"].summary()["jitter"]["max_log_odds_shift"] == pytest.approx(1.5)
    table = format_table(res, 0.99).splitlines()
    assert "jitter agree" in table[0] and table[4].split()[-1] == "ok" and table[2].split()[-1] == "FAIL"


def test_gate_failure_names_the_optional_export_to_drop():
    from lungsam.export.bundle import optional_exports

    assert optional_exports(["onnx-int8/decoder", "onnx-int8/decoder_fixed", "trt-fp16/decoder"]) == ["--int8", "--trt"]
    assert optional_exports(["onnx-fp16/decoder"]) == ["--fp16"] and optional_exports(["onnx-fp32/decoder"]) == []


def test_existing_out_is_refused(tiny_run, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    res = CliRunner().invoke(main, ["export", str(tiny_run), "--out", str(tmp_path)])
    assert res.exit_code != 0 and "already exists" in res.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_trt_without_tensorrt_fails_fast(tmp_path, monkeypatch):
    import lungsam.runs

    def boom(*a, **k):
        raise AssertionError("--trt did work before checking for TensorRT")

    monkeypatch.setattr(lungsam.runs, "load_run", boom)
    res = CliRunner().invoke(main, ["export", str(tmp_path), "--out", str(tmp_path / "b"), "--trt"])
    assert res.exit_code != 0
    assert "pip install 'lungsam[trt]'" in res.output
    assert not (tmp_path / "b").exists()


@pytest.mark.trt
def test_trt_engines_match_onnx(tiny_run, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'lungsam[trt]')")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    from lungsam.export.bundle import export_bundle
    from lungsam.export.config import ExportOptions

    res = export_bundle(tiny_run, tmp_path / "b", ExportOptions(trt=True, max_batch=4,
                                                                max_jitter_log_odds_shift=TINY_JITTER_SHIFT),
                        log=lambda m: None)
    eng = res.manifest["engines"]
    assert set(eng) == {"encoder", "decoder", "decoder_fixed"}
    for rec in eng.values():
        assert rec["gpu"] and rec["compute_capability"] and rec["tensorrt"] and rec["precision"] == "fp16"
        assert rec["profiles"][0] and rec["file"] in res.manifest["files"]
    assert "timing.cache" in res.manifest["files"]
    assert res.manifest["parity"]["results"]["trt-fp16/decoder_fixed"]["agreement_mean"] >= 0.99


def test_run_trained_at_a_smaller_encoder_size_exports_and_runs(tmp_path):
    """--encoder-size travels from the run to the bundle: the encoder graph, the prompt frame and the manifest's
    preprocessing all use it, and the parity gate holds."""
    from lungsam.export.bundle import export_bundle
    from lungsam.runs import load_run
    from lungsam.runtime import LungSegmenter
    from lungsam.train.config import TrainConfig
    from lungsam.train.run import train_run

    run = tmp_path / "run"
    train_run(TrainConfig(backbone="tiny", encoder_size=64, folds=1, epochs=1, lr=1e-3), run, log=lambda m: None,
              progress=False)
    rm = load_run(run)
    assert (rm.spec.img_size, rm.sam.image_encoder.img_size) == (64, 64)
    assert "image encoder input 64" in (run / "report.md").read_text()
    res = export_bundle(run, tmp_path / "b", ExportOptions(max_jitter_log_odds_shift=TINY_JITTER_SHIFT),
                        parity_images=2, log=lambda m: None)
    assert res.manifest["preprocess"]["img_size"] == 64
    assert res.manifest["parity"]["results"]["onnx-fp32/decoder"]["agreement_mean"] >= 0.99
    seg = LungSegmenter.load(tmp_path / "b", threads=1)
    ramp = np.linspace(40, 200, 96 * 80).reshape(96, 80, 1).astype(np.uint8)  # constant images are refused
    r = seg.segment(np.repeat(ramp, 3, axis=2))
    assert r.mask.shape == (96, 80) and seg.describe()["img_size"] == 64


@pytest.mark.slow
def test_a_killed_export_leaves_a_temp_folder_that_the_next_export_removes(tiny_run, tmp_path):
    """kill -9 during the export: the hidden temp folder beside --out is swept by the next export."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lungsam.export.bundle import make_temp_folder

    out = tmp_path / "bundles" / "b"
    code = (f"from lungsam.export.bundle import export_bundle; from lungsam.export.config import ExportOptions; "
            f"export_bundle({str(tiny_run)!r}, {str(out)!r}, ExportOptions(fp16=True, max_jitter_log_odds_shift="
            f"{TINY_JITTER_SHIFT}), log=lambda m: None)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any((out.parent).glob(".lungsam-export.*/encoder.onnx")):
            assert proc.poll() is None, "the export ended before it could be killed"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    left = list(out.parent.glob(".lungsam-export.*"))
    assert len(left) == 1 and not out.exists()  # what the issue saw: a hidden folder, never removed...
    logged: list[str] = []
    fresh = make_temp_folder(out, logged.append)  # ...until the next export starts
    assert not left[0].exists() and logged and list(out.parent.iterdir()) == [fresh]
