"""The CPU table over several bench results (issue 19): one row per backbone x size x backend x precision, the
Pareto front of F1 against end-to-end time marked across bundles."""
from __future__ import annotations

import pytest

from lungsam.benchmarks import report, stats

pytestmark = pytest.mark.fast


def _row(backend, precision, f1, e2e, mode=None, agreement=0.995):
    lat = {"p50": e2e, "p95": e2e * 1.5, "p99": e2e * 2, "mean": e2e, "min": e2e, "max": e2e * 2, "n": 4}
    return {"backend": backend, "precision": precision, "device": "cpu", "status": "ok", "reason": None, "mode": mode,
            "accuracy": {"f1": {"mean": f1, "std": 0.01, "min": f1 - 0.05, "max": f1, "n": 4}},
            "parity": {"mask_f1": {"mean": agreement, "min": agreement - 0.01}},
            "latency_ms": {s: {**lat, "p50": e2e / 4} for s in stats.STAGES} | {"end_to_end": lat},
            "memory": {"rss_growth_mb": 100.0}, "vs_reference": {"end_to_end_p50": e2e / 4000}}


def _res(backbone, size, rows):
    return {"bundle": {"backbone": backbone, "img_size": size, "path": f"/b/{backbone}{size}"},
            "machine": {"cpu_features": {"model": "Xeon", "affinity_cpus": 2,
                                         "isa": {"avx2": True, "avx512_vnni": True, "avx512_bf16": False,
                                                 "amx_tile": False}}},
            "results": rows}


def test_pareto_front_marks_exactly_the_undominated_rows():
    rows = [{"f1": 0.97, "e2e_p50": 500}, {"f1": 0.98, "e2e_p50": 900}, {"f1": 0.96, "e2e_p50": 600},
            {"f1": 0.97, "e2e_p50": 500}, {"f1": 0.95, "e2e_p50": 300}]
    # row 2 is dominated by row 0 (better F1, faster); the two equal rows 0 and 3 do not dominate each other
    assert report.pareto_front(rows) == [True, True, False, True, True]


def test_cpu_table_spans_bundles_and_marks_the_front_across_them():
    skipped = {"backend": "openvino", "precision": "int8", "device": "cpu", "status": "skipped", "reason": "no IR"}
    a = _res("mobile_sam", 1024, [_row("torch", "fp32", 0.965, 4000, "eager", 1.0),
                                  _row("onnxruntime", "int8", 0.964, 1500), skipped])
    b = _res("lite_medsam", 192, [_row("torch", "fp32", 0.977, 3000, "eager", 1.0),
                                  _row("openvino", "int8", 0.976, 450)])
    md = report.cpu_table([a, b])
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4  # header + the ok rows of both bundles; the skipped row is left out
    assert all(line.count("|") == table[0].count("|") for line in table)
    front = [line for line in table[1:] if line.rstrip().endswith("**yes** |")]
    # the front across both bundles: LiteMedSAM's torch row (best F1) and its OpenVINO int8 row (fastest)
    assert len(front) == 2 and all("lite_medsam" in line for line in front)
    assert "| mobile_sam | 1024 | onnxruntime | int8 | 0.9640" in md and "0.38x" in md and "reference" in md
    assert md.splitlines()[0].startswith("Machine: Xeon (2 cores): avx2 avx512_vnni; no avx512_bf16/amx_tile")


def test_cpu_table_tells_static_from_dynamic_int8_bundles():
    static = _res("mobile_sam", 1024, [_row("torch", "fp32", 0.965, 4000, "eager", 1.0),
                                       _row("onnxruntime", "int8", 0.964, 1500), _row("openvino", "int8", 0.964, 900)])
    dynamic = _res("mobile_sam", 1024, [_row("torch", "fp32", 0.965, 4000, "eager", 1.0),
                                        _row("onnxruntime", "int8", 0.963, 1700)])
    static["bundle"]["int8_method"], dynamic["bundle"]["int8_method"] = "static", "dynamic"
    md = report.cpu_table([static, dynamic])
    assert "| mobile_sam | 1024 | onnxruntime | int8 (static) | 0.9640" in md
    assert "| mobile_sam | 1024 | openvino | int8 (static) |" in md
    assert "| mobile_sam | 1024 | onnxruntime | int8 (dynamic) | 0.9630" in md
    assert "fp32 (" not in md  # only int8 rows carry the method
