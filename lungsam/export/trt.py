"""TensorRT FP16 engines built in code with the TensorRT Python API.

* TensorRT 10.x (weak typing): the FP32 ONNX is parsed, ``BuilderFlag.FP16`` lets TensorRT choose FP16
  kernels, and layers whose values overflow or lose too much in FP16 (normalisation, softmax,
  reductions, unary sqrt/exp/erf, pow) are pinned to FP32 with ``layer.precision`` /
  ``set_output_type`` under ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``.
* TensorRT 11+ removed weak typing (those flags no longer exist): the FP16 ONNX written by
  :func:`lungsam.export.onnx_export.convert_fp16` (same ops kept FP32, in the graph) is parsed into a
  strongly typed network, so the engine follows the graph's types.

Each engine has one optimisation profile over batch ``1..max_batch`` (and ``1..max_points`` prompt
points for ``decoder``); the timing cache is shared by the engines and saved in the bundle.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LungsamError

INSTALL_HINT = "pip install 'lungsam[trt]'"


class TensorRTUnavailable(LungsamError, RuntimeError):
    pass


def require_tensorrt():
    """Import and return ``tensorrt`` or raise :class:`TensorRTUnavailable` with the install hint."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(f"--trt needs the TensorRT Python package, which is not installed ({e}); "
                                  f"install it with: {INSTALL_HINT} (and run on an NVIDIA GPU)") from None
    return trt


def has_weak_typing(trt) -> bool:
    """TensorRT 10.x offers ``BuilderFlag.FP16``; 11+ builds strongly typed networks only."""
    return hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS")


def gpu_record() -> dict:
    """``{"gpu", "compute_capability"}`` of CUDA device 0 (raises when there is no CUDA GPU)."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("--trt needs an NVIDIA GPU with CUDA; none is visible to torch")
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


@dataclass
class Profile:
    """Shapes ``{input name: (min, opt, max)}`` of one optimisation profile."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict:
        return {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.shapes.items()}


def bundle_profiles(img_size: int, channels: int, emb_size: int, fixed_points: int, max_batch: int,
                    max_points: int = 16) -> dict[str, Profile]:
    """Profiles of the three bundle models (batch ``1..max_batch``; decoder points ``1..max_points``)."""
    b = (1, 1, max_batch)
    emb = lambda n: (n, channels, emb_size, emb_size)  # noqa: E731
    npts = (1, max(1, fixed_points), max(max_points, fixed_points))
    return {
        "encoder": Profile({"image": tuple((n, 3, img_size, img_size) for n in b)}),
        "decoder": Profile({"embeddings": tuple(emb(n) for n in b),
                            "point_coords": tuple((n, p, 2) for n, p in zip(b, npts)),
                            "point_labels": tuple((n, p) for n, p in zip(b, npts))}),
        "decoder_fixed": Profile({"embeddings": tuple(emb(n) for n in b)}),
    }


def _pin_fp32(trt, network) -> int:
    """Pin the layers that overflow in FP16 to FP32 (TensorRT 10 weak typing). Returns how many."""
    kinds = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    unary = {trt.UnaryOperation.SQRT, trt.UnaryOperation.EXP, trt.UnaryOperation.ERF, trt.UnaryOperation.LOG,
             trt.UnaryOperation.SIN, trt.UnaryOperation.COS}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        hit = layer.type in kinds
        if layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer
            hit = layer.op in unary
        elif layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
            hit = layer.op == trt.ElementWiseOperation.POW
        if hit:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(onnx_path: str | Path, engine_path: str | Path, profile: Profile, timing_cache: str | Path,
                 workspace_bytes: int = 4 << 30) -> dict:
    """Build and save one FP16 engine from ``onnx_path`` (the FP32 model for TensorRT 10, the FP16 model
    for TensorRT 11+); reads and updates the timing cache file. Returns the manifest record
    ``{file, gpu, compute_capability, tensorrt, precision, typing, fp32_pinned_layers, profiles, source}``."""
    trt = require_tensorrt()
    gpu = gpu_record()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weak = has_weak_typing(trt)
    flags = 0
    if not weak and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    pinned = 0
    if weak:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32(trt, network)
    cache_path = Path(timing_cache)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.shapes.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"file": Path(engine_path).name, **gpu, "tensorrt": trt.__version__, "precision": "fp16",
            "typing": "weak (BuilderFlag.FP16, FP32-pinned layers)" if weak else "strong (from the FP16 ONNX)",
            "fp32_pinned_layers": pinned, "profiles": [profile.to_dict()], "source": Path(onnx_path).name}


class EngineRunner:
    """Runs a serialized engine on CUDA with torch tensors as buffers (used by the export parity check).

    ``run({input name: np.ndarray float32}) -> {output name: np.ndarray float32}``.
    """

    def __init__(self, engine_path: str | Path):
        trt = require_tensorrt()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not load this engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def run(self, feeds: dict):
        import numpy as np
        import torch

        stream = torch.cuda.current_stream()
        keep = []
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name], np.float32)).cuda()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}


def engine_pipeline(encoder_engine: str | Path, decoder_engine: str | Path, fixed: bool):
    """A :class:`lungsam.export.parity.Pipeline` over two engines."""
    from .parity import Pipeline

    enc, dec = EngineRunner(encoder_engine), EngineRunner(decoder_engine)

    def encode(raw):
        return enc.run({"image": raw})["embeddings"]

    def decode(emb, points, labels):
        feeds = {"embeddings": emb} if fixed else {"embeddings": emb, "point_coords": points, "point_labels": labels}
        return dec.run(feeds)["low_res_logits"]

    return Pipeline(encode, decode, fixed)
