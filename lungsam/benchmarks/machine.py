"""What a benchmark ran on: host, GPU, driver, CUDA and package versions.

Built on :func:`lungsam.artifacts.machine_record` and :func:`~lungsam.artifacts.package_versions`;
GPU facts come from ``nvidia-smi`` and ``torch.cuda`` when present. Nothing here fails when a tool
is missing: the field is ``None`` and ``notes`` says why.
"""
from __future__ import annotations

import contextlib
import importlib
import shutil
import subprocess
from typing import Any

from ..artifacts import machine_record, package_versions
from ..cpufeatures import cpu_features, isa_summary
from ..runtime.openvino_backend import openvino_version


def _nvidia_smi() -> dict[str, Any] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory_total_mb": float(parts[2])})
    return {"gpus": gpus} if gpus else None


def _torch_cuda() -> dict[str, Any] | None:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return None
    info: dict[str, Any] = {"torch_cuda_build": getattr(torch.version, "cuda", None),
                            "cudnn": None, "available": bool(torch.cuda.is_available())}
    with contextlib.suppress(Exception):
        info["cudnn"] = torch.backends.cudnn.version()
    if info["available"]:
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update({"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_total_mb": props.total_memory / 2**20, "device_count": torch.cuda.device_count(),
                     "bf16_supported": bool(torch.cuda.is_bf16_supported())})
    return info


def onnxruntime_providers() -> list[str]:
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        return []
    return list(ort.get_available_providers())


def tensorrt_version() -> str | None:
    try:
        trt = importlib.import_module("tensorrt")
    except Exception:  # noqa: BLE001 - a broken TensorRT install is reported as absent
        return None
    return getattr(trt, "__version__", "unknown")


def full_machine_record() -> dict[str, Any]:
    """``machine_record()`` plus GPU (``nvidia-smi``, ``torch.cuda``), ORT providers and TensorRT."""
    rec = dict(machine_record())
    smi = _nvidia_smi()
    tc = _torch_cuda()
    gpu = None
    if smi or (tc and tc.get("available")):
        first = (smi or {}).get("gpus", [{}])[0] if smi else {}
        gpu = {"name": first.get("name") or (tc or {}).get("device_name"),
               "driver": first.get("driver"),
               "cuda": (tc or {}).get("torch_cuda_build"),
               "cudnn": (tc or {}).get("cudnn"),
               "capability": (tc or {}).get("capability"),
               "memory_total_mb": first.get("memory_total_mb") or (tc or {}).get("memory_total_mb"),
               "count": len((smi or {}).get("gpus", [])) or (tc or {}).get("device_count")}
    rec["gpu"] = gpu
    rec["torch_cuda"] = tc
    rec["onnxruntime_providers"] = onnxruntime_providers()
    rec["tensorrt"] = tensorrt_version()
    rec["cpu_features"] = cpu_features()  # ISA flags (VNNI, AVX512-BF16, AMX), cores: results from other CPUs differ
    rec["openvino"] = openvino_version()
    return rec


def versions() -> dict[str, str]:
    v = package_versions()
    v.update(package_versions(("openvino", "nncf")))
    trt = tensorrt_version()
    if trt and "tensorrt" not in v:
        v["tensorrt"] = trt
    return v


def describe_machine(rec: dict[str, Any]) -> str:
    """One line for reports: ``AMD EPYC (2 cores) | NVIDIA H100 (driver 550, CUDA 12.4)``."""
    s = (isa_summary(rec["cpu_features"]) if rec.get("cpu_features") else
         f"{rec.get('cpu') or 'unknown CPU'} ({rec.get('affinity_cpus') or rec.get('cpu_count')} cores)")
    g = rec.get("gpu")
    if g:
        s += f" | {g.get('name')} (driver {g.get('driver') or '?'}, CUDA {g.get('cuda') or '?'})"
    return s
