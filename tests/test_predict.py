"""The runtime on a real exported bundle (train tiny -> lungsam export -> LungSegmenter / lungsam predict)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lungsam import preprocess as pp
from lungsam.imageio import read_image
from lungsam.metrics import f1_score
from lungsam.prompts import labelled_points, model_prompt
from lungsam.runtime import BackendUnavailableError, BundleIntegrityError, LungSegmenter, SegmentationResult
from lungsam.runtime.backends import ort_available_providers
from lungsam.runtime.commands import predict

from .conftest import REPO
from .test_runtime import write_dicom

DEMO = REPO / "lungsam" / "demo_data" / "montgomery" / "images"


def demo_images(n: int) -> list[Path]:
    return sorted(DEMO.glob("*.png"))[:n]


@pytest.fixture(scope="module")
def seg(tiny_bundle) -> LungSegmenter:
    return LungSegmenter.load(tiny_bundle, threads=1)


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------

def test_segment_returns_original_size_mask_probability_score_and_timings(seg):
    path = demo_images(1)[0]
    img = read_image(path)
    r = seg.segment(path)
    assert isinstance(r, SegmentationResult) and r.ok
    assert r.mask.shape == r.probability.shape == img.hw
    assert r.mask.dtype == bool and r.probability.dtype == np.float32
    np.testing.assert_array_equal(r.mask, r.probability > seg.threshold)
    assert r.area_px == int(r.mask.sum()) and r.area_mm2 is None and r.pixel_spacing_mm is None
    assert np.isfinite(r.score) and r.prompt == "learned" and r.source == path
    assert set(r.timings) >= {"read_s", "preprocess_s", "encode_s", "decode_s", "postprocess_s", "total_s"}
    # array and LoadedImage inputs give the same result; arrays take a spacing from the caller
    r2 = seg.segment(img.pixels[:, :, None], pixel_spacing_mm=(0.5, 0.25))
    np.testing.assert_array_equal(r2.probability, r.probability)
    assert r2.area_mm2 == pytest.approx(r.area_px * 0.125)
    np.testing.assert_array_equal(seg.segment(img).mask, r.mask)


def test_runtime_equals_the_torch_training_path_end_to_end(seg, tiny_run):
    """Runtime probability (ONNX + numpy) vs the run's torch model fed by preprocess.encoder_input,
    lungsam.modeling.decoder.decode with the learned prompt, Sam.postprocess_masks and F.interpolate."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from lungsam.modeling.decoder import decode
    from lungsam.runs import load_run

    rm = load_run(tiny_run, fold=seg.bundle.manifest.get("run", {}).get("fold"))
    assert rm.prompt.to_dict() == seg.prompt.to_dict() and rm.threshold == pytest.approx(seg.threshold)
    s = rm.working_size
    for path in demo_images(2):
        pixels = read_image(path).pixels
        pixels = pixels[: int(pixels.shape[0] * 0.8)]  # non-square original
        working = pp.to_working(pixels, s)
        coords, labels, box = model_prompt(rm.prompt, rm.spec, (s, s))
        with torch.no_grad():
            emb = rm.sam.image_encoder(torch.from_numpy(pp.encoder_input(working, rm.spec))[None])
            t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float32))[None]  # noqa: E731
            low, iou = decode(rm.sam, emb, t(coords), t(labels), t(box))
            _, input_hw = pp.model_input(working, rm.spec)
            up = rm.sam.postprocess_masks(low, input_hw, (s, s))
            ref = torch.sigmoid(F.interpolate(up, pixels.shape[:2], mode="bilinear", align_corners=False))[0, 0].numpy()
        r = seg.segment(pixels)
        np.testing.assert_allclose(r.probability, ref, atol=2e-4)
        assert r.score == pytest.approx(float(iou[0, 0]), abs=1e-3)
        assert f1_score(r.mask, ref > rm.threshold) > 0.99


def test_stages_batch_and_fixed_decoder_match_the_prompted_decoder(seg):
    paths = demo_images(3)
    prepared = [seg.preprocess(p) for p in paths]
    x = np.stack([p.model_input for p in prepared])
    emb = seg.encode(x)
    assert emb.shape[0] == 3 and emb.shape[2] == seg.spec.embedding_size
    np.testing.assert_allclose(seg.encode(x[1])[0], emb[1], atol=1e-4)  # batch == single
    low, iou = seg.decode(emb)
    assert low.shape == (3, 1, seg.spec.low_res_size, seg.spec.low_res_size) and iou.shape == (3, 1)
    # the baked-in prompt equals the learned prompt through the interactive decoder
    s = seg.working_size
    learned = labelled_points(*model_prompt(seg.prompt, seg.spec, (s, s)))
    low2, iou2 = seg.decode(emb, learned)
    np.testing.assert_allclose(low2, low, atol=1e-4)
    np.testing.assert_allclose(iou2, iou, atol=1e-4)
    # mixed prompt sizes in one batch are decoded in groups, in order
    box = seg.model_prompts(prepared[0].original_hw, box=[50, 60, 400, 450])
    low3, _ = seg.decode(emb, [learned, box, None])
    np.testing.assert_allclose(low3[0], low[0], atol=1e-4)
    np.testing.assert_allclose(low3[2], low[2], atol=1e-4)
    np.testing.assert_allclose(low3[1], seg.decode(emb[1:2], box)[0][0], atol=1e-4)
    mask, prob = seg.postprocess(low[0], prepared[0])
    assert mask.shape == prepared[0].original_hw


def test_interactive_prompts_in_original_coordinates(seg):
    path = demo_images(1)[0]
    img = read_image(path)
    h, w = img.hw
    pts = np.asarray([[0.3 * w, 0.5 * h], [0.7 * w, 0.5 * h]], np.float32)
    r = seg.segment(path, points=pts, labels=[1, 1])
    assert r.prompt == "interactive" and r.mask.shape == (h, w)
    # the same prompt given on a 2x upscaled original lands on the same model-frame points
    big = np.asarray(Image.fromarray(img.pixels).resize((w * 2, h * 2), Image.BILINEAR))
    c1 = seg.model_prompts((h, w), points=pts)
    c2 = seg.model_prompts((2 * h, 2 * w), points=pts * 2)
    np.testing.assert_allclose(c1[0], c2[0], atol=1e-4)
    r_big = seg.segment(big, points=pts * 2)
    assert r_big.mask.shape == (2 * h, 2 * w)
    rb = seg.segment(path, box=[0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h])
    assert rb.prompt == "interactive" and not np.array_equal(rb.probability, r.probability)


def test_segment_many_streams_in_order_and_reports_bad_inputs(seg, tmp_path):
    good = demo_images(3)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    sources = [good[0], bad, good[1], empty, tmp_path / "missing.png", good[2]]
    for batch_size in (1, 2):
        out = list(seg.segment_many(sources, batch_size=batch_size, prefetch=2))
        assert [o.ok for o in out] == [True, False, True, False, False, True]
        assert [o.source for o in out] == sources
        assert "bad.png: cannot read image" in out[1].error
        assert "empty" in out[3].error and "0 bytes" in out[3].error
        assert "no such file" in out[4].error
        single = seg.segment(good[1])
        np.testing.assert_allclose(out[2].probability, single.probability, atol=1e-4)
    # early stop does not hang the prefetch thread
    it = seg.segment_many(good * 3)
    assert next(it).ok
    it.close()


def test_no_silent_cuda_fallback(tiny_bundle):
    if "CUDAExecutionProvider" in ort_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        LungSegmenter.load(tiny_bundle, device="cuda")
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        LungSegmenter.load(tiny_bundle, backend="tensorrt", device="cuda")
    with pytest.warns(RuntimeWarning, match="falling back"):
        s = LungSegmenter.load(tiny_bundle, device="cuda", allow_fallback=True)
    assert s.device == "cpu" and s.describe()["fallbacks"]
    assert s.describe()["providers"]["encoder"] == ["CPUExecutionProvider"]
    r = s.segment(demo_images(1)[0])  # runs on the fallback
    assert r.mask.shape == read_image(demo_images(1)[0]).hw


@pytest.mark.trt
def test_tensorrt_backend_matches_onnxruntime(tiny_bundle, seg):
    pytest.importorskip("tensorrt", reason="tensorrt not installed")
    b = LungSegmenter.load(tiny_bundle, backend="tensorrt", device="cuda")
    path = demo_images(1)[0]
    np.testing.assert_allclose(b.segment(path).probability, seg.segment(path).probability, atol=2e-2)


def test_modified_or_missing_bundle_file_is_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    target = b / "decoder_fixed.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"decoder_fixed\.onnx: sha256"):
        LungSegmenter.load(b)
    r = CliRunner().invoke(predict, [str(b), str(demo_images(1)[0]), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "decoder_fixed.onnx" in r.output and "failed verification" in r.output
    (b / "encoder.onnx").unlink()
    with pytest.raises(BundleIntegrityError, match=r"encoder\.onnx: missing"):
        LungSegmenter.load(b)
    assert not (tmp_path / "o" / "predictions.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# lungsam predict
# ---------------------------------------------------------------------------------------------

def test_predict_bad_inputs_do_not_stop_the_batch(tiny_bundle, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    good = demo_images(3)
    for p in good:
        shutil.copy(p, d / p.name)
    raw = good[0].read_bytes()
    (d / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (d / "zero.png").write_bytes(b"")
    (d / "notes.txt").write_text("hello")  # not an image suffix: listed only when named explicitly
    # 16-bit grayscale TIFF and an RGB JPEG, given as files
    g16 = (np.asarray(Image.open(good[1]).convert("L"), np.uint16) * 257)
    Image.fromarray(g16).save(tmp_path / "wide16.tif")
    Image.open(good[2]).convert("RGB").save(tmp_path / "rgb.jpg", quality=95)
    out = tmp_path / "out"
    r = CliRunner().invoke(predict, [str(tiny_bundle), str(d), str(d / "notes.txt"), str(tmp_path / "wide16.tif"),
                                     str(tmp_path / "rgb.jpg"), "--out", str(out), "--overlay", "--threads", "1",
                                     "--no-progress"])
    assert r.exit_code == 1, r.output
    assert "5 ok, 3 failed" in r.output
    threshold = json.loads((tiny_bundle / "manifest.json").read_text())["threshold"]
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    by = {Path(x["file"]).name: x for x in lines}
    assert by["truncated.png"]["status"] == "error" and "truncated.png" in by["truncated.png"]["error"]
    assert by["zero.png"]["status"] == "error" and "0 bytes" in by["zero.png"]["error"]
    assert by["notes.txt"]["status"] == "error" and "cannot read image" in by["notes.txt"]["error"]
    for name in [p.name for p in good] + ["wide16.tif", "rgb.jpg"]:
        rec = by[name]
        assert rec["status"] == "ok" and rec["error"] is None, rec
        assert rec["area_mm2"] is None and rec["threshold"] == pytest.approx(threshold)
        stem = Path(name).stem
        m = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
        assert list(m.shape) == rec["size"] and rec["area_px"] == int((m == 255).sum())
        assert Image.open(out / f"{stem}_overlay.png").size == (m.shape[1], m.shape[0])
        assert set(rec["timings"]) >= {"read_s", "preprocess_s", "encode_s", "decode_s", "postprocess_s", "total_s"}
    for stem in ("truncated", "zero", "notes"):
        assert not (out / f"{stem}_mask.png").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # the 16-bit TIFF (257 * 8-bit) gives the same mask as its 8-bit source
    a = np.asarray(Image.open(out / "wide16_mask.png")) > 0
    b = np.asarray(Image.open(out / f"{good[1].stem}_mask.png")) > 0
    assert f1_score(a, b) > 0.99 if b.any() else not a.any()


def test_predict_all_good_exits_zero(tiny_bundle, tmp_path):
    r = CliRunner().invoke(predict, [str(tiny_bundle), *map(str, demo_images(2)), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "2 ok, 0 failed" in r.output
    records = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [rec["prompt"] for rec in records] == [{"kind": "learned", "box_source": None}] * 2  # points: no box


def test_predict_scores_against_ground_truth(tiny_bundle, seg, tmp_path):
    imgs = demo_images(3)
    gt = tmp_path / "gt"
    gt.mkdir()
    for p in imgs[:2]:  # the third image has no reference mask
        shutil.copy(DEMO.parent / "masks" / p.name, gt / p.name)
    r = CliRunner().invoke(predict, [str(tiny_bundle), *map(str, imgs), "--out", str(tmp_path / "o"),
                                     "--ground-truth", str(gt), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "vs ground truth (2 images)" in r.output
    recs = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    for rec, p in zip(recs[:2], imgs):
        ref = np.asarray(Image.open(DEMO.parent / "masks" / p.name)) > 0
        pred = np.asarray(Image.open(tmp_path / "o" / rec["mask"])) > 0
        assert rec["f1"] == pytest.approx(f1_score(pred, ref), abs=1e-6)
    assert "no mask named" in recs[2]["score_error"]
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n"] == 2 and m["f1"]["mean"] == pytest.approx(np.mean([r["f1"] for r in recs[:2]]), abs=1e-6)
    assert m["unscored"] == [str(imgs[2])]
    assert (m["segmenter"]["backend"], m["segmenter"]["precision"], m["segmenter"]["fallbacks"]) == \
        ("onnxruntime", "fp32", [])
    run = json.loads((tmp_path / "o" / "predict.json").read_text())
    assert (run["inputs"], run["ok"], run["failed"]) == (3, 3, 0) and run["segmenter"]["device"] == "cpu"
    assert "lungsam" in run["versions"]


def test_predict_dicom_spacing_and_monochrome1(tiny_bundle, tmp_path):
    src = demo_images(1)[0]
    gray = np.asarray(Image.open(src).convert("L"))
    stored = (gray.astype(np.uint16) * 16).astype(np.uint16)
    d = tmp_path / "dcm"
    d.mkdir()
    write_dicom(d / "m1_spacing.dcm", 4095 - stored, "MONOCHROME1", spacing=(0.2, 0.15))  # 12-bit, inverted encoding
    write_dicom(d / "m2_nospacing.dcm", stored, "MONOCHROME2")
    out = tmp_path / "out"
    r = CliRunner().invoke(predict, [str(tiny_bundle), str(d), str(src), "--out", str(out)])
    assert r.exit_code == 0, r.output
    by = {Path(x["file"]).name: x for x in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    m1, m2, png = by["m1_spacing.dcm"], by["m2_nospacing.dcm"], by[src.name]
    assert m1["area_mm2"] == pytest.approx(m1["area_px"] * 0.2 * 0.15, rel=1e-4)
    assert m1["pixel_spacing_mm"] == [0.2, 0.15]
    assert m2["area_mm2"] is None and m2["pixel_spacing_mm"] is None
    assert png["area_px"] > 0 and png["pixel_spacing_mm"] is None
    # MONOCHROME1 correctly inverted: the mask equals the one of the same image stored as MONOCHROME2 / PNG
    mask = lambda n: np.asarray(Image.open(out / f"{n}_mask.png")) > 0  # noqa: E731
    ref = mask(src.stem)
    for stem in ("m1_spacing", "m2_nospacing"):
        assert f1_score(mask(stem), ref) > 0.98 if ref.any() else not mask(stem).any()


def test_predict_cuda_without_fallback_fails_and_with_fallback_warns(tiny_bundle, tmp_path):
    if "CUDAExecutionProvider" in ort_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    img = str(demo_images(1)[0])
    r = CliRunner().invoke(predict, [str(tiny_bundle), img, "--out", str(tmp_path / "a"), "--device", "cuda"])
    assert r.exit_code == 1 and "CUDAExecutionProvider" in r.output
    r = CliRunner().invoke(predict, [str(tiny_bundle), img, "--out", str(tmp_path / "b"), "--device", "cuda",
                                     "--allow-fallback"])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "falling back" in r.output and "1 ok, 0 failed" in r.output


def test_predict_cli_runs_without_torch(tiny_bundle, tmp_path):
    """`lungsam predict` through the runtime's command in a fresh interpreter never loads torch."""
    code = (
        "import sys\n"
        "from lungsam.runtime.commands import predict\n"
        "try:\n"
        f"    predict.main([{str(tiny_bundle)!r}, {str(demo_images(1)[0])!r}, '--out', {str(tmp_path / 'o')!r},"
        " '--no-progress'], standalone_mode=False)\n"
        "finally:\n"
        "    bad = [m for m in ('torch', 'lungsam.train', 'lungsam.export') if m in sys.modules]\n"
        "    assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "1 ok, 0 failed" in r.stdout


# ---------------------------------------------------------------------------------------------
# a box from the model's own first pass (a `both` bundle without annotations)
# ---------------------------------------------------------------------------------------------

def test_box_from_first_pass_matches_training_code_and_needs_no_box(tmp_path, tiny_both_bundle, tiny_bundle):
    from lungsam.artifacts import read_json
    from lungsam.data import DEMO_DATA, load_dataset
    from lungsam.runs import load_run
    from lungsam.runtime import BundleError, PromptRequiredError
    from lungsam.train.config import TrainConfig
    from lungsam.train.evaluate import score_model

    run, bundle = tiny_both_bundle
    inference = read_json(bundle / "manifest.json")["inference"]
    assert inference["box_from_first_pass"] is True  # exported with --box-from-first-pass: the bundle's default
    check = inference["first_pass_check"]
    assert check["n"] == 2 and 0.0 <= check["f1"]["min"] <= check["f1"]["mean"] <= 1.0
    with pytest.raises(PromptRequiredError):  # the caller can still ask for ground-truth boxes
        LungSegmenter.load(bundle, threads=1, box_from_first_pass=False).segment(demo_images(1)[0])
    seg2 = LungSegmenter.load(bundle, threads=1)
    assert seg2.box_from_first_pass and not seg2.needs_box and not seg2.uses_fixed_decoder
    samples = load_dataset(DEMO_DATA, 256).samples[:4]
    rm = load_run(run, 0)
    probs, *_ = score_model(rm.sam, rm.spec, rm.prompt, rm.threshold, TrainConfig(backbone="tiny", size=256), None,
                            rm.encoder_fingerprint, samples, "cpu", False, box_from_first_pass=True)
    for s, p in zip(samples, probs):  # demo images are 256x256: the original frame is the working frame
        r = seg2.segment(DEMO / f"{s.id.split('/')[-1]}.png")
        assert r.prompt == "first-pass box"
        np.testing.assert_allclose(r.probability, p, atol=2e-3)
        assert f1_score(r.mask, p > rm.threshold) > 0.99
    out = CliRunner().invoke(predict, [str(bundle), *map(str, demo_images(2)), "--out", str(tmp_path / "pred"),
                                       "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "box from the first pass" in out.output
    assert inference["box_source"] == "first-pass" and seg2.box_source == "first-pass"
    assert r.box_source == "first-pass"
    records = [json.loads(x) for x in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [rec["prompt"] for rec in records] == [{"kind": "first-pass box", "box_source": "first-pass"}] * 2
    out = CliRunner().invoke(predict, [str(bundle), *map(str, demo_images(2)), "--out", str(tmp_path / "pred_src"),
                                       "--no-progress", "--box-source", "first-pass"])
    assert out.exit_code == 0, out.output  # the policy and its alias: the same masks
    for rec in records:
        assert (tmp_path / "pred_src" / rec["mask"]).read_bytes() == (tmp_path / "pred" / rec["mask"]).read_bytes()
    out = CliRunner().invoke(predict, [str(bundle), str(demo_images(1)[0]), "--out", str(tmp_path / "p3"),
                                       "--box-source", "learned"])
    assert out.exit_code != 0 and "has no learned box" in out.output
    out = CliRunner().invoke(predict, [str(bundle), str(demo_images(1)[0]), "--out", str(tmp_path / "p4"),
                                       "--box-source", "learned", "--box-from-first-pass"])
    assert out.exit_code == 2 and "contradicts" in out.output
    out = CliRunner().invoke(predict, [str(bundle), str(demo_images(1)[0]), "--out", str(tmp_path / "p2"),
                                       "--no-box-from-first-pass"])
    assert out.exit_code != 0 and "--box-from-first-pass" in out.output
    with pytest.raises(BundleError, match="prompted with a box"):
        LungSegmenter.load(tiny_bundle, box_from_first_pass=True)
    assert read_json(tiny_bundle / "manifest.json")["inference"] == {"box_from_first_pass": False}


def test_export_refuses_first_pass_for_a_points_run(tiny_run, tmp_path):
    from lungsam.export.bundle import ExportError, export_bundle
    from lungsam.export.config import ExportOptions

    with pytest.raises(ExportError, match="prompted with a box"):
        export_bundle(tiny_run, tmp_path / "b", ExportOptions(box_from_first_pass=True), parity_images=1,
                      log=lambda m: None)
    assert not (tmp_path / "b").exists()
