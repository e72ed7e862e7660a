"""ONNX export of the bundle's graphs (FP32 via torch.onnx, FP16 via onnxconverter-common, INT8 via
onnxruntime's dynamic quantisation).

Models whose initializers exceed :data:`EXTERNAL_DATA_BYTES` (SAM ViT-L/H encoders pass ONNX's 2 GB
protobuf limit) are saved with their weights in one external file ``<name>.onnx.data`` beside them.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from segment_anything.modeling import Sam

from ..preprocess import PreprocessSpec
from .graphs import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    FIXED_DECODER_INPUTS,
    DecoderGraph,
    EncoderGraph,
    FixedPromptDecoderGraph,
)

DEFAULT_OPSET = 17
EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GiB hard limit, with room for the graph itself

# Ops kept in FP32 in FP16 models: their intermediate values overflow or lose too much in FP16
# (variance sums, exponentials, square roots, large sin/cos arguments of the positional encoding).
FP16_KEEP_FP32_OPS = (
    "LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
    "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "Pow", "Sqrt", "Erf", "Exp", "Log", "Sin", "Cos", "Clip",
)


def _export(module: torch.nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes: dict,
            opset: int, external_data_bytes: int) -> list[Path]:
    """Trace ``module`` with the TorchScript exporter into a scratch folder, then save it at ``path``
    (external data when large). Returns the files written."""
    with tempfile.TemporaryDirectory(prefix=".lungsam-onnx-", dir=path.parent) as scratch:  # inside the export temp
        raw = Path(scratch) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
            torch.onnx.export(module.eval(), args, str(raw), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        model = onnx.load(str(raw))  # pulls in any external tensors the exporter wrote
    return save_model(model, path, external_data_bytes)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (the part of a model that can be moved to external data)."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: str | Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """Save and check ``model``; weights go to ``<path>.data`` when they exceed ``external_data_bytes``.

    Returns:
        the files written (``path`` and, if used, its data file).
    """
    path = Path(path)
    files = [path]
    if initializer_bytes(model) > external_data_bytes:
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        files.append(data)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))  # the path form handles external data and > 2 GB models
    return files


def export_encoder(sam: Sam, spec: PreprocessSpec, path: str | Path, opset: int = DEFAULT_OPSET,
                   external_data_bytes: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """Write the encoder graph (:class:`~lungsam.export.graphs.EncoderGraph`).

    I/O: ``image (B, 3, img, img)`` float32 raw 0..255 padded -> ``embeddings (B, C, E, E)`` float32; B dynamic.
    """
    example = torch.full((1, 3, spec.img_size, spec.img_size), 128.0)
    example[:, :, : spec.img_size // 2] = 30.0  # not constant, so minmax normalisation is well defined
    axes = {"image": {0: "batch"}, "embeddings": {0: "batch"}}
    return _export(EncoderGraph(sam, spec), (example,), Path(path), ENCODER_INPUTS, ENCODER_OUTPUTS, axes, opset,
                   external_data_bytes)


def _example_embeddings(sam: Sam) -> torch.Tensor:
    c = sam.prompt_encoder.embed_dim
    e = sam.prompt_encoder.image_embedding_size[0]
    return torch.randn(1, c, e, e, generator=torch.Generator().manual_seed(0))


def export_decoder(sam: Sam, path: str | Path, opset: int = DEFAULT_OPSET) -> list[Path]:
    """Write the decoder graph (:class:`~lungsam.export.graphs.DecoderGraph`).

    I/O: ``embeddings (B, C, E, E)``, ``point_coords (B, N, 2)``, ``point_labels (B, N)`` float32 ->
    ``low_res_logits (B, 1, 4E, 4E)``, ``iou_predictions (B, 1)`` float32; B and N dynamic.
    """
    size = float(sam.prompt_encoder.input_image_size[0])
    coords = torch.tensor([[[0.3, 0.4], [0.6, 0.5], [0.2, 0.2], [0.8, 0.9]]]) * size
    labels = torch.tensor([[1.0, 0.0, 2.0, 3.0]])
    axes = {"embeddings": {0: "batch"}, "point_coords": {0: "batch", 1: "num_points"},
            "point_labels": {0: "batch", 1: "num_points"}, "low_res_logits": {0: "batch"},
            "iou_predictions": {0: "batch"}}
    return _export(DecoderGraph(sam), (_example_embeddings(sam), coords, labels), Path(path), DECODER_INPUTS,
                   DECODER_OUTPUTS, axes, opset, EXTERNAL_DATA_BYTES)


def export_fixed_decoder(sam: Sam, coords: np.ndarray, labels: np.ndarray, path: str | Path,
                         opset: int = DEFAULT_OPSET) -> list[Path]:
    """Write the decoder with a constant prompt (:class:`~lungsam.export.graphs.FixedPromptDecoderGraph`).

    Args:
        coords: ``(N, 2)`` float32 model-frame points; labels: ``(N,)`` float32 (``labelled_points`` convention).
    I/O: ``embeddings (B, C, E, E)`` -> ``low_res_logits (B, 1, 4E, 4E)``, ``iou_predictions (B, 1)``; B dynamic.
    """
    axes = {"embeddings": {0: "batch"}, "low_res_logits": {0: "batch"}, "iou_predictions": {0: "batch"}}
    return _export(FixedPromptDecoderGraph(sam, coords, labels), (_example_embeddings(sam),), Path(path),
                   FIXED_DECODER_INPUTS, DECODER_OUTPUTS, axes, opset, EXTERNAL_DATA_BYTES)


def convert_fp16(src: str | Path, dst: str | Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """FP32 ONNX -> FP16 ONNX with onnxconverter-common, float32 inputs/outputs kept (``keep_io_types``)
    and :data:`FP16_KEEP_FP32_OPS` left in FP32. Returns the files written."""
    from onnxconverter_common import float16

    # the scratch folder lies inside the export's temporary folder
    with tempfile.TemporaryDirectory(prefix=".lungsam-fp16-", dir=Path(dst).parent) as scratch:
        inferred = Path(scratch) / "inferred.onnx"
        # path-based shape inference works for models over 2 GB, where the in-memory one fails
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = _inline_identity_initializers(onnx.load(str(inferred)))
        op_block = set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32_OPS)
        node_block = _close_over_shared_initializers(
            model, op_block, set(_cast_to_float_nodes(model)) | set(_positional_encoding_nodes(model)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "values clipped to the FP16 range" notes
            half = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                                    op_block_list=sorted(op_block), node_block_list=node_block)
    return save_model(half, dst, external_data_bytes)


# INT8 (``--int8``): onnxruntime's dynamic quantisation of the MatMuls that multiply by a weight (the
# transformer's linear layers, ~40 % of a MobileSAM encoder's CPU time). Weights are stored as uint8 and
# activations quantised per call, so no calibration data is needed. uint8 weights rather than int8: on x86
# CPUs without VNNI (AVX2 only, like CI's) the U8S8 kernel's VPMADDUBSW can saturate; U8U8 cannot.
# Convolutions stay FP32 (quantising them measured slower and cut agreement with FP32 to ~0.89 F1).
INT8_OP_TYPES = ("MatMul",)
INT8_EXTRA_OPTIONS = {"MatMulConstBOnly": True}  # only MatMuls by a weight (not activation x activation)


def int8_record() -> dict:
    """What ``quantize_int8`` does, for the bundle manifest (so an INT8 model explains itself)."""
    return {"method": "dynamic", "function": "onnxruntime.quantization.quantize_dynamic",
            "op_types": list(INT8_OP_TYPES),
            "weight_type": "uint8", "activations": "uint8, quantised per call (DynamicQuantizeLinear)",
            "per_channel": False, "extra_options": dict(INT8_EXTRA_OPTIONS), "quantised_models": ["encoder"],
            "runs_on": "onnxruntime CPUExecutionProvider only"}


def quantize_int8(src: str | Path, dst: str | Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """FP32 ONNX -> dynamically quantised INT8 ONNX (:data:`INT8_OP_TYPES`, uint8 weights, float32 I/O).

    The graph runs on onnxruntime's CPU provider (``DynamicQuantizeLinear`` + ``MatMulInteger``); it is
    meant for CPUs, where it trades a little agreement with FP32 for encoder time (the export's parity
    gate measures both). Returns the files written.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the scratch folder lies inside the export's temporary folder
    with tempfile.TemporaryDirectory(prefix=".lungsam-int8-", dir=Path(dst).parent) as scratch:
        out = Path(scratch) / "int8.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # "consider pre-processing" advice printed on every call
        try:
            quantize_dynamic(Path(src), out, op_types_to_quantize=list(INT8_OP_TYPES),
                             weight_type=QuantType.QUInt8, extra_options=dict(INT8_EXTRA_OPTIONS),
                             use_external_data_format=_has_external_data(src))
        finally:
            root.setLevel(level)
        return save_model(onnx.load(str(out)), dst, external_data_bytes)


def _has_external_data(path: str | Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def _inline_identity_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``Identity(initializer)`` nodes (the TorchScript exporter's way of sharing a weight) by a
    copy of the initializer under the node's output name.

    The FP16 converter would otherwise retype the shared weight but not the Identity's output when the
    consumer is an op kept in FP32, leaving a graph onnxruntime rejects.
    """
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _cast_to_float_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the graph's ``Cast(to=float)`` nodes (unnamed nodes get a name).

    onnxconverter-common 1.16 retypes their outputs to FP16 without changing ``to``; blocking them by
    name keeps them FP32 and makes the converter cast their outputs to FP16. (Blocking the op type
    ``Cast`` instead makes the converter loop forever over the casts it adds.)
    """
    names = []
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute):
            if not node.name:
                node.name = f"lungsam_cast_to_float_{i}"
            names.append(node.name)
    return names


def _positional_encoding_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes of the prompt encoder's random-Fourier positional encoding (kept FP32: its sin/cos
    arguments reach tens of radians, where FP16 rounding moves them visibly)."""
    return [n.name for n in model.graph.node
            if "pe_layer" in n.name or any("positional_encoding_gaussian_matrix" in i for i in n.input)]


def _close_over_shared_initializers(model: onnx.ModelProto, op_block: set[str], node_block: set[str]) -> list[str]:
    """Extend ``node_block`` so an initializer feeding a blocked node feeds only blocked nodes.

    onnxconverter-common keeps an initializer FP32 when a blocked node uses it but still retypes its
    other consumers to FP16, which leaves mixed-type MatMuls; blocking those consumers too avoids it.
    """
    inits = {t.name for t in model.graph.initializer}
    blocked = lambda n: n.op_type in op_block or n.name in node_block  # noqa: E731
    changed = True
    while changed:
        changed = False
        fp32_inits = {i for n in model.graph.node if blocked(n) for i in n.input if i in inits}
        for n in model.graph.node:
            if not blocked(n) and any(i in fp32_inits for i in n.input):
                if not n.name:
                    n.name = f"lungsam_node_{id(n)}"
                node_block.add(n.name)
                changed = True
    return sorted(node_block)


def io_signature(path: str | Path) -> dict[str, list[dict]]:
    """``{"inputs": [...], "outputs": [...]}`` of an ONNX file, each ``{name, shape, dtype}``; dynamic
    dimensions are their names (``"batch"``, ``"num_points"``)."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            out.append({"name": v.name, "shape": shape, "dtype": dtype})
        return out

    init = {i.name for i in model.graph.initializer}
    return {"inputs": describe(v for v in model.graph.input if v.name not in init),
            "outputs": describe(model.graph.output)}
