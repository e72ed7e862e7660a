"""Planning ``lungsam bench``: which rows (backend x precision x mode) it measures, and why a row that cannot run
on this machine or bundle is skipped. No measuring, no model loading (the runtime's own checks come when a row's
backend opens)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LungsamError
from ..runtime.backends import int8_unsupported
from .schema import BACKENDS, PRECISIONS

RUNTIME_BACKENDS = ("onnxruntime", "openvino", "tensorrt")
TORCH_INT8 = "int8 is the bundle's onnxruntime CPU quantisation; torch is the FP32 reference it is compared with"
BUNDLE_BF16 = ("bundles carry fp32/fp16/int8 models only; bf16 is measured for torch (GPU) and OpenVINO (its "
               "bfloat16 hint on a CPU with native bfloat16)")


class BenchError(LungsamError, ValueError):
    pass


@dataclass
class Plan:
    """One row: ``backend`` and ``precision`` (names in :mod:`lungsam.benchmarks.schema`), the torch ``mode``
    (``eager`` or ``cuda_graph``; ``None`` for the runtime backends) and ``skip``, the reason it cannot run."""

    backend: str
    precision: str
    mode: str | None = None
    skip: str | None = None


def make_plan(backends: list[str], precisions: list[str], device: str, bundle) -> list[Plan]:
    """Every backend x precision asked for; the torch FP32 eager reference first (whenever torch is asked)."""
    check_names(backends, precisions)
    plans = torch_plans(precisions, device) if "torch" in backends else []
    for b in RUNTIME_BACKENDS:
        if b in backends:
            plans += [Plan(b, p, skip=runtime_skip(b, p, device, bundle)) for p in precisions]
    return plans


def check_names(backends: list[str], precisions: list[str]) -> None:
    """Unknown backend or precision names are an error naming the choices."""
    for b in backends:
        if b not in BACKENDS:
            raise BenchError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    for p in precisions:
        if p not in PRECISIONS:
            raise BenchError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")


def torch_plans(precisions: list[str], device: str) -> list[Plan]:
    """The torch rows: the FP32 eager reference, then each precision (on cuda eager and CUDA graphs side by side,
    so the graphs' gain is visible); int8 is skipped (no torch path)."""
    plans = [Plan("torch", "fp32", "eager")]
    for p in precisions:
        if p == "int8":
            plans.append(Plan("torch", p, "eager", skip=TORCH_INT8))
        elif device == "cuda":
            if p != "fp32":
                plans.append(Plan("torch", p, "eager"))
            plans.append(Plan("torch", p, "cuda_graph"))
        elif p != "fp32":
            plans.append(Plan("torch", p, "eager"))
    return plans


def runtime_skip(backend: str, precision: str, device: str, bundle) -> str | None:
    """Why the runtime ``backend`` cannot run ``precision`` on ``device`` with ``bundle`` (``None``: it can)."""
    if precision == "bf16" and backend != "openvino":
        return BUNDLE_BF16
    if backend == "openvino" and (why := openvino_unavailable(device, precision)):
        return why
    if backend == "tensorrt" and device != "cuda":
        return "TensorRT runs on a GPU only (use --device cuda)"
    if precision == "int8" and (why := int8_unsupported(backend, device)):
        return why
    if not bundle.has_model("encoder", "fp32" if precision == "bf16" else precision):
        return f"the bundle has no {precision} models (export with --{precision})"
    return None


def openvino_unavailable(device: str, precision: str) -> str | None:
    """Why an OpenVINO row cannot run here (``None`` when it can, as far as the machine goes; the bundle's
    own checks come when the runtime opens it)."""
    from ..runtime.openvino_backend import bf16_unsupported, openvino_version

    if device != "cpu":
        return "OpenVINO is measured on the CPU only (use --device cpu)"
    if openvino_version() is None:
        return "openvino is not installed: pip install 'lungsam[openvino]'"
    if precision == "bf16":
        return bf16_unsupported()
    return None


def row_models(bundle, plan: Plan) -> dict[str, str]:
    """``{model name: file}`` a runtime row runs (OpenVINO int8: the NNCF IR; bf16: the FP32 files), read from
    the bundle's typed manifest (``Bundle.meta``)."""
    src = "fp32" if plan.precision == "bf16" else plan.precision
    out = {}
    for name, precs in bundle.meta.models.items():
        if src in precs:
            entry = precs[src]
            ov = entry.openvino if plan.backend == "openvino" and src == "int8" else None
            out[name] = ov.file if ov is not None else entry.file
    return out
