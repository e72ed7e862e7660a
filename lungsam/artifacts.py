"""Small helpers that make every artifact auditable: atomic writes, sha256, versions. Torch-free."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; final files get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, *, nonfinite: str = "null") -> None:
    """Write ``obj`` as strict JSON (see :func:`dumps_json`), atomically."""
    write_text_atomic(path, dumps_json(obj, indent=2, nonfinite=nonfinite) + "\n")


def dumps_json(obj: Any, *, indent: int | None = None, nonfinite: str = "null") -> str:
    """``obj`` as strict JSON text: the one serialiser for every JSON file lungsam writes.

    numpy scalars/arrays become numbers/lists and paths strings. A non-finite float (NaN, +-Infinity),
    which JSON cannot express, becomes ``null`` (``nonfinite="null"``) or raises ``ValueError`` naming its
    key path (``nonfinite="error"``, where a non-finite value is a bug). The text never contains the bare
    ``NaN``/``Infinity`` tokens that Python's ``json`` writes by default and strict parsers reject."""
    if nonfinite not in ("null", "error"):
        raise ValueError(f"nonfinite must be 'null' or 'error', got {nonfinite!r}")
    return json.dumps(_jsonable(obj, nonfinite, "$"), indent=indent, sort_keys=False, allow_nan=False)


def _jsonable(o: Any, nonfinite: str, where: str) -> Any:
    """``o`` with numpy values converted and non-finite floats handled (see :func:`dumps_json`)."""
    if isinstance(o, dict):
        return {k: _jsonable(v, nonfinite, f"{where}.{k}") for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v, nonfinite, f"{where}[{i}]") for i, v in enumerate(o)]
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        f = float(o)
        if math.isfinite(f):
            return f
        if nonfinite == "error":
            raise ValueError(f"non-finite value {f} at {where} cannot be written as JSON")
        return None
    if isinstance(o, Path):
        return str(o)
    if o is None or isinstance(o, str):
        return o
    if hasattr(o, "tolist"):  # numpy arrays (and tensors handed to a report)
        return _jsonable(o.tolist(), nonfinite, where)
    raise TypeError(f"not JSON serialisable: {type(o).__name__} at {where}")


def loads_json_strict(text: str) -> Any:
    """Parse JSON text, refusing the non-standard ``NaN``/``Infinity``/``-Infinity`` tokens."""
    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON token {token!r}")

    return json.loads(text, parse_constant=refuse)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


RESULT_PACKAGES = ("lungsam", "numpy", "pillow", "torch", "torchvision", "segment-anything", "monai", "onnx",
                   "onnxruntime", "onnxruntime-gpu", "onnxconverter-common", "tensorrt", "pydicom")


def package_versions(names: tuple[str, ...] = RESULT_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape results (missing ones are left out)."""
    out = {"python": sys.version.split()[0]}
    for n in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[n] = metadata.version(n)
    return out


def machine_record() -> dict[str, Any]:
    """Host facts for reports: CPU model and cores, OS, Python."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
