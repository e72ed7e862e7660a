"""What this CPU can do: model name, cores and the instruction-set flags that decide CPU kernel speed.

Torch-free (the runtime uses it to allow or refuse bfloat16; benchmarks record it in every result).
Read from ``/proc/cpuinfo`` (Linux); elsewhere the flags are empty and ``source`` says so, so a caller
that needs a flag refuses rather than guesses.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# Flags that change which kernels onnxruntime / OpenVINO / torch pick (Linux /proc/cpuinfo names).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo(path: Path) -> tuple[str | None, set[str]]:
    model, flags = None, set()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """``{model, cores, affinity_cpus, machine, isa: {flag: bool}, vnni, native_bf16, amx, source}``.

    ``vnni``: AVX512-VNNI or AVX-VNNI (INT8 dot products: what makes static INT8 fast);
    ``native_bf16``: AVX512-BF16 or AMX-BF16 (bfloat16 arithmetic in hardware, not emulated);
    ``amx``: AMX tiles (bf16/int8 matrix units).
    """
    model, flags = _cpuinfo(Path(cpuinfo))
    isa = {f: f in flags for f in ISA_FLAGS}
    return {
        "model": model or platform.processor() or None,
        "cores": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.machine(),
        "isa": isa,
        "vnni": isa["avx512_vnni"] or isa["avx_vnni"],
        "native_bf16": isa["avx512_bf16"] or isa["amx_bf16"],
        "amx": isa["amx_tile"],
        "source": str(cpuinfo) if flags else f"no CPU flags readable from {cpuinfo}",
    }


def isa_summary(features: dict[str, Any]) -> str:
    """One line for reports: ``Intel Xeon (2 cores): avx2 avx512f avx512_vnni; no avx512_bf16/amx``."""
    have = [f for f, on in features["isa"].items() if on and f not in ("sse4_2", "avx", "fma", "f16c")]
    missing = [f for f in ("avx512_vnni", "avx512_bf16", "amx_tile") if not features["isa"].get(f)]
    cpu = features.get("model") or "unknown CPU"
    s = f"{cpu} ({features.get('affinity_cpus')} cores): {' '.join(have) or 'no flags'}"
    return s + (f"; no {'/'.join(missing)}" if missing else "")
