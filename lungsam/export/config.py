"""What an export is asked for (:class:`ExportOptions`), defined once: ``lungsam export``'s options are generated
from these fields (:func:`lungsam.options.options_from`: default, help, range and choices live on the field) and
:func:`lungsam.export.bundle.export_bundle` takes the dataclass. Torch-free (the command's module imports it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..options import option
from ..ranges import RANGES, check_choice, check_fields

#: ``--int8-method``: how the INT8 encoders are made (:mod:`lungsam.export.quantize`).
INT8_METHODS = ("static", "dynamic")
#: The options that only mean something with ``int8`` (the command refuses them without ``--int8``).
INT8_ONLY = ("int8_method", "calibration_images", "max_int8_f1_drop", "openvino_int8")


@dataclass(frozen=True)
class ExportOptions:
    """The models, precisions and gates of one export (each field is a ``lungsam export`` option).

    Attributes:
        fp16: also write FP16 ONNX models. int8: also write INT8 encoders for CPUs, gated on parity and on F1.
        int8_method: ``static`` (calibrated) or ``dynamic``. calibration_images: static INT8's training images.
        openvino_int8: static INT8 also through NNCF for OpenVINO (when openvino/nncf are installed).
        max_int8_f1_drop: the INT8 gate: largest allowed drop of mean F1 (ground truth) below torch FP32.
        max_jitter_log_odds_shift: the gate at the quality flag's prompt variants (``export.parity.failing``).
        trt: also build TensorRT FP16 engines (implies FP16 models: :attr:`writes_fp16`).
        opset: ONNX opset. min_agreement: the parity gate (every model's mean mask F1 against torch).
        max_batch: largest batch of the TensorRT profiles. box_from_first_pass: the bundle's default inference
            takes each image's box from the model's first mask. provenance: record local paths and host.
        in_graph: also write the in-graph preprocessing models (``--in-graph-preprocess``).
    """

    fp16: bool = field(default=False, metadata=option(
        "Also write FP16 ONNX models (*_fp16.onnx; float32 inputs/outputs)."))
    int8: bool = field(default=False, metadata=option(
        "Also write an INT8 encoder for CPUs (the decoders stay FP32), gated on parity and on F1 "
        "(--max-int8-f1-drop); --int8-method says how."))
    int8_method: str = field(default="static", metadata=option(
        "--int8: static (calibrated on the fold's training images: encoder_int8.onnx as onnxruntime QDQ with the "
        "weight MatMuls/Gemms in int8, and encoder_int8_ov.xml through NNCF for OpenVINO) or dynamic (onnxruntime's "
        "dynamic quantisation of the weight MatMuls, encoder_int8.onnx only; the fallback where static fails the "
        "gate). docs/cpu_inference.md.", choices=INT8_METHODS))
    calibration_images: int = field(default=32, metadata=option(
        "--int8 static: training-split images used to calibrate the activation ranges.", range="calibration_images"))
    openvino_int8: bool = field(default=True, metadata=option(
        "--int8 static with openvino/nncf installed: also write the NNCF INT8 encoder for OpenVINO "
        "(encoder_int8_ov.xml), gated like every INT8 model; --no-openvino-int8 keeps onnxruntime's INT8 encoder "
        "only (where the NNCF model fails the gate and onnxruntime's passes).",
        flag="--openvino-int8/--no-openvino-int8"))
    max_int8_f1_drop: float = field(default=0.002, metadata=option(
        "INT8 gate: largest allowed drop of mean F1 against ground truth below torch FP32.",
        range="max_int8_f1_drop"))
    trt: bool = field(default=False, metadata=option(
        "Also build TensorRT FP16 engines (implies --fp16; needs an NVIDIA GPU and pip install 'lungsam[trt]')."))
    opset: int = field(default=17, metadata=option("ONNX opset.", range="opset"))
    min_agreement: float = field(default=0.99, metadata=option(
        "Parity gate, in [0, 1]: every exported model's mean mask agreement (F1 vs torch) must reach this.",
        range="min_agreement"))
    max_jitter_log_odds_shift: float = field(default=1.0, metadata=option(
        "Parity gate, runs whose quality flag has a prompt-jitter term: the largest move of the flag's log-odds "
        "that an exported decoder's jitter IoU may cause against torch's on one parity image (docs/quality.md).",
        range="max_jitter_log_odds_shift"))
    max_batch: int = field(default=8, metadata=option(
        "Largest batch of the TensorRT optimisation profiles.", range="max_batch"))
    box_from_first_pass: bool = field(default=False, metadata=option(
        "Runs trained with a box prompt (box, both, auto-box, auto-both): make the bundle take each image's box "
        "from the model's own first mask by default (no annotation needed), and measure that path on the parity "
        "images."))
    provenance: bool = field(default=False, metadata=option(
        "Also record local provenance in the manifest: the run folder, data folders, checkpoint path, host name "
        "and the parity image ids (left out by default: a bundle leaves the building). lungsam bench finds the "
        "run through it."))
    in_graph: bool = field(default=False, metadata=option(
        "Also write encoder_raw.onnx / decoder_mask.onnx: the decoded uint8 image in (resize and normalisation in "
        "the graph), the thresholded mask at the image's size out, gated against the host path (lungsam predict "
        "--preprocess graph; docs/in_graph_preprocessing.md).", flag="--in-graph-preprocess"))

    def __post_init__(self) -> None:
        check_fields(self, [f.name for f in fields(self) if f.name in RANGES])  # every ranged field
        check_choice("int8_method", self.int8_method, INT8_METHODS, type(self).__name__)

    @property
    def writes_fp16(self) -> bool:
        """FP16 models are written: asked for, or needed by the TensorRT engines."""
        return self.fp16 or self.trt

    def to_dict(self) -> dict:
        """JSON-ready ``{field: value}``."""
        return asdict(self)
