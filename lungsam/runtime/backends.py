"""Inference backends: onnxruntime (CPU / CUDA), OpenVINO (CPU; optional) and TensorRT (optional). Torch-free.

Nothing falls back silently. Asking for what this machine cannot give (CUDA without
``CUDAExecutionProvider``, TensorRT without the package, an engine built for another GPU or TensorRT
version) raises :class:`BackendUnavailableError` saying what is missing, unless ``allow_fallback`` is set,
in which case :func:`resolve_backend` downgrades with a :class:`RuntimeWarning` and records why.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import LungsamError
from .bundle import PRECISIONS

BACKENDS = ("auto", "onnxruntime", "tensorrt", "openvino", "triton")  # triton: a server (runtime/triton_backend.py)
DEVICES = ("cpu", "cuda")
#: precisions a caller may ask for: the bundle's (fp32/fp16/int8) plus bf16, which is OpenVINO's inference
#: precision hint on the FP32 models (CPUs with native bfloat16 only; :mod:`lungsam.runtime.openvino_backend`).
RUNTIME_PRECISIONS = (*PRECISIONS, "bf16")


class BackendUnavailableError(LungsamError, RuntimeError):
    """The requested backend/device/precision is not available here (and no fallback was allowed)."""


class Model(Protocol):
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class BackendChoice:
    """What :func:`resolve_backend` settled on.

    Attributes:
        backend: ``onnxruntime``, ``openvino`` or ``tensorrt``.
        device: ``cpu`` or ``cuda``.
        precision: ``fp32``, ``fp16``, ``int8`` (CPU only) or ``bf16`` (OpenVINO on a CPU with native bfloat16).
        requested: the caller's ``(backend, device, precision)``.
        fallbacks: one line per downgrade taken (empty when the request was met).
        why: how ``auto`` chose on the CPU (empty for explicit requests).
    """

    backend: str
    device: str
    precision: str
    requested: tuple[str, str, str]
    fallbacks: list[str] = field(default_factory=list)
    why: str = ""


# ---------------------------------------------------------------------------------------------
# onnxruntime
# ---------------------------------------------------------------------------------------------

ORT_TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"


def import_onnxruntime():
    """``onnxruntime`` with its telemetry off, the runtime's one way to import it.

    onnxruntime's Linux/macOS builds create a device id and an event database under
    ``$XDG_CACHE_HOME`` or ``~/.cache/Microsoft/DeveloperTools/.onnxruntime/`` when the library initialises
    (at import), unless ``ORT_DISABLE_TELEMETRY=1`` is set before that (onnxruntime's documented opt-out,
    latched for the process). This sets it unless the caller set the variable, imports onnxruntime and
    calls ``onnxruntime.disable_telemetry_events()`` (the API switch, also for Windows' ETW events). An
    onnxruntime imported earlier in the process by other code keeps what it was started with."""
    os.environ.setdefault(ORT_TELEMETRY_ENV, "1")
    import onnxruntime as ort

    if os.environ.get(ORT_TELEMETRY_ENV) == "1" and hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    return ort


def ort_available_providers() -> list[str]:
    ort = import_onnxruntime()

    return list(ort.get_available_providers())


def ort_providers(device: str) -> list[str]:
    """Execution providers for ``device``; raises :class:`BackendUnavailableError` when CUDA is missing."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise ValueError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    available = ort_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise BackendUnavailableError(
            "device 'cuda' needs onnxruntime's CUDAExecutionProvider, which this onnxruntime does not have "
            f"(available: {', '.join(available)}); install the GPU build: pip install 'lungsam[gpu]' "
            "(onnxruntime-gpu, with a matching CUDA/cuDNN), or use --device cpu / --allow-fallback")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OrtModel:
    """One ONNX model in an onnxruntime session (graph optimisation ORT_ENABLE_ALL).

    On CPU the intra-op threads do not spin-wait after a run (``session.intra_op.allow_spinning = 0``):
    the pipeline runs two sessions (encoder, decoder) and numpy post-processing one after the other, and
    an idle pool that keeps spinning takes the cores from the next stage (measured on the 2-core CPU:
    decoder 102 -> 62 ms, post-processing 28 -> 1.3 ms per image; docs/benchmarks.md).
    """

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        ort = import_onnxruntime()

        self.path = Path(path)
        providers = ort_providers(device)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if device == "cpu":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendUnavailableError(f"{self.path}: onnxruntime cannot load the model ({e})") from e
        active = self.session.get_providers()
        if device == "cuda" and (not active or active[0] != "CUDAExecutionProvider"):
            # onnxruntime-gpu lists CUDA as available but silently uses CPU when CUDA/cuDNN fail to load.
            raise BackendUnavailableError(
                f"{self.path}: onnxruntime could not start CUDAExecutionProvider (session providers: {active}); "
                "check that the CUDA and cuDNN versions match the installed onnxruntime-gpu")
        self.providers = active
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(list(self.output_names), feeds)
        return dict(zip(self.output_names, outs))


# ---------------------------------------------------------------------------------------------
# TensorRT (optional: pip install 'lungsam[trt]'; device buffers through cuda-python's cuda.bindings)
# ---------------------------------------------------------------------------------------------

def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(
            "backend 'tensorrt' needs the tensorrt package, which is not installed: pip install 'lungsam[trt]' "
            "(tensorrt and cuda-python), or use --backend onnxruntime / --allow-fallback") from e
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError as e:
            raise BackendUnavailableError(
                "backend 'tensorrt' needs cuda-python for device buffers: pip install 'lungsam[trt]' "
                "(or pip install cuda-python)") from e
    return cudart


def _check(result: Any) -> Any:
    """Unwrap a cuda-python ``(err, *values)`` tuple, raising on error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def local_gpu() -> dict[str, str]:
    """``{"gpu", "compute_capability"}`` of CUDA device 0 (via cuda-python)."""
    cudart = _import_cudart()
    try:
        prop = _check(cudart.cudaGetDeviceProperties(0))
    except RuntimeError as e:
        raise BackendUnavailableError(f"backend 'tensorrt' needs a CUDA GPU; none is usable here ({e})") from e
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}"}


def check_engine_compatible(entry: dict[str, Any], engine_path: Path) -> None:
    """Refuse an engine built for another GPU architecture or TensorRT version."""
    trt = _import_tensorrt()
    here = local_gpu()
    here["tensorrt"] = trt.__version__
    rebuild = "rebuild it on this machine with `lungsam export RUN --trt`"
    problems = []
    if str(entry.get("compute_capability")) != here["compute_capability"]:
        problems.append(f"compute capability {entry.get('compute_capability')} "
                        f"(this GPU: {here['compute_capability']})")
    if str(entry.get("tensorrt")) != here["tensorrt"]:
        problems.append(f"TensorRT {entry.get('tensorrt')} (installed: {here['tensorrt']})")
    if not problems and entry.get("gpu") and str(entry["gpu"]) != here["gpu"]:
        warnings.warn(f"{engine_path.name} was built on {entry['gpu']!r}, this GPU is {here['gpu']!r} (same compute "
                      f"capability, so it runs, but its kernels were tuned for the other GPU); {rebuild}",
                      RuntimeWarning, stacklevel=3)
    if problems:
        raise BackendUnavailableError(
            f"{engine_path.name} was built on {entry.get('gpu')!r} for " + " and ".join(problems)
            + f"; this machine has {here['gpu']!r}; {rebuild}")


class TrtModel:
    """A serialized TensorRT engine run with ``execute_async_v3`` on device buffers from cuda-python.

    Inputs/outputs are host numpy arrays (float32 at the boundary, as in the ONNX models); dynamic
    shapes are set per call with ``set_input_shape``.
    """

    def __init__(self, path: str | Path):
        trt = _import_tensorrt()
        self._trt = trt
        self._cudart = _import_cudart()
        self.path = Path(path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(f"{self.path}: TensorRT could not deserialize the engine (built for another "
                                          "GPU or TensorRT version?); rebuild with `lungsam export RUN --trt` here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.providers = ["TensorRT"]

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr))
            ptr = int(_check(self._cudart.cudaMalloc(max(nbytes, 1))))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        hosts = {}
        for name in self.input_names:
            arr = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            hosts[name] = arr
            if not self.context.set_input_shape(name, arr.shape):
                raise ValueError(f"{self.path.name}: input {name} shape {arr.shape} is outside the engine's profile")
            ptr = self._buffer(name, arr.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self._stream))
            self.context.set_tensor_address(name, ptr)
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = np.empty(shape, self._dtypes[name])
            outs[name] = out
            self.context.set_tensor_address(name, self._buffer(name, out.nbytes))
        if not self.context.execute_async_v3(int(self._stream)):
            raise RuntimeError(f"{self.path.name}: TensorRT execution failed")
        for name, out in outs.items():
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h, self._stream))
        _check(cudart.cudaStreamSynchronize(self._stream))
        del hosts
        return {n: o.astype(np.float32, copy=False) for n, o in outs.items()}

    def __del__(self) -> None:  # free device memory
        try:
            for ptr, _ in self._buffers.values():
                self._cudart.cudaFree(ptr)
            self._cudart.cudaStreamDestroy(self._stream)
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# choosing
# ---------------------------------------------------------------------------------------------

def _downgrade(choice: BackendChoice, allow_fallback: bool, error: BackendUnavailableError, to: str) -> None:
    if not allow_fallback:
        raise error
    line = f"{error}; falling back to {to} (--allow-fallback)"
    warnings.warn(line, RuntimeWarning, stacklevel=3)
    choice.fallbacks.append(line)


def int8_unsupported(backend: str, device: str) -> str | None:
    """Why the bundle's INT8 models cannot run on ``backend``/``device`` (``None`` when they can).

    INT8 is a quantised encoder for CPUs (onnxruntime QDQ or dynamic quantisation, OpenVINO's NNCF model),
    executed by CPU kernels; no GPU kernels or TensorRT engines are built for it.
    """
    if device == "cpu" and backend != "tensorrt":
        return None
    where = "TensorRT" if backend == "tensorrt" else f"device {device!r}"
    return ("precision 'int8' is onnxruntime on CPU only (quantised for CPU kernels; no GPU kernels or "
            f"TensorRT engines are built for it), not {where}: run int8 with --backend onnxruntime --device cpu "
            "(or --backend openvino), or use --precision fp16 on a GPU")


# ---------------------------------------------------------------------------------------------
# OpenVINO (optional: pip install 'lungsam[openvino]'; lungsam/runtime/openvino_backend.py)
# ---------------------------------------------------------------------------------------------

def bundle_model_precision(precision: str) -> str:
    """The bundle precision whose files a runtime precision reads (``bf16`` runs the FP32 models)."""
    return "fp32" if precision == "bf16" else precision


def openvino_file(bundle, name: str, precision: str) -> Path:
    """The file OpenVINO runs for ``name`` at ``precision``: the ONNX model, except an INT8 entry carrying an
    ``openvino`` record (``{"file", "files"}``: the NNCF-quantised IR ``lungsam export --int8`` writes)."""
    entry = bundle.model_entry(name, bundle_model_precision(precision))
    ov = entry.get("openvino") if precision == "int8" else None
    return bundle._listed_file(ov["file"] if ov else entry["file"])


def _parity_key_gated(bundle, backend_prefix: str, precision: str) -> bool:
    results = ((bundle.manifest.get("parity") or {}).get("results") or {})
    return any(k.startswith(f"{backend_prefix}-{precision}/") for k in results)


def check_openvino(bundle, device: str, precision: str, models: tuple[str, ...]) -> None:
    """Raise :class:`BackendUnavailableError` unless OpenVINO can run ``models`` of ``bundle`` at ``precision``:
    CPU only; the package installed; bf16 only on a CPU with native bfloat16; an int8 encoder quantised for
    OpenVINO (NNCF); and the export's parity gate run with OpenVINO at that precision."""
    from .openvino_backend import OpenVINOUnavailable, bf16_unsupported, import_openvino

    if device != "cpu":
        raise BackendUnavailableError("backend 'openvino' runs on the CPU here (its CPU plugin); use --device cpu, "
                                      "or --backend onnxruntime / tensorrt on a GPU")
    try:
        import_openvino()
    except OpenVINOUnavailable as e:
        raise BackendUnavailableError(str(e)) from None
    if precision == "bf16" and (why := bf16_unsupported()):
        raise BackendUnavailableError(why)
    src = bundle_model_precision(precision)
    missing = [n for n in models if not bundle.has_model(n, src)]
    if missing:
        raise BackendUnavailableError(f"bundle {bundle.root} has no {src} ONNX model for {', '.join(missing)} "
                                      f"(export with --{src} to add them)")
    if precision == "int8" and not (bundle.model_entry("encoder", "int8").get("openvino")):
        raise BackendUnavailableError(
            f"bundle {bundle.root}: its int8 encoder has no OpenVINO (NNCF) model (dynamic int8, exported with "
            "--no-openvino-int8, or without openvino installed); re-export with `lungsam export RUN --int8` (static, "
            "the default) and openvino installed, or use --backend onnxruntime")
    if not _parity_key_gated(bundle, "openvino", precision):
        where = " on a CPU with native bfloat16" if precision == "bf16" else " with openvino installed"
        raise BackendUnavailableError(
            f"bundle {bundle.root} was not checked with OpenVINO at {precision} by the export's parity gate "
            f"(no openvino-{precision}/* in manifest['parity']['results']); re-export it{where}, or use "
            "--backend onnxruntime")


def auto_cpu_backend(bundle, precision: str, models: tuple[str, ...], qc_jitter: bool = True,
                     learned_decoder: str = "decoder") -> tuple[str, str]:
    """``(backend, why)`` for ``--backend auto`` on the CPU.

    Rule: onnxruntime, unless the bundle's export timed OpenVINO and onnxruntime on the parity images (same
    images, interleaved batch by batch: ``manifest["parity"]["results"][*]["ms_per_image"]``) on a CPU with
    this one's model name and ISA flags, OpenVINO was faster at the requested precision, and OpenVINO can run
    it here (:func:`check_openvino`). The time compared is what the runtime will run per image
    (:func:`recorded_ms`): the pipeline of the decoder that runs the learned prompt (``learned_decoder``:
    ``decoder_fixed`` or ``decoder``, :func:`lungsam.runtime.segmenter.learned_prompt_decoder`) and, when the
    quality flag has a prompt-jitter term that is kept (``qc_jitter``), its variant decodes on the prompted decoder.
    ``bf16`` exists on OpenVINO only, so auto means OpenVINO for it. The precision is never changed by ``auto``.
    """
    from ..cpufeatures import cpu_features

    if precision == "bf16":
        return "openvino", "bf16 runs on OpenVINO only"
    parity = bundle.manifest.get("parity") or {}
    recorded = (parity.get("machine") or {}).get("cpu_features")
    here = cpu_features()
    if not recorded or (recorded.get("model"), recorded.get("isa")) != (here["model"], here["isa"]):
        return "onnxruntime", "auto: onnxruntime (the bundle's export timings are from another CPU, or absent)"
    variants = qc_jitter and "decoder" in models and getattr(bundle.quality_model, "jitter", None) is not None
    results = parity.get("results") or {}
    (ort_ms, ort_note), (ov_ms, ov_note) = (recorded_ms(results, p, precision, variants, learned_decoder)
                                            for p in ("onnx", "openvino"))
    what = f"{precision}, with the flag's prompt variants" if variants else precision
    note = ort_note or ov_note
    if ort_ms is None or ov_ms is None or ov_ms >= ort_ms:
        return "onnxruntime", (f"auto: onnxruntime (export timing on this CPU, {what}: onnxruntime "
                               f"{timing_text(ort_ms)}, openvino {timing_text(ov_ms)}{note})")
    try:
        check_openvino(bundle, "cpu", precision, models)
    except BackendUnavailableError as e:
        return "onnxruntime", f"auto: onnxruntime (OpenVINO was faster at export but cannot run here: {e})"
    return "openvino", (f"auto: openvino (export timing on this CPU, {what}: {ov_ms:.0f} ms per image against "
                        f"onnxruntime's {ort_ms:.0f} ms{note})")


def recorded_ms(results: dict, prefix: str, precision: str, variants: bool,
                learned_decoder: str = "decoder") -> tuple[float | None, str]:
    """``(ms per image, note)`` the export recorded for backend ``prefix`` (``onnx``/``openvino``) at ``precision``:
    the ``ms_per_image`` of pipeline ``<prefix>-<precision>/<learned_decoder>`` (the encoder and the decoder that
    runs the learned prompt), plus, with ``variants``, the prompted decoder's ``jitter.ms_per_image`` (the flag's
    variant decodes). ``None`` when that pipeline was not timed; ``note`` says when the variants were not (a bundle
    exported before they were)."""
    rows = {k.split("/", 1)[1]: r for k, r in results.items() if k.startswith(f"{prefix}-{precision}/")}
    ms = (rows.get(learned_decoder) or {}).get("ms_per_image")
    if not isinstance(ms, (int, float)):
        return None, ""
    if not variants:
        return ms, ""
    extra = ((rows.get("decoder") or {}).get("jitter") or {}).get("ms_per_image")
    if not isinstance(extra, (int, float)):
        return ms, "; the flag's variant decodes were not timed at export"
    return ms + extra, ""


def timing_text(ms: float | None) -> str:
    """A recorded per-image time for the ``auto`` reasons: ``"844 ms"``, or ``"not timed"`` when the export did not
    time that backend at that precision."""
    return "not timed" if ms is None else f"{ms:.0f} ms"


def resolve_backend(bundle, backend: str = "auto", device: str = "cpu", precision: str = "fp32",
                    allow_fallback: bool = False, models: tuple[str, ...] = ("encoder", "decoder"),
                    qc_jitter: bool = True, learned_decoder: str = "decoder") -> BackendChoice:
    """Decide backend, device and precision for ``bundle`` (a :class:`~lungsam.runtime.bundle.Bundle`).

    ``auto`` means TensorRT when ``device == "cuda"`` and the bundle carries engines usable here,
    else onnxruntime (on the CPU, OpenVINO where the bundle's export timed it faster here:
    :func:`auto_cpu_backend`; ``qc_jitter``: whether the quality flag's prompt variants will run, which it
    counts in; ``learned_decoder``: the model that will run the learned prompt, whose pipeline it times).
    Explicit requests that cannot be met raise unless ``allow_fallback``.
    """
    _check_request(backend, device, precision)
    choice = BackendChoice(backend="onnxruntime", device=device, precision=precision,
                           requested=(backend, device, precision))
    if backend == "triton":  # the server runs the models of the repository it serves (lungsam export --triton)
        choice.backend, choice.device = "triton", "server"
        return choice
    if backend == "auto" and device == "cpu":
        backend, choice.why = auto_cpu_backend(bundle, precision, models, qc_jitter, learned_decoder)
    if backend == "openvino":
        if _chose_openvino(choice, bundle, models, allow_fallback):
            return choice
    elif choice.precision == "bf16":
        e = BackendUnavailableError(f"precision 'bf16' is OpenVINO's bfloat16 inference hint (--backend openvino, "
                                    f"CPU with native bfloat16), not {backend}: use --backend openvino")
        _downgrade(choice, allow_fallback, e, "fp32")
        choice.precision = "fp32"
    if backend == "tensorrt" or (backend == "auto" and device == "cuda"):
        if _chose_tensorrt(choice, bundle, backend, models, allow_fallback):
            return choice
    _settle_onnxruntime(choice, bundle, models, allow_fallback)
    return choice


def _check_request(backend: str, device: str, precision: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if precision not in RUNTIME_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(RUNTIME_PRECISIONS)}")


def _chose_openvino(choice: BackendChoice, bundle, models: tuple[str, ...], allow_fallback: bool) -> bool:
    """OpenVINO when it can run the bundle here; else (``allow_fallback``) onnxruntime, giving up bf16."""
    try:
        check_openvino(bundle, choice.device, choice.precision, models)
        choice.backend = "openvino"
        return True
    except BackendUnavailableError as e:
        if choice.precision == "bf16":  # no other backend runs bf16: a fallback keeps the backend and gives up bf16
            _downgrade(choice, allow_fallback, e, "onnxruntime fp32")
            choice.precision = "fp32"
        else:
            _downgrade(choice, allow_fallback, e, f"onnxruntime on {choice.device}")
    return False


def check_tensorrt(bundle, device: str, precision: str, models: tuple[str, ...]) -> None:
    """Raise :class:`BackendUnavailableError` unless TensorRT can run every one of ``models`` of ``bundle`` at
    ``precision`` here (a GPU, the package, and engines built for this GPU and TensorRT version)."""
    if device != "cuda":
        raise BackendUnavailableError("backend 'tensorrt' runs on a GPU only; use --device cuda")
    if precision == "int8":
        raise BackendUnavailableError(int8_unsupported("tensorrt", device))
    _import_tensorrt()
    for name in models:
        entry = bundle.engine_entry(name, precision)
        if entry is None:
            have = [p for p in PRECISIONS if bundle.engine_entry(name, p) is not None]
            hint = (f"it has {', '.join(have)} engines: use --precision {have[0]}" if have else
                    "build engines on this machine with `lungsam export RUN --trt`")
            raise BackendUnavailableError(
                f"bundle {bundle.root} has no {precision} TensorRT engine for {name!r}; {hint}")
        check_engine_compatible(entry, bundle.engine_path(entry))


def _chose_tensorrt(choice: BackendChoice, bundle, backend: str, models: tuple[str, ...], allow_fallback: bool
                    ) -> bool:
    """TensorRT when it can run here; else onnxruntime on the same device (``auto`` notes why; an explicit
    ``tensorrt`` needs ``allow_fallback``)."""
    try:
        check_tensorrt(bundle, choice.device, choice.precision, models)
        choice.backend = "tensorrt"
        return True
    except BackendUnavailableError as e:
        if backend == "auto":  # auto only prefers TensorRT; onnxruntime on the same device is the plain choice
            choice.fallbacks.append(f"auto: not using TensorRT ({e})")
        else:
            _downgrade(choice, allow_fallback, e, f"onnxruntime on {choice.device}")
    return False


def _settle_onnxruntime(choice: BackendChoice, bundle, models: tuple[str, ...], allow_fallback: bool) -> None:
    """onnxruntime: the device (CUDA must start), then the precision on that device and in the bundle."""
    if choice.device == "cuda":
        try:
            ort_providers("cuda")
        except BackendUnavailableError as e:
            _downgrade(choice, allow_fallback, e, "onnxruntime on cpu")
            choice.device = "cpu"
    # int8 is settled on the final device: a fallback to the CPU keeps it, a GPU gives it up
    if choice.precision == "int8" and (why := int8_unsupported("onnxruntime", choice.device)):
        _downgrade(choice, allow_fallback, BackendUnavailableError(why), "fp32")
        choice.precision = "fp32"
    missing = [n for n in models if not bundle.has_model(n, choice.precision)]
    if missing:
        e = BackendUnavailableError(f"bundle {bundle.root} has no {choice.precision} ONNX model for "
                                    f"{', '.join(missing)} (export with --{choice.precision} to add them)")
        _downgrade(choice, allow_fallback, e, "fp32")
        choice.precision = "fp32"


def open_model(bundle, name: str, choice: BackendChoice, threads: int | None = None,
               performance_hint: str | None = None) -> Model:
    """Open one bundle model with the chosen backend (``performance_hint``: OpenVINO's ``latency`` (default)
    or ``throughput``; refused for the other backends, which have no such setting)."""
    if performance_hint is not None and choice.backend != "openvino":
        raise BackendUnavailableError(f"a performance hint ({performance_hint!r}) is an OpenVINO setting; the chosen "
                                      f"backend is {choice.backend}: use --backend openvino or drop the hint")
    if choice.backend == "openvino":
        from .openvino_backend import OpenVINOUnavailable, OvModel

        try:
            return OvModel(openvino_file(bundle, name, choice.precision), choice.precision, threads,
                           performance_hint or "latency")
        except OpenVINOUnavailable as e:
            raise BackendUnavailableError(str(e)) from None
    if choice.backend == "triton":
        from .triton_backend import open_triton_model

        return open_triton_model(bundle, name)
    if choice.backend == "tensorrt":
        return TrtModel(bundle.engine_path(bundle.engine_entry(name, choice.precision)))
    return OrtModel(bundle.model_path(name, choice.precision), device=choice.device, threads=threads)
