"""In-graph pre- and postprocessing (``lungsam export --in-graph-preprocess``): ONNX models that take the decoded
image and return the thresholded mask, so a backend needs no host numpy between file and mask.

* ``encoder_raw`` (:func:`export_raw_encoder`): ``image_u8 (1, H, W, C)`` uint8 at the image's own size (C = 1
  grey or 3 RGB; dynamic H, W, C) -> ``embeddings (1, C', E, E)`` float32. In the graph, as
  :mod:`lungsam.preprocess` does it on the host: the working-frame stretch to ``S x S``
  (:func:`~lungsam.preprocess.to_working`), SAM's ResizeLongestSide to ``img x img`` (the working frame is square,
  so the model frame needs no padding), a grey plane repeated to three channels, then the encoder with its
  in-graph normalisation (:class:`lungsam.export.graphs.EncoderGraph`).
  Each resize is Pillow's ``BILINEAR`` as Pillow computes it for 8-bit images: two separable ONNX ``Resize``
  passes (opset 18; width first, then height), each ``mode=linear``, ``coordinate_transformation_mode=half_pixel``,
  ``antialias=1`` (the triangle filter widened by the downscale factor), ``exclude_outside=1`` (the window clipped
  at the borders and renormalised), followed by ``Floor(x + 0.5)`` clipped to 0..255 (Pillow rounds to uint8, half
  up, after each pass). Measured (:func:`resize_difference`) on the Montgomery 512 x 512 images: bit-identical
  for 512 -> 256 -> 256 and 512 -> 256 -> 1024; 256 -> 192 leaves 0.05 % of the values 1 grey level apart
  (Pillow's fixed-point filter weights); odd sizes and RGB at most 1 grey level.
* ``decoder_mask`` (:func:`export_mask_decoder`): ``decoder_fixed`` (the learned prompt baked in) followed by
  the runtime's postprocessing: ``embeddings (B, C', E, E)`` float32 and ``original_hw (2,)`` int64 ->
  ``mask (B, 1, H0, W0)`` uint8 (1 = lung: ``sigmoid(logits) > threshold``), ``probability (B, 1, H0, W0)``
  float32, ``iou_predictions (B, 1)`` float32, ``working_probability (B, 1, S, S)`` float32 (what the quality
  flag reads). Low-res -> working frame is SAM's postprocess as two constant matrices
  (:func:`lungsam.preprocess.postprocess_matrices`, the same float32 operands the host uses); working ->
  original is ``Resize`` linear half_pixel without antialias (= :func:`lungsam.preprocess.bilinear_matrix`).

The mask clean-up (:mod:`lungsam.postprocess`: connected components, hole filling) has no ONNX form and stays on
the host (it is off unless validation chose it); so does :func:`lungsam.preprocess.to_uint8` for images that are
not 8-bit (16-bit DICOM: the min-max scaling; a no-op for 8-bit PNG/JPEG).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..preprocess import PreprocessSpec, postprocess_matrices, preprocess_shape

RAW_ENCODER_INPUTS = ("image_u8",)
MASK_DECODER_INPUTS = ("embeddings", "original_hw")
MASK_DECODER_OUTPUTS = ("mask", "probability", "iou_predictions", "working_probability")
MIN_RESIZE_OPSET = 18  # Resize's antialias attribute


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _round_clip(x: str, out: str, prefix: str) -> list[onnx.NodeProto]:
    """``out = clip(floor(x + 0.5), 0, 255)``: Pillow's rounding of a resampled value to uint8 (half up)."""
    return [_const(f"{prefix}_half", np.array(0.5, np.float32)),
            helper.make_node("Add", [x, f"{prefix}_half"], [f"{prefix}_shifted"]),
            helper.make_node("Floor", [f"{prefix}_shifted"], [f"{prefix}_rounded"]),
            _const(f"{prefix}_lo", np.array(0.0, np.float32)),
            _const(f"{prefix}_hi", np.array(255.0, np.float32)),
            helper.make_node("Clip", [f"{prefix}_rounded", f"{prefix}_lo", f"{prefix}_hi"], [out])]


def _resize_axis(x: str, out: str, axis: int, size: int, prefix: str) -> list[onnx.NodeProto]:
    """One separable pass of Pillow's BILINEAR resample along ``axis`` (triangle filter, widened by the
    downscale factor, window clipped at the borders and renormalised = ``exclude_outside``), rounded to uint8."""
    return [_const(f"{prefix}_size", np.array([size], np.int64)),
            helper.make_node("Resize", [x, "", "", f"{prefix}_size"], [f"{prefix}_resampled"], mode="linear",
                             coordinate_transformation_mode="half_pixel", antialias=1, exclude_outside=1,
                             axes=[axis]),
            *_round_clip(f"{prefix}_resampled", out, prefix)]


def _pillow_resize(x: str, out: str, size: int, prefix: str) -> list[onnx.NodeProto]:
    """``x (1, C, h, w)`` float32 uint8 values -> ``out (1, C, size, size)``: Pillow's BILINEAR resize, which
    resamples the width first, rounds to uint8, then the height (``ImagingResample``), as float32."""
    return [*_resize_axis(x, f"{prefix}_cols", 3, size, f"{prefix}_w"),
            *_resize_axis(f"{prefix}_cols", out, 2, size, f"{prefix}_h")]


def preprocess_graph(spec: PreprocessSpec, working_size: int, opset: int) -> onnx.ModelProto:
    """``image_u8 (1, H, W, C)`` uint8 -> ``image (1, 3, img, img)`` float32 raw 0..255 model input (what
    :func:`lungsam.preprocess.model_input` gives for the working image; no padding: the working frame is square).
    """
    if opset < MIN_RESIZE_OPSET:
        raise ValueError(f"in-graph preprocessing needs opset >= {MIN_RESIZE_OPSET} (Resize antialias), got {opset}")
    s, img = working_size, spec.img_size
    hw = preprocess_shape(s, s, img)
    nodes = [helper.make_node("Cast", ["image_u8"], ["pixels_f"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["pixels_f"], ["pixels_nchw"], perm=[0, 3, 1, 2]),
             *_pillow_resize("pixels_nchw", "working", s, "to_working")]
    last = "working"
    if hw != (s, s):
        nodes += _pillow_resize("working", "model_plane", hw[0], "longest_side")
        last = "model_plane"
    nodes += [_const("rgb_shape", np.array([1, 3, 1, 1], np.int64)),
              helper.make_node("Expand", [last, "rgb_shape"], ["image"])]
    graph = helper.make_graph(
        nodes, "lungsam_preprocess",
        [helper.make_tensor_value_info("image_u8", TensorProto.UINT8, [1, "height", "width", "channels"])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, img, img])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def postprocess_graph(spec: PreprocessSpec, working_size: int, threshold: float, opset: int) -> onnx.ModelProto:
    """``low_res_logits (B, 1, L, L)``, ``iou_in (B, 1)`` float32 and ``original_hw (2,)`` int64 -> the
    :data:`MASK_DECODER_OUTPUTS` (see the module doc)."""
    s, lr = working_size, spec.low_res_size
    ay, ax = postprocess_matrices(spec, preprocess_shape(s, s, spec.img_size), (s, s))
    nodes = [
        _const("post_ay", ay.astype(np.float32)),
        _const("post_axt", np.ascontiguousarray(ax.T).astype(np.float32)),
        helper.make_node("MatMul", ["post_ay", "low_res_logits"], ["post_rows"]),
        helper.make_node("MatMul", ["post_rows", "post_axt"], ["working_logits"]),
        helper.make_node("Sigmoid", ["working_logits"], ["working_probability"]),
        helper.make_node("Shape", ["working_logits"], ["post_full_shape"]),  # Shape(start, end) needs opset 15
        _const("post_zero", np.array([0], np.int64)),
        _const("post_two", np.array([2], np.int64)),
        helper.make_node("Slice", ["post_full_shape", "post_zero", "post_two"], ["post_shape"]),
        helper.make_node("Concat", ["post_shape", "original_hw"], ["post_sizes"], axis=0),
        helper.make_node("Resize", ["working_logits", "", "", "post_sizes"], ["original_logits"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Sigmoid", ["original_logits"], ["probability"]),
        _const("post_threshold", np.array(threshold, np.float32)),
        helper.make_node("Greater", ["probability", "post_threshold"], ["post_lung"]),
        helper.make_node("Cast", ["post_lung"], ["mask"], to=TensorProto.UINT8),
        helper.make_node("Identity", ["iou_in"], ["iou_predictions"]),
    ]
    graph = helper.make_graph(
        nodes, "lungsam_postprocess",
        [helper.make_tensor_value_info("low_res_logits", TensorProto.FLOAT, ["batch", 1, lr, lr]),
         helper.make_tensor_value_info("iou_in", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("original_hw", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("mask", TensorProto.UINT8, ["batch", 1, "height", "width"]),
         helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1, "height", "width"]),
         helper.make_tensor_value_info("iou_predictions", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("working_probability", TensorProto.FLOAT, ["batch", 1, s, s])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _with_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` with its default-domain opset set to ``opset`` (merge_models needs equal opsets; the graphs
    built here use only ops whose meaning is the same from opset 13 on, Resize's antialias from 18 on)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for o in out.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    return out


def export_raw_encoder(sam, spec: PreprocessSpec, working_size: int, path: str | Path, opset: int) -> list[Path]:
    """Write ``encoder_raw``: :func:`preprocess_graph` merged in front of the encoder exported at
    ``max(opset, 18)``. Returns the files written (the model, plus its external data when large)."""
    from .onnx_export import export_encoder, save_model

    path = Path(path)
    opset = max(opset, MIN_RESIZE_OPSET)
    with tempfile.TemporaryDirectory(prefix=".lungsam-raw-", dir=path.parent) as scratch:  # inside the export temp
        enc_path = Path(scratch) / "encoder.onnx"
        export_encoder(sam, spec, enc_path, opset)
        encoder = onnx.load(str(enc_path))
        pre = _with_opset(preprocess_graph(spec, working_size, opset), _opset(encoder))
        return save_model(_merge(pre, encoder, [("image", "image")]), path)


def _merge(first: onnx.ModelProto, second: onnx.ModelProto, io_map: list[tuple[str, str]],
           outputs: list[str] | None = None) -> onnx.ModelProto:
    """``first``'s outputs feed ``second``'s inputs as ``io_map`` says (:func:`onnx.compose.merge_models`);
    ``second``'s internal names get a prefix so they cannot clash with ``first``'s."""
    second = onnx.compose.add_prefix(second, "m_", rename_inputs=False, rename_outputs=False,
                                     rename_initializers=True)
    ir = max(first.ir_version, second.ir_version)
    first.ir_version = second.ir_version = ir
    return onnx.compose.merge_models(first, second, io_map=io_map, outputs=outputs)


def export_mask_decoder(decoder_fixed: str | Path, spec: PreprocessSpec, working_size: int, threshold: float,
                        path: str | Path) -> list[Path]:
    """Write ``decoder_mask``: the exported ``decoder_fixed`` followed by :func:`postprocess_graph`."""
    from .onnx_export import save_model

    dec = onnx.load(str(decoder_fixed))
    post = postprocess_graph(spec, working_size, threshold, _opset(dec))
    dec = onnx.compose.add_prefix(dec, "dec_", rename_inputs=False)  # its outputs too: iou_predictions is post's
    merged = _merge(dec, post, [("dec_low_res_logits", "low_res_logits"), ("dec_iou_predictions", "iou_in")],
                    list(MASK_DECODER_OUTPUTS))
    return save_model(merged, path)


def resize_difference(images: list[np.ndarray], spec: PreprocessSpec, working_size: int) -> dict:
    """How close :func:`preprocess_graph` (onnxruntime) is to :func:`lungsam.preprocess.model_input` (Pillow) on
    ``images`` (original-frame uint8 ``(H, W)`` / ``(H, W, 3)``): ``{n, max_abs, mean_abs, equal_fraction}``
    over the raw model input values (0..255 grey levels)."""
    import onnxruntime as ort

    from ..preprocess import model_input, to_uint8, to_working

    sess = ort.InferenceSession(preprocess_graph(spec, working_size, MIN_RESIZE_OPSET).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    diffs = []
    for image in images:
        a = to_uint8(image)
        host, _ = model_input(to_working(a, working_size), spec)
        graph = sess.run(["image"], {"image_u8": a.reshape(1, a.shape[0], a.shape[1], -1)})[0][0]
        diffs.append(np.abs(graph - host))
    d = np.concatenate([x.ravel() for x in diffs]) if diffs else np.zeros(0)
    return {"n": len(images), "max_abs": float(d.max()) if d.size else 0.0,
            "mean_abs": float(d.mean()) if d.size else 0.0,
            "equal_fraction": float(np.mean(d == 0)) if d.size else 1.0}
