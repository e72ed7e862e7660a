"""OpenVINO backend (CPU plugin) for the runtime: ``--backend openvino``, ``pip install 'lungsam[openvino]'``.

Torch-free. Reads the bundle's ONNX models directly (the INT8 encoder as the NNCF-quantised OpenVINO IR
that ``lungsam export --int8`` writes beside it). The CPU plugin's settings are explicit, never the
plugin's machine-dependent defaults:

* ``INFERENCE_NUM_THREADS``: ``threads`` (``None``: the plugin's default, all cores);
* ``PERFORMANCE_HINT``: ``latency`` (default; one stream, all threads on one image) or ``throughput``;
* ``INFERENCE_PRECISION_HINT``: ``f32`` for every precision except ``bf16``. OpenVINO would otherwise pick
  bfloat16 by itself on CPUs with AMX, which is a precision nobody asked for. ``bf16`` is allowed only where
  the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16, :func:`lungsam.cpufeatures.cpu_features`);
  elsewhere it is refused (emulated bfloat16 is slower than float32).

Static shapes: the bundle's models have dynamic batch (and prompt-point) axes, and the CPU plugin's kernels for a
dynamic shape are slower than for a fixed one (measured on a 2-core AMX Xeon, LiteMedSAM@256, bf16: prompted
decoder 74 / 109 ms dynamic against 50 / 75 ms static for batches of 4 / 6, encoder 156 against 134 ms). So
:class:`OvModel` compiles the model once more for each of the first :data:`STATIC_SHAPES` distinct input shapes it
is given twice (the shapes a runtime sees: one image, the quality flag's two variant batches; a shape's first call
runs on the dynamic compilation, so a one-image run pays no extra compile) and runs those there; any further shape
runs on the dynamic compilation. Same model file, same precision hint: only the kernels' shape
specialisation differs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..cpufeatures import cpu_features
from .backends import BackendUnavailableError

PERFORMANCE_HINTS = ("latency", "throughput")
_OV_HINT = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
_OV_PRECISION = {"fp32": "f32", "fp16": "f32", "int8": "f32", "bf16": "bf16"}

_CORE = None  # one ov.Core per process, created on first use (no side effects at import)
#: Per model, how many distinct input shapes get a static compilation of their own (bounded memory: each holds
#: its own compiled kernels and constants); 0 turns it off.
STATIC_SHAPES = 4


class OpenVINOUnavailable(BackendUnavailableError):
    """OpenVINO is not installed, or cannot run what was asked on this CPU."""


def import_openvino():
    """The ``openvino`` module, or :class:`OpenVINOUnavailable` saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise OpenVINOUnavailable("backend 'openvino' needs the openvino package, which is not installed: "
                                  "pip install 'lungsam[openvino]', or use --backend onnxruntime") from e
    return openvino


def core():
    global _CORE
    if _CORE is None:
        _CORE = import_openvino().Core()
    return _CORE


def openvino_version() -> str | None:
    try:
        return import_openvino().__version__
    except OpenVINOUnavailable:
        return None


def bf16_unsupported(features: dict[str, Any] | None = None) -> str | None:
    """Why bfloat16 inference is refused on this CPU (``None`` when it has AVX512-BF16 or AMX-BF16)."""
    f = features if features is not None else cpu_features()
    if f["native_bf16"]:
        return None
    return (f"precision 'bf16' needs a CPU with native bfloat16 (AVX512-BF16 or AMX-BF16); this CPU "
            f"({f.get('model') or 'unknown'}) has neither, and emulated bfloat16 is slower than float32: "
            "use --precision fp32 or int8")


def compile_config(precision: str, threads: int | None, hint: str) -> dict[str, str]:
    """CPU plugin properties for one model (see the module docstring)."""
    if precision not in _OV_PRECISION:
        raise ValueError(f"unknown precision {precision!r} for openvino; choose from {', '.join(_OV_PRECISION)}")
    if hint not in PERFORMANCE_HINTS:
        raise ValueError(f"unknown performance hint {hint!r}; choose from {', '.join(PERFORMANCE_HINTS)}")
    config = {"PERFORMANCE_HINT": _OV_HINT[hint], "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision]}
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
    return config


class OvModel:
    """One model (ONNX, or OpenVINO IR ``.xml`` with its ``.bin``) compiled for OpenVINO's CPU plugin.

    I/O as the bundle's ONNX models: float32 numpy arrays in and out, names from the model; dynamic
    batch. One infer request, reused (one segmenter per thread, as for onnxruntime).
    """

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None,
                 hint: str = "latency", static_shapes: int = STATIC_SHAPES):
        if precision == "bf16" and (why := bf16_unsupported()):
            raise OpenVINOUnavailable(why)
        self.path = Path(path)
        self.config = compile_config(precision, threads, hint)
        ov_core = core()
        try:
            model = ov_core.read_model(str(self.path))
            # the model's own names (the compiled model's tensors may carry extra internal ones), in port order
            self.input_names = tuple(_io_name(p) for p in model.inputs)
            self.output_names = tuple(_io_name(p) for p in model.outputs)
            self.compiled = ov_core.compile_model(model, "CPU", self.config)
        except Exception as e:  # openvino raises RuntimeError subclasses of its own
            raise OpenVINOUnavailable(f"{self.path}: OpenVINO cannot load the model ({e})") from e
        self.request = self.compiled.create_infer_request()
        self.static_shapes = int(static_shapes)
        self._static: dict[tuple, Any] = {}  # input shapes -> infer request (None: the dynamic one runs them)
        self._seen: set[tuple] = set()  # shapes called once so far (compiled statically on their second call)
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        got = got.to_string() if hasattr(got, "to_string") else str(got)
        self.providers = [f"OpenVINO CPU ({got}, {self.config['PERFORMANCE_HINT'].lower()})"]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Float tensors go in and come out as float32; integer ones (the in-graph models' uint8 image, int64 size
        and uint8 mask, :mod:`lungsam.runtime.ingraph`) keep their dtype."""
        inputs = {i: _boundary(feeds[n]) for i, n in enumerate(self.input_names)}
        res = self.request_for(tuple(a.shape for a in inputs.values())).infer(inputs)
        return {n: _boundary(res[i]) for i, n in enumerate(self.output_names)}

    def request_for(self, shapes: tuple[tuple[int, ...], ...]):
        """The infer request for inputs of these ``shapes`` (port order): a static compilation of the model at them
        for the first :attr:`static_shapes` distinct shapes seen twice (the first call of a shape runs on the
        dynamic model, so a one-image run pays no extra compilation), else the dynamic one. A model the plugin
        cannot reshape or compile at a shape keeps the dynamic request for it."""
        if shapes in self._static:
            return self._static[shapes] or self.request
        if len(self._static) >= self.static_shapes:
            return self.request
        if shapes not in self._seen:
            self._seen.add(shapes)
            return self.request
        try:
            model = core().read_model(str(self.path))
            model.reshape({port: list(shape) for port, shape in zip(model.inputs, shapes)})
            request = core().compile_model(model, "CPU", self.config).create_infer_request()
        except Exception:  # a shape the model cannot take statically: the dynamic compilation runs it as before
            request = None
        self._static[shapes] = request
        return request or self.request

    @property
    def static_compiled(self) -> list[tuple[tuple[int, ...], ...]]:
        """The input shapes that run on a static compilation of their own."""
        return [k for k, v in self._static.items() if v is not None]


def _boundary(a) -> np.ndarray:
    a = np.asarray(a)
    return np.ascontiguousarray(a, dtype=np.float32 if a.dtype.kind == "f" else a.dtype)


def _io_name(port) -> str:
    """The port's name: the exporter's (``embeddings``), not an internal one, when it has several."""
    names = sorted(port.get_names())
    plain = [n for n in names if not n.startswith("/")]
    return (plain or names or [port.get_any_name()])[0]
