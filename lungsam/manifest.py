"""``manifest.json`` of an exported bundle: the one module that names, writes, reads and validates it. Torch-free.

Written by :mod:`lungsam.export.bundle` (:meth:`Manifest.to_bytes`), read by :mod:`lungsam.runtime.bundle`
(:func:`parse_manifest`), which validates it against one schema *before anything runs*: format, frames and
sizes in sane ranges and consistent with each other and with every model's recorded I/O, a threshold in
(0, 1), a known prompt mode with finite learned points inside the working frame, model files as relative
paths listed (with sha256 and size) under ``files``. A malformed manifest raises :class:`BundleError` naming
the key path (``manifest.prompt.points[3]``), never another exception.

**Bundle digest**: the sha256 of ``manifest.json``'s bytes (:func:`manifest_digest`). The manifest lists the
sha256 and size of every other file of the bundle, so the digest pins the whole bundle: any changed byte of
any listed file fails verification against the manifest, and any changed byte of the manifest changes the
digest. ``lungsam export`` prints it and writes it beside the manifest in :data:`DIGEST_FILE`
(``sha256sum -c`` format); a site pins a validated bundle with ``--expect-digest``.

Keys (docs/DEVELOPING.md, "Bundle format"), in the order written: :data:`KEY_ORDER`. Optional sections
``postprocess`` and ``qc`` are open JSON objects (their owners validate their contents); ``quantization``
is an open object keyed by precision; ``export`` records what the export was asked for (the fields of
:class:`lungsam.export.config.ExportOptions`, a record for audit, read by nothing at run time). The model names
and precisions a bundle may carry are :data:`MODEL_NAMES` and :data:`PRECISIONS` (extend them here).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from .errors import LungsamError
from .preprocess import PreprocessSpec
from .prompts import BOX_PROMPT_MODES, POINT_PROMPT_MODES, PROMPT_MODES, LearnedPrompt

BUNDLE_FORMAT = "lungsam-bundle/1"
MANIFEST_FILE = "manifest.json"
DIGEST_FILE = "manifest.json.sha256"  # "<sha256 hex>  manifest.json\n", not listed in the manifest it hashes


def model_filename(name: str, precision: str) -> str:
    """A bundle's ONNX file of model ``name`` at ``precision``: ``<name>.onnx`` (fp32), else
    ``<name>_<precision>.onnx`` (readers take the names from the manifest's ``models`` section, not from here)."""
    return f"{name}.onnx" if precision == "fp32" else f"{name}_{precision}.onnx"


def engine_filename(name: str) -> str:
    """A bundle's TensorRT engine of model ``name``: ``<name>.engine``."""
    return f"{name}.engine"

MODEL_NAMES: tuple[str, ...] = ("encoder", "decoder", "decoder_fixed")
#: The in-graph pre/postprocessing models (``lungsam export --in-graph-preprocess``, fp32 only, both or neither):
#: ``encoder_raw`` takes the decoded uint8 image at its own size, ``decoder_mask`` returns the thresholded mask
#: at the original size (:mod:`lungsam.export.ingraph`). Not part of :meth:`Manifest.model_names` (the host path).
GRAPH_MODEL_NAMES: tuple[str, ...] = ("encoder_raw", "decoder_mask")
ALL_MODEL_NAMES: tuple[str, ...] = MODEL_NAMES + GRAPH_MODEL_NAMES
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")  # int8: onnxruntime CPU only (dynamic quantisation)
DECODER_NAMES: tuple[str, ...] = ("decoder", "decoder_fixed")
IO_DTYPES: tuple[str, ...] = ("float32", "uint8", "int64")  # float32 for MODEL_NAMES (FP16/INT8 keep float32 I/O)

#: ONNX I/O names fixed by the bundle format (docs/DEVELOPING.md).
ONNX_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "encoder": (("image",), ("embeddings",)),
    "decoder": (("embeddings", "point_coords", "point_labels"), ("low_res_logits", "iou_predictions")),
    "decoder_fixed": (("embeddings",), ("low_res_logits", "iou_predictions")),
    "encoder_raw": (("image_u8",), ("embeddings",)),
    "decoder_mask": (("embeddings", "original_hw"), ("mask", "probability", "iou_predictions", "working_probability")),
}
#: I/O tensors whose dtype is not float32 (every other tensor of every model is float32).
IO_DTYPE_OF: dict[str, str] = {"image_u8": "uint8", "original_hw": "int64", "mask": "uint8"}

# ranges (inclusive) of the schema; every size is in pixels
WORKING_SIZE_RANGE = (32, 2048)
IMG_SIZE_RANGE = (16, 2048)
EMBEDDING_SIZE_RANGE = (1, 512)
EMBED_DIM_RANGE = (1, 4096)
OPSET_RANGE = (7, 30)
POINTS_PER_LUNG_RANGE = (1, 32)
MAX_POINTS = 64
MAX_FILES = 512
MAX_FILE_BYTES = 1 << 40
MAX_MANIFEST_BYTES = 16 << 20
MAX_DEPTH = 24
MAX_STRING = 4096
NORMALIZATIONS = ("mean_std", "minmax")
RESIZES = ("longest_side_bilinear",)
PADS = ("bottom_right",)

KEY_ORDER: tuple[str, ...] = (
    "format", "created", "backbone", "preprocess", "working_size", "prompt", "threshold", "inference", "opset",
    "precisions", "models", "quantization", "skipped", "engines", "timing_cache", "postprocess", "qc", "parity",
    "run", "export", "provenance", "versions", "files")
REQUIRED_KEYS: tuple[str, ...] = ("format", "backbone", "preprocess", "working_size", "prompt", "threshold",
                                  "models", "files")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


class BundleError(LungsamError, ValueError):
    """A bundle that cannot be used (not a bundle, unknown format, malformed manifest, missing model)."""


class BundleIntegrityError(BundleError):
    """A listed file is missing, changed, not a regular file, a symlink or outside the bundle, or the
    manifest's digest is not the one expected."""


# ---------------------------------------------------------------------------------------------
# digest and bytes
# ---------------------------------------------------------------------------------------------

def manifest_digest(data: bytes) -> str:
    """The bundle digest: hex sha256 of ``manifest.json``'s bytes (covers every listed file, see module doc)."""
    return hashlib.sha256(data).hexdigest()


def normalize_digest(value: str, what: str = "--expect-digest") -> str:
    """``value`` (64 hex digits, optionally ``sha256:``-prefixed, any case) -> lowercase hex; else BundleError."""
    v = str(value).strip().lower()
    v = v.removeprefix("sha256:")
    if not _SHA256.fullmatch(v):
        raise BundleError(f"{what}: expected a sha256 digest (64 hex digits), got {value!r}")
    return v


def digest_line(digest: str) -> str:
    """The :data:`DIGEST_FILE` line (``sha256sum`` format)."""
    return f"{digest}  {MANIFEST_FILE}\n"


def parse_digest_line(text: str, where: str) -> str:
    """The digest recorded in a :data:`DIGEST_FILE`; BundleError when it is not one ``sha256sum`` line."""
    parts = text.strip().split()
    if len(parts) != 2 or parts[1].lstrip("*") != MANIFEST_FILE:
        raise BundleError(f"{where}: expected one line '<sha256>  {MANIFEST_FILE}'")
    return normalize_digest(parts[0], where)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON (strict JSON has no NaN/Infinity)")


def parse_manifest(data: bytes, where: str = MANIFEST_FILE) -> Manifest:
    """Validate ``manifest.json`` bytes into a :class:`Manifest`; raise :class:`BundleError` naming the key."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: {len(data)} bytes, more than a manifest may hold ({MAX_MANIFEST_BYTES})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"{where}: not UTF-8 text ({e})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise BundleError(f"{where}: JSON nested too deeply (more than {MAX_DEPTH} levels allowed)") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers beyond the digit limit
        raise BundleError(f"{where}: not valid strict JSON ({e})") from None
    check_json(obj, "manifest")
    return Manifest.from_dict(obj)


def check_json(value: Any, path: str, depth: int = 0) -> None:
    """Every number finite, strings bounded, nesting at most :data:`MAX_DEPTH` (BundleError naming ``path``)."""
    if depth > MAX_DEPTH:
        raise BundleError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            check_json(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_json(v, f"{path}[{i}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise BundleError(f"{path}: {value} is not a finite number")
    elif isinstance(value, str) and len(value) > MAX_STRING:
        raise BundleError(f"{path}: string of {len(value)} characters (at most {MAX_STRING})")


# ---------------------------------------------------------------------------------------------
# typed readers: each raises BundleError naming the key path
# ---------------------------------------------------------------------------------------------

def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


def _fail(path: str, msg: str) -> BundleError:
    return BundleError(f"{path}: {msg}")


def _obj(v: Any, path: str) -> dict:
    if not isinstance(v, dict):
        raise _fail(path, f"expected an object, got {_kind(v)}")
    return v


def _arr(v: Any, path: str, max_len: int = 1024, length: int | None = None) -> list:
    if not isinstance(v, list):
        raise _fail(path, f"expected an array, got {_kind(v)}")
    if length is not None and len(v) != length:
        raise _fail(path, f"expected {length} values, got {len(v)}")
    if len(v) > max_len:
        raise _fail(path, f"{len(v)} entries (at most {max_len})")
    return v


def _str(v: Any, path: str, choices: tuple[str, ...] | None = None, max_len: int = 256) -> str:
    if not isinstance(v, str):
        raise _fail(path, f"expected a string, got {_kind(v)}")
    if choices is not None and v not in choices:
        raise _fail(path, f"unknown value {v[:80]!r}; known: {', '.join(choices)}")
    if len(v) > max_len:
        raise _fail(path, f"string of {len(v)} characters (at most {max_len})")
    return v


def _int(v: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(path, f"expected an integer, got {_kind(v)}")
    if not lo <= v <= hi:
        raise _fail(path, f"{v} is outside {lo}..{hi}")
    return v


def _num(v: Any, path: str, lo: float, hi: float, *, open_range: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(path, f"expected a number, got {_kind(v)}")
    f = float(v)
    ok = math.isfinite(f) and ((lo < f < hi) if open_range else (lo <= f <= hi))
    if not ok:
        raise _fail(path, f"{v} is outside {'(' if open_range else '['}{lo}, {hi}{')' if open_range else ']'}")
    return f


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise _fail(path, f"expected true or false, got {_kind(v)}")
    return v


def _opt(d: dict, key: str, read, path: str, *args, **kw):
    """``read(d[key], path.key, ...)``, or ``None`` when the key is absent or null."""
    v = d.get(key)
    return None if v is None else read(v, f"{path}.{key}", *args, **kw)


def _need(d: dict, key: str, path: str) -> Any:
    if key not in d:
        raise _fail(f"{path}.{key}", "missing (required)")
    return d[key]


def _keys(d: dict, path: str, allowed: tuple[str, ...]) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise _fail(f"{path}.{unknown[0]}", f"unknown key (known: {', '.join(allowed)})")


def _rel_path(v: Any, path: str) -> str:
    """A bundle file: a relative posix path inside the bundle (BundleIntegrityError otherwise)."""
    s = _str(v, path, max_len=255)
    pp = PurePosixPath(s)
    if (not s or pp.is_absolute() or "\\" in s or any(part in ("..", ".", "") for part in s.split("/"))
            or ":" in s.split("/")[0]):
        raise BundleIntegrityError(f"{path}: manifest lists a path outside the bundle: {s!r}")
    if s in (MANIFEST_FILE, DIGEST_FILE):
        raise BundleIntegrityError(f"{path}: {s} cannot be a listed file")
    return s


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One model input/output at the ONNX boundary: ``shape`` entries are ints or dynamic-axis names."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, v: Any, path: str) -> TensorSpec:
        d = _obj(v, path)
        _keys(d, path, ("name", "shape", "dtype"))
        shape = []
        for i, dim in enumerate(_arr(_need(d, "shape", path), f"{path}.shape", max_len=8)):
            p = f"{path}.shape[{i}]"
            shape.append(_str(dim, p, max_len=64) if isinstance(dim, str) else _int(dim, p, 1, 1 << 20))
        return cls(name=_str(_need(d, "name", path), f"{path}.name", max_len=64), shape=tuple(shape),
                   dtype=_str(_need(d, "dtype", path), f"{path}.dtype", IO_DTYPES))


@dataclass(frozen=True)
class OpenVinoModel:
    """``models[name]["int8"].openvino``: an NNCF-quantised OpenVINO IR of the model (``file`` the ``.xml``,
    ``files`` the IR's files), beside the onnxruntime INT8 file of the same entry."""

    file: str
    files: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"file": self.file, "files": list(self.files)}

    @classmethod
    def from_dict(cls, v: Any, path: str) -> OpenVinoModel:
        d = _obj(v, path)
        _keys(d, path, ("file", "files"))
        files = _arr(_need(d, "files", path), f"{path}.files", max_len=16)
        return cls(file=_rel_path(_need(d, "file", path), f"{path}.file"),
                   files=tuple(_rel_path(f, f"{path}.files[{i}]") for i, f in enumerate(files)))


@dataclass(frozen=True)
class ModelEntry:
    """``models[name][precision]``: the model file, all its files (model + external data), its I/O.

    ``same_as``: ``"fp32"`` for entries that reuse the FP32 file (the decoders of the int8 pipeline).
    ``files``/``inputs``/``outputs`` are ``None`` when not recorded (hand-made bundles)."""

    file: str
    files: tuple[str, ...] | None = None
    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None
    same_as: str | None = None
    openvino: OpenVinoModel | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"file": self.file}
        if self.files is not None:
            d["files"] = list(self.files)
        if self.inputs is not None:
            d["inputs"] = [t.to_dict() for t in self.inputs]
        if self.outputs is not None:
            d["outputs"] = [t.to_dict() for t in self.outputs]
        if self.same_as is not None:
            d["same_as"] = self.same_as
        if self.openvino is not None:
            d["openvino"] = self.openvino.to_dict()
        return d

    @classmethod
    def from_dict(cls, v: Any, path: str) -> ModelEntry:
        d = _obj(v, path)
        _keys(d, path, ("file", "files", "inputs", "outputs", "same_as", "openvino"))
        files = _opt(d, "files", _arr, path, max_len=16)
        ios = {k: _opt(d, k, _arr, path, max_len=8) for k in ("inputs", "outputs")}
        return cls(file=_rel_path(_need(d, "file", path), f"{path}.file"),
                   files=None if files is None else tuple(_rel_path(f, f"{path}.files[{i}]")
                                                          for i, f in enumerate(files)),
                   inputs=None if ios["inputs"] is None else tuple(
                       TensorSpec.from_dict(t, f"{path}.inputs[{i}]") for i, t in enumerate(ios["inputs"])),
                   outputs=None if ios["outputs"] is None else tuple(
                       TensorSpec.from_dict(t, f"{path}.outputs[{i}]") for i, t in enumerate(ios["outputs"])),
                   same_as=_opt(d, "same_as", _str, path, ("fp32",)),
                   openvino=None if d.get("openvino") is None else OpenVinoModel.from_dict(d["openvino"],
                                                                                        f"{path}.openvino"))


@dataclass(frozen=True)
class FileRecord:
    """``files[relative path]``: sha256 (hex) and size in bytes (``None`` when not recorded)."""

    sha256: str
    bytes: int | None = None

    def to_dict(self) -> dict:
        return {"sha256": self.sha256} if self.bytes is None else {"sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, v: Any, path: str) -> FileRecord:
        d = _obj(v, path)
        _keys(d, path, ("sha256", "bytes"))
        sha = _str(_need(d, "sha256", path), f"{path}.sha256", max_len=64)
        if not _SHA256.fullmatch(sha):
            raise _fail(f"{path}.sha256", f"expected 64 lowercase hex digits, got {sha!r}")
        return cls(sha256=sha, bytes=_opt(d, "bytes", _int, path, 0, MAX_FILE_BYTES))


BOX_SOURCES = ("learned", "given", "first-pass")
"""Where an image's box comes from (the prompt policy's ``box_source``): ``learned`` (the learned prompt's
mean-mask box; none for a points prompt), ``given`` (the caller's, one per image) or ``first-pass`` (the bounding
box of the model's own first mask)."""


@dataclass(frozen=True)
class InferencePolicy:
    """``inference``: the runtime's default prompt policy and, when set, its check on the parity images (an open
    record).

    ``box_source`` is one of :data:`BOX_SOURCES`, or ``None`` (manifests before it): the prompt mode's own,
    ``given`` for ``box``/``both`` and ``learned`` otherwise. ``box_from_first_pass`` is its boolean alias
    (``box_source == "first-pass"``), still written for older readers; either one given sets the other.
    """

    box_from_first_pass: bool = False
    first_pass_check: dict | None = None
    box_source: str | None = None

    def __post_init__(self) -> None:
        if self.box_source is None:
            if self.box_from_first_pass:
                object.__setattr__(self, "box_source", "first-pass")
            return
        if self.box_source not in BOX_SOURCES:
            raise ValueError(f"box_source {self.box_source!r}: expected one of {', '.join(BOX_SOURCES)}")
        if self.box_from_first_pass and self.box_source != "first-pass":
            raise ValueError(f"box_from_first_pass is true but box_source is {self.box_source!r}")
        object.__setattr__(self, "box_from_first_pass", self.box_source == "first-pass")

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"box_from_first_pass": self.box_from_first_pass}
        if self.box_source is not None:
            d["box_source"] = self.box_source
        if self.first_pass_check is not None:
            d["first_pass_check"] = self.first_pass_check
        return d

    @classmethod
    def from_dict(cls, v: Any, path: str) -> InferencePolicy:
        d = _obj(v, path)
        _keys(d, path, ("box_from_first_pass", "box_source", "first_pass_check"))
        first_pass = _bool(d.get("box_from_first_pass", False), f"{path}.box_from_first_pass")
        source = _opt(d, "box_source", _str, path, BOX_SOURCES)
        if source is not None and "box_from_first_pass" in d and first_pass != (source == "first-pass"):
            raise _fail(f"{path}.box_source", f"{source!r} contradicts box_from_first_pass: {str(first_pass).lower()}")
        return cls(box_from_first_pass=first_pass, box_source=source,
                   first_pass_check=_opt(d, "first_pass_check", _obj, path))


@dataclass(frozen=True)
class ParityRecord:
    """``parity``: the export's gate. ``results[pipeline]`` are the figures of each exported pipeline
    (``"onnx-fp32/decoder"``...); ``source`` says which images (names and counts; ids only with
    provenance); ``machine`` the CPU the figures were measured on; ``postprocess`` whether the masks compared
    went through the run's clean-up (``lungsam.postprocess``; ``None`` in bundles from before it)."""

    min_agreement: float
    threshold: float
    results: dict[str, dict]
    source: dict = field(default_factory=dict)
    metric: str | None = None
    onnxruntime: str | None = None
    machine: dict = field(default_factory=dict)
    postprocess: bool | None = None
    timing: str | None = None
    max_int8_f1_drop: float | None = None
    in_graph: dict | None = None  # the in-graph path against the host path (lungsam.export.bundle.in_graph_check)
    max_jitter_log_odds_shift: float | None = None  # the gate at the quality flag's prompt variants (export.parity)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"min_agreement": self.min_agreement, "threshold": self.threshold, "source": self.source}
        if self.metric is not None:
            d["metric"] = self.metric
        if self.onnxruntime is not None:
            d["onnxruntime"] = self.onnxruntime
        if self.postprocess is not None:
            d["postprocess"] = self.postprocess
        if self.timing is not None:
            d["timing"] = self.timing
        if self.max_int8_f1_drop is not None:
            d["max_int8_f1_drop"] = self.max_int8_f1_drop
        if self.in_graph is not None:
            d["in_graph"] = self.in_graph
        if self.max_jitter_log_odds_shift is not None:
            d["max_jitter_log_odds_shift"] = self.max_jitter_log_odds_shift
        d.update(machine=self.machine, results=self.results)
        return d

    @classmethod
    def from_dict(cls, v: Any, path: str) -> ParityRecord:
        d = _obj(v, path)
        _keys(d, path, ("min_agreement", "threshold", "source", "metric", "onnxruntime", "machine", "results",
                        "postprocess", "timing", "max_int8_f1_drop", "in_graph", "max_jitter_log_odds_shift"))
        results = _obj(_need(d, "results", path), f"{path}.results")
        for k, r in results.items():
            _obj(r, f"{path}.results.{k}")
        return cls(min_agreement=_num(_need(d, "min_agreement", path), f"{path}.min_agreement", 0.0, 1.0),
                   threshold=_num(_need(d, "threshold", path), f"{path}.threshold", 0.0, 1.0, open_range=True),
                   results=results, source=_opt(d, "source", _obj, path) or {},
                   metric=_opt(d, "metric", _str, path, max_len=MAX_STRING),
                   onnxruntime=_opt(d, "onnxruntime", _str, path),
                   machine=_opt(d, "machine", _obj, path) or {},
                   postprocess=_opt(d, "postprocess", _bool, path),
                   timing=_opt(d, "timing", _str, path, max_len=MAX_STRING),
                   max_int8_f1_drop=_opt(d, "max_int8_f1_drop", _num, path, 0.0, 1.0),
                   in_graph=_opt(d, "in_graph", _obj, path),
                   max_jitter_log_odds_shift=_opt(d, "max_jitter_log_odds_shift", _num, path, 0.0, 100.0))


@dataclass(frozen=True)
class RunRecord:
    """``run``: the trained run the bundle came from, as an auditor needs it (no local paths unless the
    export asked for provenance: then ``source`` is the run folder).

    Attributes:
        name: the run folder's name; fold: the exported fold; decoder_weights/decoder_sha256: its weights.
        config: the run's training config (data set names, not paths, without provenance).
        checkpoint: the backbone weights used (file name, sha256, whether they are the official ones).
        fold_metrics / metrics: the fold's and the run's figures (no per-image ids).
    """

    fold: int | None = None
    name: str | None = None
    source: str | None = None
    decoder_weights: str | None = None
    decoder_sha256: str | None = None
    config: dict | None = None
    checkpoint: dict | None = None
    fold_metrics: dict | None = None
    metrics: dict | None = None

    _ORDER = ("source", "name", "fold", "decoder_weights", "decoder_sha256", "config", "checkpoint",
              "fold_metrics", "metrics")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self._ORDER}
        return {k: v for k, v in d.items() if v is not None or k == "metrics"}

    @classmethod
    def from_dict(cls, v: Any, path: str) -> RunRecord:
        d = _obj(v, path)
        _keys(d, path, cls._ORDER)
        sha = _opt(d, "decoder_sha256", _str, path, max_len=64)
        if sha is not None and not _SHA256.fullmatch(sha):
            raise _fail(f"{path}.decoder_sha256", f"expected 64 lowercase hex digits, got {sha!r}")
        return cls(fold=_opt(d, "fold", _int, path, 0, 1000), name=_opt(d, "name", _str, path),
                   source=_opt(d, "source", _str, path, max_len=MAX_STRING),
                   decoder_weights=_opt(d, "decoder_weights", _str, path), decoder_sha256=sha,
                   config=_opt(d, "config", _obj, path), checkpoint=_opt(d, "checkpoint", _obj, path),
                   fold_metrics=_opt(d, "fold_metrics", _obj, path), metrics=_opt(d, "metrics", _obj, path))


# ---------------------------------------------------------------------------------------------
# sections with cross-checks
# ---------------------------------------------------------------------------------------------

def read_preprocess(v: Any, path: str) -> PreprocessSpec:
    """``preprocess`` -> :class:`PreprocessSpec`, sizes in range and the model frame a multiple of the grid."""
    d = _obj(v, path)
    _keys(d, path, ("img_size", "normalization", "pixel_mean", "pixel_std", "embedding_size", "resize", "pad"))
    img = _int(_need(d, "img_size", path), f"{path}.img_size", *IMG_SIZE_RANGE)
    emb = _int(d.get("embedding_size", 64), f"{path}.embedding_size", *EMBEDDING_SIZE_RANGE)
    if img % emb:
        raise _fail(f"{path}.img_size", f"{img} is not a multiple of embedding_size {emb} (the encoder's grid)")

    def rgb(key: str, lo: float, default: tuple[float, float, float]) -> tuple[float, float, float]:
        vals = _arr(d.get(key, list(default)), f"{path}.{key}", length=3)
        return tuple(_num(x, f"{path}.{key}[{i}]", lo, 65535.0) for i, x in enumerate(vals))  # type: ignore

    base = PreprocessSpec(img_size=img)
    return PreprocessSpec(
        img_size=img, normalization=_str(d.get("normalization", "mean_std"), f"{path}.normalization", NORMALIZATIONS),
        pixel_mean=rgb("pixel_mean", -65535.0, base.pixel_mean), pixel_std=rgb("pixel_std", 1e-6, base.pixel_std),
        embedding_size=emb, resize=_str(d.get("resize", base.resize), f"{path}.resize", RESIZES),
        pad=_str(d.get("pad", base.pad), f"{path}.pad", PADS))


def _fractions(v: Any, path: str, n: int) -> list[float]:
    return [_num(x, f"{path}[{i}]", 0.0, 1.0) for i, x in enumerate(_arr(v, path, length=n))]


def read_prompt(v: Any, path: str) -> LearnedPrompt:
    """``prompt`` -> :class:`LearnedPrompt`: a known mode, points/labels where the mode uses them, every
    coordinate a finite fraction of the working frame (inside it), a box where the mode uses one."""
    d = _obj(v, path)
    _keys(d, path, ("mode", "points_per_lung", "points", "labels", "box", "frame"))
    mode = _str(_need(d, "mode", path), f"{path}.mode", PROMPT_MODES)
    k = _int(_need(d, "points_per_lung", path), f"{path}.points_per_lung", *POINTS_PER_LUNG_RANGE)
    _opt(d, "frame", _str, path)
    points = labels = box = None
    if mode in POINT_PROMPT_MODES or d.get("points") is not None:
        raw = _arr(_need(d, "points", path), f"{path}.points", max_len=MAX_POINTS)
        if not raw:
            raise _fail(f"{path}.points", f"prompt mode {mode!r} needs at least one point")
        points = np.asarray([_fractions(p, f"{path}.points[{i}]", 2) for i, p in enumerate(raw)], np.float32)
        lab = _arr(_need(d, "labels", path), f"{path}.labels", length=len(raw))
        labels = np.asarray([_int(x, f"{path}.labels[{i}]", 0, 1) for i, x in enumerate(lab)], np.int32)
    elif d.get("labels") is not None:
        raise _fail(f"{path}.labels", "labels without points")
    if mode in BOX_PROMPT_MODES or d.get("box") is not None:
        b = _fractions(_need(d, "box", path), f"{path}.box", 4)
        if b[0] > b[2] or b[1] > b[3]:
            raise _fail(f"{path}.box", f"{b} is not x0 <= x1, y0 <= y1")
        box = np.asarray(b, np.float32)
    return LearnedPrompt(mode=mode, points=points, labels=labels, box=box, points_per_lung=k)


def expected_io(name: str, spec: PreprocessSpec, dim: int | None) -> dict[str, tuple[int | None, ...]]:
    """The fixed dims of ``name``'s I/O (``None`` = a dynamic axis; ``dim`` = embedding channels, ``None``
    to skip that check): ``{tensor name: dims}``."""
    e, img = spec.embedding_size, spec.img_size
    emb = (None, dim, e, e)
    outs = {"low_res_logits": (None, 1, 4 * e, 4 * e), "iou_predictions": (None, 1)}
    full = (None, 1, None, None)  # at the original image size
    return {"encoder": {"image": (None, 3, img, img), "embeddings": emb},
            "decoder": {"embeddings": emb, "point_coords": (None, None, 2), "point_labels": (None, None), **outs},
            "decoder_fixed": {"embeddings": emb, **outs},
            "encoder_raw": {"image_u8": (1, None, None, None), "embeddings": emb},
            "decoder_mask": {"embeddings": emb, "original_hw": (2,), "mask": full, "probability": full,
                             "iou_predictions": (None, 1), "working_probability": (None, 1, None, None)}}[name]


def check_model_io(name: str, entry: ModelEntry, spec: PreprocessSpec, path: str) -> int | None:
    """Recorded I/O of one model against the format (names) and ``spec`` (shapes); returns its embedding
    channel count (``None`` when the entry records no I/O)."""
    if entry.inputs is None and entry.outputs is None:
        return None
    want_in, want_out = ONNX_IO[name]
    for key, have, want in (("inputs", entry.inputs, want_in), ("outputs", entry.outputs, want_out)):
        names = tuple(t.name for t in have or ())
        if names != want:
            raise _fail(f"{path}.{key}", f"names {list(names)}, the bundle format says {list(want)}")
    emb = next(t for t in (*entry.inputs, *entry.outputs) if t.name == "embeddings").shape  # type: ignore[misc]
    dim = emb[1] if len(emb) == 4 and isinstance(emb[1], int) else None
    if dim is None or not EMBED_DIM_RANGE[0] <= dim <= EMBED_DIM_RANGE[1]:
        where = "outputs[0]" if name == "encoder" else "inputs[0]"
        raise _fail(f"{path}.{where}.shape", f"embeddings {list(emb)}: the channel count is not an integer in "
                                             f"{EMBED_DIM_RANGE[0]}..{EMBED_DIM_RANGE[1]}")
    expected = expected_io(name, spec, dim)
    for key in ("inputs", "outputs"):
        for i, t in enumerate(getattr(entry, key)):
            want, p = expected[t.name], f"{path}.{key}[{i}].shape"
            if len(t.shape) != len(want) or any(w is not None and s != w for s, w in zip(t.shape, want)):
                raise _fail(p, f"{t.name} has shape {list(t.shape)}; this preprocess spec gives "
                               f"{['*' if w is None else w for w in want]}")
            if want[0] is None and not isinstance(t.shape[0], str):
                raise _fail(p, f"{t.name}: the batch axis must be dynamic (a name), got {t.shape[0]}")
            if t.dtype != IO_DTYPE_OF.get(t.name, "float32"):
                raise _fail(f"{path}.{key}[{i}].dtype", f"{t.name} is {t.dtype}; the bundle format says "
                                                        f"{IO_DTYPE_OF.get(t.name, 'float32')}")
    return dim


def read_files(v: Any, path: str) -> dict[str, FileRecord]:
    d = _obj(v, path)
    if not d:
        raise BundleIntegrityError(f"{path}: manifest lists no files to verify")
    if len(d) > MAX_FILES:
        raise _fail(path, f"{len(d)} files (at most {MAX_FILES})")
    return {_rel_path(rel, f"{path}[{rel[:80]!r}]"): FileRecord.from_dict(rec, f"{path}[{rel[:80]!r}]")
            for rel, rec in d.items()}


def read_models(v: Any, path: str, spec: PreprocessSpec, files: dict[str, FileRecord]
                ) -> dict[str, dict[str, ModelEntry]]:
    """``models`` -> ``{name: {precision: ModelEntry}}``: known names and precisions, an encoder and a
    decoder, files listed, I/O consistent with ``spec`` and across models, ``same_as`` entries reuse the
    FP32 file."""
    d = _obj(v, path)
    models: dict[str, dict[str, ModelEntry]] = {}
    dims: dict[str, int] = {}
    for name, precs in d.items():
        p = f"{path}.{name}"
        _str(name, p, ALL_MODEL_NAMES)
        entries = _obj(precs, p)
        models[name] = {}
        for prec, entry_d in entries.items():
            ep = f"{p}.{prec}"
            _str(prec, ep, PRECISIONS)
            entry = ModelEntry.from_dict(entry_d, ep)
            for i, rel in enumerate((entry.file, *(entry.files or ()))):
                if rel not in files:
                    raise BundleIntegrityError(f"{ep}.{'file' if i == 0 else f'files[{i - 1}]'}: {rel} is not "
                                               "listed in manifest.files (unverifiable)")
            if entry.files is not None and entry.file not in entry.files:
                raise _fail(f"{ep}.files", f"does not include the model file {entry.file}")
            if (dim := check_model_io(name, entry, spec, ep)) is not None:
                dims[ep] = dim
            models[name][prec] = entry
    _check_same_as(models, path)
    if "encoder" not in models or not set(DECODER_NAMES) & set(models):
        raise _fail(path, f"needs an encoder and a decoder (has: {', '.join(models) or 'none'})")
    if len(set(dims.values())) > 1:
        raise _fail(path, f"models disagree on the embeddings' channel count: {dims}")
    return models


def _check_same_as(models: dict[str, dict[str, ModelEntry]], path: str) -> None:
    for name, precs in models.items():
        for prec, e in precs.items():
            if e.same_as is None:
                continue
            ref = precs.get(e.same_as)
            if prec == e.same_as or ref is None or ref.file != e.file:
                raise _fail(f"{path}.{name}.{prec}.same_as",
                            f"says {e.same_as!r} but {name}.{e.same_as} is absent or names another file")


def _read_engines(v: Any, path: str, files: dict[str, FileRecord]) -> dict | list:
    """``engines`` as written by ``lungsam export --trt`` (``{name: record}``; ``{name: {precision: record}}``
    and a list of records with ``name``/``precision`` are read too): every record's ``file`` listed."""
    if isinstance(v, list):
        records = [(f"{path}[{i}]", r) for i, r in enumerate(_arr(v, path, max_len=32))]
    else:
        records = []
        for name, e in _obj(v, path).items():
            _str(name, f"{path}.{name}", MODEL_NAMES)
            e = _obj(e, f"{path}.{name}")
            records += ([(f"{path}.{name}", e)] if "file" in e else
                        [(f"{path}.{name}.{_str(p, f'{path}.{name}.{p}', PRECISIONS)}", r) for p, r in e.items()])
    for p, r in records:
        r = _obj(r, p)
        rel = _rel_path(_need(r, "file", p), f"{p}.file")
        if rel not in files:
            raise BundleIntegrityError(f"{p}.file: {rel} is not listed in manifest.files (unverifiable)")
        _opt(r, "precision", _str, p, PRECISIONS)
    return v


def _str_map(v: Any, path: str, keys: tuple[str, ...] | None = None) -> dict[str, str]:
    d = _obj(v, path)
    for k, x in d.items():
        if keys is not None:
            _str(k, f"{path}.{k}", keys)
        _str(x, f"{path}.{k}", max_len=MAX_STRING)
    return d


# ---------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------

#: ``quantization.int8.method`` of dynamic-INT8 bundles exported before it said ``"dynamic"``.
LEGACY_DYNAMIC_INT8_METHOD = "onnxruntime.quantization.quantize_dynamic"


@dataclass(eq=False)
class Manifest:
    """A validated ``manifest.json`` (see the module doc and docs/DEVELOPING.md).

    Attributes:
        format: :data:`BUNDLE_FORMAT`. backbone: registry name. created: UTC time of the export.
        preprocess: the backbone's input spec (model frame ``img_size``, grid ``embedding_size``).
        working_size: S of the working frame (learned prompts and thresholds live there).
        prompt: the run's learned prompt. threshold: probability threshold in (0, 1).
        inference: the default prompt policy. opset: ONNX opset. precisions: every precision present.
        models: ``{name: {precision: ModelEntry}}``. files: ``{relative path: FileRecord}``.
        quantization: open record per quantised precision. skipped: ``{model: why it was not exported}``.
        engines: TensorRT engine records. timing_cache: its file.
        postprocess, qc: open sections (mask clean-up, quality flags), ``None`` when absent.
        parity: the export's gate. run: the source run. export: the export's options (an open record).
        provenance: whether local paths, host names and
            held-out image ids were included (``lungsam export --provenance``). versions: packages.
    """

    format: str
    backbone: str
    preprocess: PreprocessSpec
    working_size: int
    prompt: LearnedPrompt
    threshold: float
    models: dict[str, dict[str, ModelEntry]]
    files: dict[str, FileRecord]
    created: str | None = None
    inference: InferencePolicy = field(default_factory=InferencePolicy)
    opset: int | None = None
    precisions: tuple[str, ...] | None = None
    quantization: dict | None = None
    skipped: dict[str, str] | None = None
    engines: dict | list | None = None
    timing_cache: str | None = None
    postprocess: dict | None = None
    qc: dict | None = None
    parity: ParityRecord | None = None
    run: RunRecord | None = None
    export: dict | None = None
    provenance: bool | None = None
    versions: dict[str, str] | None = None

    # -- reading ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, v: Any) -> Manifest:
        """Validate a parsed manifest (BundleError naming the key path on the first problem)."""
        path = "manifest"
        d = _obj(v, path)
        fmt = d.get("format")
        if fmt != BUNDLE_FORMAT:
            raise BundleError(f"{path}.format: unsupported bundle format {str(fmt)[:80]!r} (this runtime reads "
                              f"{BUNDLE_FORMAT!r})")
        _keys(d, path, KEY_ORDER)
        for k in REQUIRED_KEYS:
            _need(d, k, path)
        backbone = _str(d["backbone"], f"{path}.backbone", max_len=64)
        if not _NAME.fullmatch(backbone):
            raise _fail(f"{path}.backbone", f"{backbone!r} is not a backbone name")
        spec = read_preprocess(d["preprocess"], f"{path}.preprocess")
        files = read_files(d["files"], f"{path}.files")
        m = cls(format=fmt, backbone=backbone, preprocess=spec,
                working_size=_int(d["working_size"], f"{path}.working_size", *WORKING_SIZE_RANGE),
                prompt=read_prompt(d["prompt"], f"{path}.prompt"),
                threshold=_num(d["threshold"], f"{path}.threshold", 0.0, 1.0, open_range=True),
                models=read_models(d["models"], f"{path}.models", spec, files), files=files,
                created=_opt(d, "created", _str, path, max_len=64),
                inference=InferencePolicy.from_dict(d.get("inference") or {}, f"{path}.inference"),
                opset=_opt(d, "opset", _int, path, *OPSET_RANGE),
                precisions=_opt(d, "precisions", _precisions, path),
                quantization=_opt(d, "quantization", _obj, path),
                skipped=_opt(d, "skipped", _str_map, path, ALL_MODEL_NAMES),
                engines=_opt(d, "engines", _read_engines, path, files),
                timing_cache=_opt(d, "timing_cache", _rel_path, path),
                postprocess=_opt(d, "postprocess", _obj, path), qc=_opt(d, "qc", _obj, path),
                parity=_opt(d, "parity", ParityRecord.from_dict, path), run=_opt(d, "run", RunRecord.from_dict, path),
                export=_opt(d, "export", _obj, path), provenance=_opt(d, "provenance", _bool, path),
                versions=_opt(d, "versions", _str_map, path))
        m._cross_check(path)
        return m

    def _cross_check(self, path: str) -> None:
        have = sorted({p for precs in self.models.values() for p in precs})
        if self.precisions is not None and sorted(self.precisions) != have:
            raise _fail(f"{path}.precisions", f"{list(self.precisions)} but the models have {have}")
        if self.timing_cache is not None and self.timing_cache not in self.files:
            raise BundleIntegrityError(f"{path}.timing_cache: {self.timing_cache} is not listed in manifest.files")
        for name, precs in self.models.items():
            if "fp32" not in precs:
                raise _fail(f"{path}.models.{name}", f"has no fp32 entry (has {', '.join(precs) or 'none'})")
        self._check_graph_models(path)
        if "decoder_fixed" in self.models and self.prompt.mode in ("box", "both"):
            raise _fail(f"{path}.models.decoder_fixed", f"prompt mode {self.prompt.mode!r} needs each image's box; "
                                                        "no prompt can be baked into decoder_fixed")
        if self.inference.box_from_first_pass:
            if self.prompt.mode not in BOX_PROMPT_MODES:
                raise _fail(f"{path}.inference.box_from_first_pass",
                            f"needs a model prompted with a box, not prompt mode {self.prompt.mode!r}")
            if "decoder" not in self.models:
                raise _fail(f"{path}.inference.box_from_first_pass", "needs the prompted decoder (models.decoder)")
        if self.inference.box_source == "learned" and self.prompt.needs_ground_truth:
            raise _fail(f"{path}.inference.box_source", f"'learned': prompt mode {self.prompt.mode!r} has no learned "
                                                        "box (it needs each image's box: 'given' or 'first-pass')")

    def _check_graph_models(self, path: str) -> None:
        """The in-graph models come together, fp32 only, beside the ``decoder_fixed`` they were built from."""
        present = [n for n in GRAPH_MODEL_NAMES if self.models.get(n)]
        if not present:
            return
        if len(present) != len(GRAPH_MODEL_NAMES):
            raise _fail(f"{path}.models", f"has {present[0]} without {', '.join(set(GRAPH_MODEL_NAMES) - set(present))}"
                                          " (the in-graph models come as a pair)")
        for n in present:
            if set(self.models[n]) != {"fp32"}:
                raise _fail(f"{path}.models.{n}", f"in-graph models are fp32 only, got {sorted(self.models[n])}")
        if "decoder_fixed" not in self.models:
            raise _fail(f"{path}.models.decoder_mask", "needs decoder_fixed (the learned prompt it bakes in)")

    def graph_model_names(self) -> tuple[str, ...]:
        """The in-graph models present (:data:`GRAPH_MODEL_NAMES`, empty for a host-only bundle)."""
        return tuple(n for n in GRAPH_MODEL_NAMES if self.models.get(n))

    # -- writing ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON object, keys in :data:`KEY_ORDER`; absent optional sections are left out."""
        d: dict[str, Any] = {
            "format": self.format, "created": self.created, "backbone": self.backbone,
            "preprocess": self.preprocess.to_dict(), "working_size": self.working_size,
            "prompt": self.prompt.to_dict(), "threshold": self.threshold, "inference": self.inference.to_dict(),
            "opset": self.opset, "precisions": None if self.precisions is None else list(self.precisions),
            "models": {n: {p: e.to_dict() for p, e in precs.items()} for n, precs in self.models.items()},
            "quantization": self.quantization, "skipped": self.skipped, "engines": self.engines,
            "timing_cache": self.timing_cache, "postprocess": self.postprocess, "qc": self.qc,
            "parity": None if self.parity is None else self.parity.to_dict(),
            "run": None if self.run is None else self.run.to_dict(), "export": self.export,
            "provenance": self.provenance,
            "versions": self.versions, "files": {k: r.to_dict() for k, r in self.files.items()},
        }
        d["preprocess"]["pixel_mean"] = list(d["preprocess"]["pixel_mean"])
        d["preprocess"]["pixel_std"] = list(d["preprocess"]["pixel_std"])
        return {k: d[k] for k in KEY_ORDER if d[k] is not None}

    def to_bytes(self) -> bytes:
        """``manifest.json``'s bytes: strict JSON (no NaN/Infinity), indented, UTF-8, validated first (a
        manifest the runtime would refuse is never written)."""
        data = (json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8")
        parse_manifest(data, "manifest being written")
        return data

    # -- reading helpers ------------------------------------------------------------------------
    def model_names(self) -> tuple[str, ...]:
        """The models present, in :data:`MODEL_NAMES` order."""
        return tuple(n for n in MODEL_NAMES if self.models.get(n))

    def int8_method(self) -> str | None:
        """How the INT8 encoder was made (``quantization.int8.method``: ``"static"`` or ``"dynamic"``), None
        without one. Bundles exported before the dynamic record said ``"dynamic"`` named onnxruntime's function
        (:data:`LEGACY_DYNAMIC_INT8_METHOD`) instead."""
        method = ((self.quantization or {}).get("int8") or {}).get("method")
        return "dynamic" if method == LEGACY_DYNAMIC_INT8_METHOD else method

    def model_files(self) -> set[str]:
        """Every file a model entry, engine or timing cache names (all listed under ``files``)."""
        out = {f for precs in self.models.values() for e in precs.values() for f in (e.file, *(e.files or ()))}
        return out | ({self.timing_cache} if self.timing_cache else set())


def _precisions(v: Any, path: str) -> tuple[str, ...]:
    vals = tuple(_str(x, f"{path}[{i}]", PRECISIONS) for i, x in enumerate(_arr(v, path, max_len=len(PRECISIONS))))
    if len(set(vals)) != len(vals):
        raise _fail(path, f"repeats a precision: {list(vals)}")
    return vals
