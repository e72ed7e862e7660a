"""Static INT8 encoders calibrated on the run's training images (``lungsam export --int8``, the default method).

Two quantised encoders from the same FP32 ONNX and the same calibration images, one per CPU backend:

* onnxruntime: :func:`onnxruntime.quantization.quantize_static`, QDQ format, weights int8 per output channel
  (symmetric), activations uint8 per tensor (asymmetric, MinMax ranges over the calibration images). Only
  :data:`STATIC_OP_TYPES` are quantised, and MatMuls only where one side is a weight, so LayerNorm, softmax,
  GELU, the residual adds and the attention's activation x activation MatMuls stay FP32. **Convolutions stay FP32**
  too: quantising them (uint8 per-tensor activations) broke LiteMedSAM's TinyViT (embedding relative error 0.94,
  mask agreement 0.64 on LiteMedSAM@192; 0.785 with only the depthwise convs kept FP32), MatMul + Gemm alone:
  embedding error 0.10, low-res mask agreement 0.998 (docs/cpu_inference.md).
* OpenVINO: :func:`nncf.quantize` on the ONNX model read by OpenVINO, ``model_type=TRANSFORMER`` (NNCF keeps
  LayerNorm, softmax and the residual adds in float for transformers), ``preset=MIXED`` (symmetric weights,
  asymmetric activations), fast bias correction; saved as OpenVINO IR (``encoder_int8_ov.xml`` + ``.bin``).

The decoders stay FP32 (``bundle.INT8_FP32_MODELS``). Calibration inputs are the raw model inputs of the
fold's training images (``preprocess.model_input`` of the working frame: what the runtime feeds the encoder),
never the held-out images the parity gate scores.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from ..errors import LungsamError

STATIC_OP_TYPES = ("MatMul", "Gemm")
STATIC_EXTRA_OPTIONS = {"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False}
OPENVINO_INT8_SUFFIX = "_ov"  # encoder_int8_ov.xml / .bin


class QuantizationError(LungsamError, RuntimeError):
    pass


def calibration_inputs(run_model, n: int) -> tuple[list[np.ndarray], dict]:
    """Raw encoder inputs ``(1, 3, img, img)`` float32 of the first ``n`` training-split images of the run's fold.

    Returns ``(inputs, record)``; the record names the split, count and ids (for the manifest).
    """
    from ..data import load_dataset, pool
    from ..preprocess import model_input

    if n < 1:
        raise QuantizationError(f"--calibration-images must be >= 1, got {n}")
    train_ids = list(run_model.split.get("train", []))
    dirs = list(run_model.run["config"]["data"])
    by_id = pool([load_dataset(d, run_model.working_size) for d in dirs]).by_id()
    ids = [i for i in train_ids if i in by_id][:n]
    if not ids:
        raise QuantizationError(f"none of the fold's {len(train_ids)} training images was found in {', '.join(dirs)}; "
                                "static INT8 needs them for calibration (or use --int8-method dynamic)")
    inputs = [model_input(by_id[i].image, run_model.spec)[0][None].astype(np.float32) for i in ids]
    return inputs, {"split": "train", "n": len(ids), "requested": n, "data": dirs, "ids": ids,
                    "input": "preprocess.model_input of the working-frame image (raw 0..255, padded)"}


class _Reader:
    """onnxruntime ``CalibrationDataReader`` over a list of encoder inputs."""

    def __init__(self, inputs: list[np.ndarray]):
        self._it = iter(inputs)

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {"image": x}

    def rewind(self):  # pragma: no cover - not used by MinMax
        pass


def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime's "consider pre-processing" and NNCF's progress notes
    return root, level


def quantize_static_onnx(src: str | Path, dst: str | Path, inputs: list[np.ndarray]) -> list[Path]:
    """FP32 encoder ONNX -> static QDQ INT8 ONNX calibrated on ``inputs`` (see the module docstring).

    I/O unchanged: ``image (B, 3, img, img)`` float32 -> ``embeddings (B, C, E, E)`` float32.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from .onnx_export import _has_external_data, save_model

    with tempfile.TemporaryDirectory(prefix="lungsam-int8s-") as scratch:
        out = Path(scratch) / "int8.onnx"
        root, level = _quiet_root_logger()
        try:
            quantize_static(Path(src), out, _Reader(inputs), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(STATIC_OP_TYPES), per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, extra_options=dict(STATIC_EXTRA_OPTIONS),
                            use_external_data_format=_has_external_data(src))
        finally:
            root.setLevel(level)
        return save_model(onnx.load(str(out)), dst)


def quantize_openvino(src: str | Path, dst_xml: str | Path, inputs: list[np.ndarray]) -> list[Path]:
    """FP32 encoder ONNX -> NNCF INT8 OpenVINO IR (``dst_xml`` and its ``.bin``), calibrated on ``inputs``."""
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise QuantizationError("static INT8 for OpenVINO needs nncf and openvino: pip install 'lungsam[int8]' "
                                "(or export with --int8-method dynamic, onnxruntime only)") from e
    dst_xml = Path(dst_xml)
    root, level = _quiet_root_logger()
    try:
        model = ov.Core().read_model(str(src))
        q = nncf.quantize(model, nncf.Dataset(inputs), preset=nncf.QuantizationPreset.MIXED,
                          model_type=nncf.ModelType.TRANSFORMER, subset_size=len(inputs), fast_bias_correction=True)
    finally:
        root.setLevel(level)
    ov.save_model(q, str(dst_xml), compress_to_fp16=False)
    return [dst_xml, dst_xml.with_suffix(".bin")]


def static_record(calibration: dict, openvino: bool) -> dict:
    """The manifest's ``quantization.int8`` record for the static method."""
    from ..artifacts import package_versions

    v = package_versions(("onnxruntime", "nncf", "openvino"))
    rec = {"method": "static", "quantised_models": ["encoder"], "calibration": calibration,
           "onnxruntime": {"function": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                           "op_types": list(STATIC_OP_TYPES), "extra_options": dict(STATIC_EXTRA_OPTIONS),
                           "weight_type": "int8", "per_channel": True,
                           "activations": "uint8 per tensor, MinMax ranges over the calibration images",
                           "float_kept": "LayerNorm, Softmax, GELU, residual Add, activation x activation MatMul, "
                                         "Conv"},
           "runs_on": "CPU: onnxruntime CPUExecutionProvider (QDQ model), OpenVINO CPU plugin (NNCF model)"}
    if openvino:
        rec["openvino"] = {"function": "nncf.quantize", "preset": "mixed", "model_type": "transformer",
                           "fast_bias_correction": True, "subset_size": calibration["n"], "nncf": v.get("nncf"),
                           "openvino": v.get("openvino")}
    return rec


def openvino_available() -> bool:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True

