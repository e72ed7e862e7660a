"""lungsam.runtime: torch-free import, bundle integrity, no silent fallback, preprocessing/postprocessing
pinned against segment-anything's torch path, DICOM reading, and the full runtime on an exported tiny bundle."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lungsam import preprocess as pp
from lungsam.artifacts import sha256_file
from lungsam.imageio import read_image
from lungsam.prompts import LearnedPrompt
from lungsam.runtime import (
    BackendUnavailableError,
    Bundle,
    BundleError,
    BundleIntegrityError,
    LungSegmenter,
    PromptRequiredError,
    resolve_backend,
)
from lungsam.runtime.backends import BackendChoice, ort_available_providers, ort_providers

from .conftest import MONTGOMERY, REPO, need

MOBILE = pp.PreprocessSpec(img_size=1024)
LITE = pp.PreprocessSpec(img_size=256, normalization="minmax", pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0))
TINY = pp.PreprocessSpec(img_size=128, embedding_size=8)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def write_manifest_bundle(root: Path, files: dict[str, bytes], **extra) -> Path:
    """A bundle folder whose manifest lists ``files`` with their true sha256/size (for integrity tests)."""
    root.mkdir(parents=True, exist_ok=True)
    listed = {}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
        listed[rel] = {"sha256": sha256_file(root / rel), "bytes": len(data)}
    manifest = {
        "format": "lungsam-bundle/1", "backbone": "tiny", "preprocess": TINY.to_dict(), "working_size": 256,
        "prompt": {"mode": "points", "points_per_lung": 1, "points": [[0.3, 0.5], [0.7, 0.5]], "labels": [1, 1],
                   "box": [0.1, 0.1, 0.9, 0.9]},
        "threshold": 0.5,
        "models": {"encoder": {"fp32": {"file": "encoder.onnx"}}, "decoder": {"fp32": {"file": "decoder.onnx"}}},
        "files": listed,
    }
    manifest.update(extra)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def stage_segmenter(spec: pp.PreprocessSpec, working_size: int = 256, threshold: float = 0.5) -> LungSegmenter:
    """A LungSegmenter with no models: only the numpy stages (preprocess/postprocess/prompts) are usable."""
    prompt = LearnedPrompt(mode="points", points=np.asarray([[0.3, 0.5]], np.float32), labels=np.ones(1, np.int32),
                           box=None, points_per_lung=1)
    b = Bundle(root=Path("<none>"), manifest={"models": {}, "files": {}}, spec=spec, working_size=working_size,
               prompt=prompt, threshold=threshold)
    return LungSegmenter(b, {}, BackendChoice("onnxruntime", "cpu", "fp32", ("auto", "cpu", "fp32")))


def real_images(n: int = 3) -> list[Path]:
    d = need(MONTGOMERY / "images")
    return sorted(d.glob("*.png"))[:n]


# ---------------------------------------------------------------------------------------------
# torch-free
# ---------------------------------------------------------------------------------------------

def test_runtime_imports_without_torch_train_or_export():
    code = ("import sys, lungsam.runtime, lungsam.runtime.predict, lungsam.runtime.commands\n"
            "bad = [m for m in ('torch', 'lungsam.train', 'lungsam.export', 'lungsam.backbones', 'scipy', 'tensorrt')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------
# bundle integrity
# ---------------------------------------------------------------------------------------------

def test_bundle_verifies_hashes_and_names_changed_or_missing_files(tmp_path):
    root = write_manifest_bundle(tmp_path / "b", {"encoder.onnx": b"enc" * 100, "decoder.onnx": b"dec" * 50})
    assert Bundle.load(root).verified
    assert Bundle.load(root / "manifest.json").verified

    (root / "decoder.onnx").write_bytes(b"dex" * 50)  # same size, different bytes
    with pytest.raises(BundleIntegrityError, match=r"decoder\.onnx: sha256 .* does not match"):
        Bundle.load(root)
    (root / "decoder.onnx").write_bytes(b"dec" * 50)
    Bundle.load(root)

    (root / "encoder.onnx").unlink()
    with pytest.raises(BundleIntegrityError, match=r"encoder\.onnx: missing"):
        Bundle.load(root)
    with pytest.raises(BundleIntegrityError, match=r"encoder\.onnx: missing"):
        LungSegmenter.load(root)


def test_bundle_refuses_unlisted_model_paths_escapes_and_non_bundles(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(tmp_path)
    root = write_manifest_bundle(tmp_path / "b", {"encoder.onnx": b"e", "decoder.onnx": b"d"})
    m = json.loads((root / "manifest.json").read_text())
    m["files"]["../outside"] = {"sha256": "0" * 64, "bytes": 1}
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleIntegrityError, match="outside the bundle"):
        Bundle.load(root)
    m["files"].pop("../outside")
    m["models"]["decoder_fixed"] = {"fp32": {"file": "decoder_fixed.onnx"}}
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleIntegrityError, match="not listed"):
        Bundle.load(root).model_path("decoder_fixed")
    m["format"] = "something-else/2"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="unsupported bundle format"):
        Bundle.load(root)


# ---------------------------------------------------------------------------------------------
# no silent fallback
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif("CUDAExecutionProvider" in ort_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_request_without_cuda_provider_is_an_error(tmp_path):
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        ort_providers("cuda")
    b = Bundle.load(write_manifest_bundle(tmp_path / "b", {"encoder.onnx": b"e", "decoder.onnx": b"d"}))
    for backend in ("auto", "onnxruntime"):
        with pytest.raises(BackendUnavailableError, match=r"lungsam\[gpu\]"):
            resolve_backend(b, backend, "cuda")
    with pytest.warns(RuntimeWarning, match="falling back to onnxruntime on cpu"):
        c = resolve_backend(b, "onnxruntime", "cuda", allow_fallback=True)
    assert (c.backend, c.device) == ("onnxruntime", "cpu") and c.fallbacks


def test_tensorrt_request_without_tensorrt_is_an_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    b = Bundle.load(write_manifest_bundle(tmp_path / "b", {"encoder.onnx": b"e", "decoder.onnx": b"d"}))
    with pytest.raises(BackendUnavailableError, match=r"tensorrt package.*lungsam\[trt\]"):
        resolve_backend(b, "tensorrt", "cuda")
    with pytest.raises(BackendUnavailableError, match="GPU only"):
        resolve_backend(b, "tensorrt", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # auto on cpu is plain onnxruntime: no fallback, no warning
        assert resolve_backend(b, "auto", "cpu").backend == "onnxruntime"


def test_missing_fp16_models_are_an_error_unless_fallback(tmp_path):
    b = Bundle.load(write_manifest_bundle(tmp_path / "b", {"encoder.onnx": b"e", "decoder.onnx": b"d"}))
    with pytest.raises(BackendUnavailableError, match="no fp16 ONNX model"):
        resolve_backend(b, "onnxruntime", "cpu", "fp16")
    with pytest.warns(RuntimeWarning, match="falling back to fp32"):
        assert resolve_backend(b, "onnxruntime", "cpu", "fp16", allow_fallback=True).precision == "fp32"


def test_int8_is_onnxruntime_on_cpu_only(tmp_path):
    files = {"encoder.onnx": b"e", "decoder.onnx": b"d"}
    b = Bundle.load(write_manifest_bundle(tmp_path / "b", files))
    with pytest.raises(BackendUnavailableError, match="no int8 ONNX model.*--int8"):
        resolve_backend(b, "onnxruntime", "cpu", "int8")
    with pytest.raises(BackendUnavailableError, match="'int8' is onnxruntime on CPU only.*not TensorRT"):
        resolve_backend(b, "tensorrt", "cuda", "int8")
    with pytest.raises(BackendUnavailableError, match="runs on a GPU only"):
        resolve_backend(b, "tensorrt", "cpu", "int8")
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailableError, match="'int8' is onnxruntime on CPU only.*--device cpu"):
            resolve_backend(b, "onnxruntime", "cuda", "int8")
        with pytest.warns(RuntimeWarning, match="CPU only.*falling back to fp32"):
            c = resolve_backend(b, "onnxruntime", "cuda", "int8", allow_fallback=True)
        assert (c.device, c.precision) == ("cuda", "fp32")
    else:  # no GPU here: the device falls back first, and int8 runs on the CPU it fell back to
        with pytest.warns(RuntimeWarning, match="falling back to onnxruntime on cpu"):
            c = resolve_backend(b, "onnxruntime", "cuda", "int8", allow_fallback=True, models=())
        assert (c.device, c.precision) == ("cpu", "int8")
    assert c.requested == ("onnxruntime", "cuda", "int8")


def test_engine_for_another_gpu_names_the_rebuild_command(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="tensorrt not installed")
    from lungsam.runtime.backends import check_engine_compatible

    entry = {"file": "encoder_fp16.engine", "gpu": "Imaginary GPU", "compute_capability": "1.0",
             "tensorrt": trt.__version__}
    with pytest.raises(BackendUnavailableError, match=r"lungsam export RUN --trt"):
        check_engine_compatible(entry, tmp_path / "encoder_fp16.engine")


# ---------------------------------------------------------------------------------------------
# preprocessing and postprocessing pinned against segment-anything (torch) on real images
# ---------------------------------------------------------------------------------------------

def _non_square(pixels: np.ndarray) -> np.ndarray:
    """A real radiograph cropped to a non-square original frame."""
    return pixels[: int(pixels.shape[0] * 0.9), : int(pixels.shape[1] * 0.7)]


@pytest.mark.integration
@pytest.mark.parametrize("spec", [MOBILE, LITE, TINY], ids=["mobile_sam", "lite_medsam", "tiny"])
def test_model_input_equals_the_training_encoder_input_and_sam_preprocess(spec):
    torch = pytest.importorskip("torch")
    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    seg = stage_segmenter(spec, working_size=256)
    for path in real_images(2):
        img = read_image(path)
        for source in (path, _non_square(img.pixels)):
            prep = seg.preprocess(source)
            working = pp.to_working(read_image(path).pixels if isinstance(source, Path) else source, 256)
            # what training feeds torch (embeddings cache): preprocess.encoder_input
            np.testing.assert_array_equal(pp.normalize_model_input(prep.model_input[None], spec)[0],
                                          pp.encoder_input(working, spec))
            assert prep.input_hw == pp.preprocess_shape(256, 256, spec.img_size)
            if spec.normalization == "mean_std":  # SAM's own torch preprocessing
                resized = ResizeLongestSide(spec.img_size).apply_image(working)
                x = torch.as_tensor(resized).permute(2, 0, 1)[None].float()
                fake = SimpleNamespace(pixel_mean=torch.tensor(spec.pixel_mean).view(-1, 1, 1),
                                       pixel_std=torch.tensor(spec.pixel_std).view(-1, 1, 1),
                                       image_encoder=SimpleNamespace(img_size=spec.img_size))
                ref = Sam.preprocess(fake, x)[0].numpy()
                got = pp.normalize_model_input(prep.model_input[None], spec)[0]
                np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


@pytest.mark.integration
@pytest.mark.parametrize("spec", [MOBILE, LITE, TINY], ids=["mobile_sam", "lite_medsam", "tiny"])
def test_postprocess_equals_sam_postprocess_masks_then_interpolate(spec):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from segment_anything.modeling import Sam

    seg = stage_segmenter(spec, working_size=256, threshold=0.4)
    rng = np.random.default_rng(0)
    lr = spec.low_res_size
    for path in real_images(2):
        for pixels in (read_image(path).pixels, _non_square(read_image(path).pixels)):
            prep = seg.preprocess(pixels)
            # realistic logits: a smooth field from the (downsized) image itself plus noise, range about +-12
            small = np.asarray(Image.fromarray(pp.to_working(pixels, 256)[..., 0]).resize((lr, lr)), np.float32)
            low = ((small - small.mean()) / (small.std() + 1e-6) * 6 + rng.normal(0, 1, (lr, lr))).astype(np.float32)
            got = seg.postprocess_logits(low[None, None], prep)
            fake = SimpleNamespace(image_encoder=SimpleNamespace(img_size=spec.img_size))

            def sam_path(x):  # SAM's postprocess to the working frame, then bilinear to the original size
                t = Sam.postprocess_masks(fake, x[None, None], prep.input_hw, (256, 256))
                return F.interpolate(t, prep.original_hw, mode="bilinear", align_corners=False)[0, 0].numpy()

            assert got.shape == prep.original_hw == pixels.shape[:2]
            # in float64 torch's interpolation weights are exact; the runtime (float32) must agree to 1e-5
            ref = sam_path(torch.from_numpy(low).double())
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
            # torch float32 computes source positions in float32 (errors ~ index * 6e-8 for non power-of-two
            # scales); it agrees to that precision
            np.testing.assert_allclose(got, sam_path(torch.from_numpy(low)), atol=5e-4, rtol=0)
            mask, prob = seg.postprocess(low, prep)
            assert prob.dtype == np.float32 and mask.dtype == bool
            np.testing.assert_allclose(prob, 1 / (1 + np.exp(-ref.astype(np.float64))), atol=1e-5)
            np.testing.assert_array_equal(mask, prob > 0.4)


def test_interactive_prompts_map_original_to_working_to_model_frame():
    seg = stage_segmenter(MOBILE, working_size=256)
    h0, w0 = 2000, 1000  # original frame, stretched to 256 x 256
    coords, labels = seg.model_prompts((h0, w0), points=[[500, 1000], [250, 1500]], labels=[1, 0])
    # original -> working: x * 256/1000, y * 256/2000; working -> model: * 1024/256
    np.testing.assert_allclose(coords[:2], [[512, 512], [256, 768]], atol=1e-4)
    np.testing.assert_array_equal(labels, [1, 0, -1])  # SAM's padding point when there is no box
    coords, labels = seg.model_prompts((h0, w0), box=[100, 200, 900, 1800])
    np.testing.assert_allclose(coords, [[102.4, 102.4], [921.6, 921.6]], atol=1e-3)
    np.testing.assert_array_equal(labels, [2, 3])
    assert seg.model_prompts((h0, w0)) is None  # learned prompt
    with pytest.raises(ValueError, match="x0 <= x1"):
        seg.model_prompts((h0, w0), box=[900, 200, 100, 1800])
    with pytest.raises(ValueError, match="labels"):
        seg.model_prompts((h0, w0), points=[[1, 2]], labels=[5])


def test_box_prompt_mode_requires_a_box():
    seg = stage_segmenter(TINY)
    seg.prompt = LearnedPrompt(mode="box", points=None, labels=None, box=None, points_per_lung=1)
    with pytest.raises(PromptRequiredError, match="needs a lung bounding box"):
        seg.model_prompts((100, 100))
    with pytest.raises(PromptRequiredError, match="box="):
        seg.decode(np.zeros((1, 32, 8, 8), np.float32))


def test_auto_both_bundle_needs_no_box_and_combines_a_given_box_with_its_points():
    from lungsam.prompts import labelled_points, learn_prompt, model_prompt

    seg = stage_segmenter(MOBILE, working_size=256)
    masks = [np.zeros((256, 256), bool) for _ in range(3)]
    for m in masks:
        m[40:200, 30:110] = m[40:200, 150:230] = True
    seg.prompt = learn_prompt(masks, "auto-both", 2)
    assert not seg.needs_box and not seg.prompt.needs_ground_truth
    coords, labels, box = model_prompt(seg.prompt, seg.spec, (256, 256))
    assert coords.shape == (4, 2) and box is not None  # 2 points per lung + the mean-mask box
    c, lab = labelled_points(coords, labels, box)
    np.testing.assert_array_equal(lab, [1, 1, 1, 1, 2, 3])
    assert seg.model_prompts((512, 512)) is None  # the learned prompt, points + box
    # a caller's box replaces the learned box and keeps the learned points (original 512 -> working 256 -> 1024)
    c2, lab2 = seg.model_prompts((512, 512), box=[20, 40, 480, 400])
    np.testing.assert_array_equal(lab2, lab)
    np.testing.assert_allclose(c2[:4], coords, atol=1e-5)
    np.testing.assert_allclose(c2[4:], [[40, 80], [960, 800]], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# DICOM reading (MONOCHROME1, 16-bit, rescale, spacing)
# ---------------------------------------------------------------------------------------------

def write_dicom(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2", spacing=None, slope=1.0,
                intercept=0.0, window=None) -> Path:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.integration
def test_dicom_monochrome1_16bit_is_inverted_and_spacing_read(tmp_path):
    gray = np.asarray(Image.open(real_images(1)[0]).convert("L"))
    stored = (4095 - gray.astype(np.uint16) * 16).astype(np.uint16)  # MONOCHROME1: dense (bright) = low values
    p1 = write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1", spacing=(0.175, 0.2), slope=2.0, intercept=-100.0)
    img = read_image(p1)
    assert img.pixel_spacing_mm == (0.175, 0.2) and img.meta["photometric"] == "MONOCHROME1"
    rgb = pp.to_rgb_uint8(img.pixels)[..., 0].astype(int)
    ref = pp.to_rgb_uint8(gray.astype(np.float32))[..., 0].astype(int)  # same min-max scaling of the source
    assert np.abs(rgb - ref).max() <= 1  # inversion and rescale undo the encoding: bright lungs stay dark
    assert np.corrcoef(rgb.ravel(), gray.ravel())[0, 1] > 0.999

    p2 = write_dicom(tmp_path / "m2", (gray.astype(np.uint16) * 16), "MONOCHROME2")  # no suffix: DICM magic
    img2 = read_image(p2)
    assert img2.pixel_spacing_mm is None
    assert np.abs(pp.to_rgb_uint8(img2.pixels)[..., 0].astype(int) - ref).max() <= 1

    seg = stage_segmenter(TINY)
    assert seg.preprocess(p1).pixel_spacing_mm == (0.175, 0.2)
    assert seg.preprocess(p2).pixel_spacing_mm is None


def test_dicom_window_is_applied_before_monochrome1_inversion(tmp_path):
    stored = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (8, 1))  # 0..4080 ramp
    img = read_image(write_dicom(tmp_path / "w.dcm", stored, "MONOCHROME1", window=(2048, 1024)))
    row = img.pixels[0]
    below, above = stored[0] < 1536, stored[0] > 2560
    # outside the window everything saturates; MONOCHROME1 then puts low stored values at the bright end
    assert np.ptp(row[below]) == 0 and np.ptp(row[above]) == 0
    assert row[below][0] > row[above][0]
    inside = ~below & ~above
    assert np.all(np.diff(row[inside]) <= 0) and np.ptp(row[inside]) > 0


def test_truncated_dicom_is_a_clear_read_error(tmp_path):
    from lungsam.imageio import ImageReadError

    gray = np.full((64, 64), 100, np.uint16)
    p = write_dicom(tmp_path / "t.dcm", gray)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 4000])
    with pytest.raises(ImageReadError, match="t.dcm: cannot read DICOM"):
        read_image(p)


def test_engine_records_as_written_by_lungsam_export(tmp_path):
    """``manifest["engines"] = {name: {file, gpu, compute_capability, tensorrt, precision}}`` (lungsam.export.trt)."""
    rec = {"file": "encoder.engine", "gpu": "NVIDIA H100", "compute_capability": "9.0", "tensorrt": "10.9.0",
           "precision": "fp16"}
    root = write_manifest_bundle(tmp_path / "b", {"encoder.onnx": b"e", "decoder.onnx": b"d", "encoder.engine": b"x"},
                                 engines={"encoder": rec})
    b = Bundle.load(root)
    assert b.engine_entry("encoder", "fp16") == rec
    assert b.engine_entry("encoder", "fp32") is None and b.engine_entry("decoder", "fp16") is None
    assert b.engine_path(rec) == root / "encoder.engine"
