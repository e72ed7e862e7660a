"""``ExportOptions`` (lungsam/export/config.py): one definition of the export's options. It validates itself,
``lungsam export``'s options are generated from its fields (same defaults, same rules), and the bundle manifest
records what the export was asked for."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest
from click.testing import CliRunner

from lungsam.cli import main
from lungsam.errors import ConfigError
from lungsam.export.commands import export
from lungsam.export.config import INT8_ONLY, ExportOptions
from lungsam.options import config_values


@pytest.mark.parametrize("bad", [{"int8_method": "dynamc"}, {"opset": 12}, {"opset": 24}, {"min_agreement": 1.5},
                                 {"calibration_images": 0}, {"max_int8_f1_drop": -0.1}, {"max_batch": 0},
                                 {"max_int8_f1_drop": float("nan")}])
def test_export_options_refuse_bad_values(bad):
    name = next(iter(bad))
    with pytest.raises(ConfigError, match=f"ExportOptions.{name}"):
        ExportOptions(**bad)


def test_trt_implies_fp16_models():
    assert not ExportOptions().writes_fp16
    assert ExportOptions(fp16=True).writes_fp16 and ExportOptions(trt=True).writes_fp16


def test_cli_options_come_from_the_dataclass(tmp_path):
    names = {p.name: p for p in export.params}
    assert all(f.name in names for f in fields(ExportOptions)), "an ExportOptions field without its option"
    assert names["in_graph"].opts == ["--in-graph-preprocess"]
    assert set(INT8_ONLY) <= {f.name for f in fields(ExportOptions)}
    ctx = export.make_context("export", [str(tmp_path), "--out", str(tmp_path / "b")])
    assert ExportOptions(**config_values(ExportOptions, ctx.params)) == ExportOptions()  # the same defaults
    ctx = export.make_context("export", [str(tmp_path), "--out", "b", "--int8", "--int8-method", "dynamic",
                                         "--opset", "18", "--in-graph-preprocess"])
    assert ExportOptions(**config_values(ExportOptions, ctx.params)) == ExportOptions(
        int8=True, int8_method="dynamic", opset=18, in_graph=True)


@pytest.mark.parametrize("argv, why", [(["--opset", "12"], "--opset"), (["--min-agreement", "2"], "--min-agreement"),
                                       (["--int8", "--calibration-images", "0"], "--calibration-images"),
                                       (["--int8", "--int8-method", "x"], "--int8-method"),
                                       (["--calibration-images", "8"], "--calibration-images only apply with --int8"),
                                       (["--no-openvino-int8"], "--openvino-int8 only apply with --int8")])
def test_cli_refuses_before_any_work(tmp_path, argv, why):
    run = tmp_path / "run"
    run.mkdir()
    res = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "b"), *argv])
    assert res.exit_code == 2, res.output
    assert why in res.output
    assert not (tmp_path / "b").exists()


def test_manifest_records_the_export_options(tiny_both_bundle):
    from lungsam.manifest import Manifest

    _, bundle = tiny_both_bundle
    m = Manifest.from_dict(json.loads((bundle / "manifest.json").read_text()))
    assert m.export == ExportOptions(box_from_first_pass=True, provenance=True).to_dict()
    assert m.inference.box_from_first_pass and m.provenance


def test_int8_hint_names_the_option_for_what_failed():
    from lungsam.export.bundle import int8_hint

    only_ov = int8_hint("static", 32, ["openvino-int8/decoder", "openvino-int8/decoder_fixed"])
    assert "--no-openvino-int8" in only_ov and "onnxruntime's static INT8 passed" in only_ov
    both = int8_hint("static", 32, ["onnx-int8/decoder", "openvino-int8/decoder"])
    assert "--no-openvino-int8" not in both and "--int8-method dynamic" in both
    assert "--int8-method static" in int8_hint("dynamic", 32, ["onnx-int8/decoder"])
