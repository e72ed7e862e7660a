"""The schema of ``results.json`` written by ``lungsam bench`` and a small validator for it.

The schema is written in a JSON-Schema subset (``type``, ``properties``, ``required``,
``additionalProperties``, ``items``, ``enum``, ``minimum``, ``maximum``, ``const``), validated by
:func:`validate` without third-party packages. ``docs/benchmarks.md`` documents every field.
"""
from __future__ import annotations

import math
from typing import Any

from ..errors import LungsamError

BACKENDS = ("torch", "onnxruntime", "tensorrt", "openvino")
# bf16: torch on GPU, OpenVINO on CPUs with native bfloat16; int8: onnxruntime / OpenVINO on CPU only
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

FORMAT = "lungsam-bench/1"

NUM = {"type": "number"}
NUM_OR_NULL = {"type": ["number", "null"]}
STR_OR_NULL = {"type": ["string", "null"]}

SUMMARY = {  # metrics.summarize
    "type": "object", "required": ["mean", "std", "min", "max", "n"],
    "properties": {"mean": NUM, "std": NUM, "min": NUM, "max": NUM, "n": {"type": "integer", "minimum": 0}},
}
LATENCY = {  # stats.latency_summary, milliseconds
    "type": "object", "required": ["p50", "p95", "p99", "mean", "min", "max", "n"],
    "properties": ({k: NUM for k in ("p50", "p95", "p99", "mean", "min", "max")}
                   | {"n": {"type": "integer", "minimum": 0}}),
}
THROUGHPUT = {
    "type": "object", "required": ["batch", "images", "wall_s", "images_per_s", "ms_per_image", "batch_latency_ms"],
    "properties": {"batch": {"type": "integer", "minimum": 1}, "images": {"type": "integer", "minimum": 1},
                   "wall_s": {"type": "number", "minimum": 0}, "images_per_s": {"type": "number", "minimum": 0},
                   "ms_per_image": {"type": "number", "minimum": 0}, "batch_latency_ms": LATENCY,
                   "stage_ms_per_image": {"type": "object", "required": ["preprocess", "encoder", "decoder",
                                                                         "postprocess"],
                                          "properties": {k: NUM for k in ("preprocess", "encoder", "decoder",
                                                                          "postprocess")}},
                   "images_per_s_without_preprocess": NUM_OR_NULL},
}
RESULT = {
    "type": "object",
    "required": ["backend", "precision", "device", "status", "reason"],
    "properties": {
        "backend": {"type": "string", "enum": list(BACKENDS)},
        "precision": {"type": "string", "enum": list(PRECISIONS)},
        "device": {"type": "string", "enum": ["cpu", "cuda"]},
        "status": {"type": "string", "enum": ["ok", "skipped", "failed"]},
        "reason": STR_OR_NULL,
        "mode": STR_OR_NULL,
        "providers": {"type": ["array", "null"], "items": {"type": "string"}},
        "accuracy": {"type": "object", "required": ["f1", "iou"], "properties": {"f1": SUMMARY, "iou": SUMMARY}},
        "parity": {
            "type": "object", "required": ["mask_f1", "max_abs_logit_diff", "changed_masks", "n"],
            "properties": {"mask_f1": SUMMARY, "max_abs_logit_diff": {"type": "number", "minimum": 0},
                           "changed_masks": {"type": "integer", "minimum": 0}, "n": {"type": "integer", "minimum": 0}},
        },
        "latency_ms": {"type": "object", "required": ["preprocess", "encoder", "decoder", "postprocess", "end_to_end"],
                       "properties": {k: LATENCY for k in ("preprocess", "encoder", "decoder", "postprocess",
                                                           "end_to_end")}},
        "throughput": {"type": "array", "items": THROUGHPUT},
        "memory": {"type": "object", "required": ["peak_rss_mb"],
                   "properties": {"peak_rss_mb": NUM_OR_NULL, "rss_growth_mb": NUM_OR_NULL,
                                  "gpu_peak_mb": NUM_OR_NULL, "python_peak_mb": NUM_OR_NULL}},
        "vs_reference": {"type": "object", "properties": {"end_to_end_p50": NUM_OR_NULL,
                                                          "end_to_end_mean": NUM_OR_NULL,
                                                          "best_throughput": NUM_OR_NULL}},
        "setup_s": NUM_OR_NULL,
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}
RESULTS_SCHEMA = {
    "type": "object",
    "required": ["format", "created", "command", "bundle", "data", "settings", "machine", "versions", "reference",
                 "results"],
    "properties": {
        "format": {"const": FORMAT},
        "created": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "bundle": {"type": "object",
                   "required": ["path", "backbone", "working_size", "img_size", "prompt", "threshold"],
                   "properties": {"path": {"type": "string"}, "backbone": {"type": "string"},
                                  "working_size": {"type": "integer", "minimum": 1},
                                  "img_size": {"type": "integer", "minimum": 1}, "prompt": {"type": "string"},
                                  "threshold": {"type": "number", "minimum": 0, "maximum": 1},
                                  "box_source": STR_OR_NULL,
                                  "run": STR_OR_NULL, "fold": {"type": ["integer", "null"]},
                                  "int8_method": STR_OR_NULL}},
        "data": {"type": "object", "required": ["source", "n_images", "ids"],
                 "properties": {"source": {"type": "string"}, "n_images": {"type": "integer", "minimum": 1},
                                "ids": {"type": "array", "items": {"type": "string"}}}},
        "settings": {"type": "object",
                     "required": ["device", "backends", "precisions", "batches", "warmup", "repeats", "threads"],
                     "properties": {"device": {"type": "string", "enum": ["cpu", "cuda"]},
                                    "backends": {"type": "array", "items": {"type": "string"}},
                                    "precisions": {"type": "array", "items": {"type": "string"}},
                                    "batches": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                                    "warmup": {"type": "integer", "minimum": 0},
                                    "repeats": {"type": "integer", "minimum": 1},
                                    "threads": {"type": ["integer", "null"]},
                                    "preprocess_threads": {"type": "integer", "minimum": 1}}},
        "machine": {"type": "object", "required": ["cpu", "cpu_count", "gpu"],
                    "properties": {"cpu": {"type": "string"}, "cpu_count": {"type": ["integer", "null"]},
                                   "gpu": {"type": ["object", "null"]}}},
        "versions": {"type": "object", "required": ["python"]},
        "reference": {"type": "object", "required": ["backend", "precision", "status"],
                      "properties": {"backend": {"const": "torch"}, "precision": {"const": "fp32"},
                                     "status": {"type": "string", "enum": ["ok", "skipped", "failed"]}}},
        "results": {"type": "array", "items": RESULT},
        "wall_s": NUM_OR_NULL,
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":  # NaN/inf are not valid JSON numbers
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, _TYPES[t])


def validate(obj: Any, schema: dict, path: str = "$") -> list[str]:
    """All violations of ``schema`` by ``obj``, each as ``"<json path>: <problem>"`` (empty when valid)."""
    errors: list[str] = []
    if "const" in schema and obj != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, got {obj!r}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(obj, t) for t in types):
            errors.append(f"{path}: expected {' or '.join(types)}, got {type(obj).__name__} {obj!r:.60}")
            return errors
    if "enum" in schema and obj not in schema["enum"]:
        errors.append(f"{path}: {obj!r} is not one of {schema['enum']}")
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        if "minimum" in schema and obj < schema["minimum"]:
            errors.append(f"{path}: {obj} < minimum {schema['minimum']}")
        if "maximum" in schema and obj > schema["maximum"]:
            errors.append(f"{path}: {obj} > maximum {schema['maximum']}")
    if isinstance(obj, dict):
        for key in schema.get("required", []):
            if key not in obj:
                errors.append(f"{path}: missing required key {key!r}")
        props = schema.get("properties", {})
        for key, value in obj.items():
            if key in props:
                errors.extend(validate(value, props[key], f"{path}.{key}"))
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected key {key!r}")
    if isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            errors.extend(validate(item, schema["items"], f"{path}[{i}]"))
    return errors


def _check_result_consistency(results: dict) -> list[str]:
    """Rules the schema cannot express: an ``ok`` result has numbers, a skipped one has a reason and none."""
    errors = []
    for i, r in enumerate(results.get("results", []) if isinstance(results, dict) else []):
        if not isinstance(r, dict):
            continue
        where = f"$.results[{i}] ({r.get('backend')}/{r.get('precision')})"
        if r.get("status") == "ok":
            for key in ("accuracy", "latency_ms", "throughput"):
                if key not in r:
                    errors.append(f"{where}: status ok but no {key!r}")
        else:
            if not r.get("reason"):
                errors.append(f"{where}: status {r.get('status')!r} needs a reason")
            for key in ("accuracy", "parity", "latency_ms", "throughput"):
                if key in r:
                    errors.append(f"{where}: status {r.get('status')!r} must not carry {key!r}")
    return errors


def validate_results(results: Any) -> list[str]:
    """Violations of the ``results.json`` schema plus the ok/skipped consistency rules."""
    return validate(results, RESULTS_SCHEMA) + _check_result_consistency(results)


class SchemaError(LungsamError, ValueError):
    pass


def check_results(results: Any) -> None:
    """Raise :class:`SchemaError` listing every violation (first 20)."""
    errs = validate_results(results)
    if errs:
        more = f"\n... and {len(errs) - 20} more" if len(errs) > 20 else ""
        raise SchemaError("results.json does not match its schema:\n" + "\n".join(errs[:20]) + more)
