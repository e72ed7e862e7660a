"""``lungsam predict --ray``: Ray Data + an actor pool on a real local Ray (2 CPUs, started and stopped here)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'lungsam[ray]')")
pytest.importorskip("ray.data", reason="ray[data] is not installed (pip install 'lungsam[ray]')")

from lungsam.runtime.predict import predict_files
from lungsam.runtime.ray_batch import (
    JOURNAL,
    RayBatchError,
    SegmenterOptions,
    predict_ray,
)
from lungsam.runtime.segmenter import LungSegmenter

from .conftest import MONTGOMERY, REPO

DEMO = REPO / "lungsam" / "demo_data" / "montgomery" / "images"


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs on loopback, dashboard and usage stats off; shut down after the module."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    """The 16 packaged demo images, a few real 512x512 Montgomery ones when present, and one broken file."""
    d = tmp_path_factory.mktemp("ray_inputs")
    files = sorted(DEMO.glob("*.png"))
    if MONTGOMERY.exists():
        files += sorted((MONTGOMERY / "images").glob("*.png"))[:4]
    for f in files:
        shutil.copy(f, d / f"{f.parent.parent.name}_{f.name}")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return sorted(d.iterdir())


@pytest.fixture(scope="module")
def plain(tiny_bundle, inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    predict_files(LungSegmenter.load(tiny_bundle), inputs, out)
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def same_outputs(a: Path, b: Path) -> None:
    """Same records (timings aside) in the same order, and byte-identical masks."""
    ra, rb = records(a), records(b)
    for r in ra + rb:
        r.pop("timings")
    assert ra == rb
    for r in ra:
        if r["status"] == "ok":
            assert (a / r["mask"]).read_bytes() == (b / r["mask"]).read_bytes(), r["mask"]


def test_ray_outputs_equal_plain_predict_and_rerun_skips_complete(local_ray, tiny_bundle, inputs, plain, tmp_path):
    out = tmp_path / "ray"
    s = predict_ray(tiny_bundle, inputs, out, workers=2, block_size=3)
    assert (s.ok, s.failed) == (len(inputs) - 1, 1)
    same_outputs(plain, out)
    meta = json.loads((out / "predict.json").read_text())
    assert meta["ray"]["ran"] == len(inputs) and meta["ray"]["duplicate_rows"] == 0
    assert meta["segmenter"]["backend"] == "onnxruntime" and not (out / JOURNAL).exists()

    # rerun: a lost mask and the failed input are redone, the rest skipped
    lost = next(r for r in records(out) if r["status"] == "ok")
    (out / lost["mask"]).unlink()
    s = predict_ray(tiny_bundle, inputs, out, workers=1, block_size=4)
    meta = json.loads((out / "predict.json").read_text())
    assert meta["ray"]["ran"] == 2 and meta["ray"]["skipped_complete"] == len(inputs) - 2
    same_outputs(plain, out)

    # everything complete but the broken input, which is tried again (failures are never "complete")
    predict_ray(tiny_bundle, inputs, out)
    assert json.loads((out / "predict.json").read_text())["ray"]["ran"] == 1
    same_outputs(plain, out)

    # other options into the same folder are refused, not mixed
    with pytest.raises(RayBatchError, match="another bundle or options"):
        predict_ray(tiny_bundle, inputs, out, options=SegmenterOptions(overlay=True))


def test_ray_flags_at_a_site_line_and_refuses_to_mix_it_into_a_folder_without(local_ray, tiny_bundle, inputs, plain,
                                                                              tmp_path):
    from click.testing import CliRunner

    from lungsam.cli import main
    from lungsam.qc_site import write_site_file
    from lungsam.runtime.site_line import site_line_from_run

    site = tmp_path / "site.json"
    write_site_file(site, site_line_from_run(tiny_bundle, plain, 0.25, min_images=16))
    out = tmp_path / "ray_site"
    predict_ray(tiny_bundle, inputs, out, workers=1, options=SegmenterOptions(qc_site=str(site)))
    line = json.loads(site.read_text())["flag_below"]
    ok = [r for r in records(out) if r["status"] == "ok"]
    assert [r["qc"]["score"] for r in ok] == [r["qc"]["score"] for r in records(plain) if r["status"] == "ok"]
    assert [r["qc"]["flag"] for r in ok] == [r["qc"]["score"] < line for r in ok]
    assert json.loads((out / "predict.json").read_text())["segmenter"]["qc_operating_point"]["source"] == "site"
    with pytest.raises(RayBatchError, match="another bundle or options"):
        predict_ray(tiny_bundle, inputs, out, workers=1)  # the same folder at the bundle's line
    d = json.loads(site.read_text())
    d["bundle_digest"] = "cd" * 32
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    r = CliRunner().invoke(main, ["predict", str(tiny_bundle), *map(str, inputs), "--out", str(tmp_path / "x"),
                                  "--qc-site", str(other), "--ray", "local"])
    assert r.exit_code == 1 and "made for bundle cdcdcdcd" in r.output and not (tmp_path / "x").exists()


def test_ray_writes_the_same_dicom_seg_and_sr_as_plain_predict(local_ray, tiny_bundle, tmp_path):
    pytest.importorskip("highdicom", reason="highdicom is not installed (pip install 'lungsam[dicom]')")
    from lungsam.runtime.dicom_out import dicom_record_hook, read_seg_masks

    from .dicom_samples import write_chest_dicom

    files = [write_chest_dicom(p, tmp_path / "in" / f"{p.stem}.dcm", index=i)
             for i, p in enumerate(sorted(DEMO.glob("*.png"))[:2])]
    seg = LungSegmenter.load(tiny_bundle)
    predict_files(seg, files, tmp_path / "plain", record_hook=dicom_record_hook(seg.bundle, sr=True))
    s = predict_ray(tiny_bundle, files, tmp_path / "ray", options=SegmenterOptions(dicom_seg=True, sr=True))
    assert (s.ok, s.failed) == (2, 0)
    same_outputs(tmp_path / "plain", tmp_path / "ray")  # the records name the same SEG/SR instances
    for r in records(tmp_path / "ray"):
        assert (tmp_path / "ray" / r["dicom"]["sr"]).is_file()
        a, b = (read_seg_masks(tmp_path / d / r["dicom"]["seg"]) for d in ("ray", "plain"))
        assert all((a[k] == b[k]).all() for k in ("right", "left"))


def _actor_processes() -> list:
    import psutil

    me = psutil.Process()
    return [p for p in me.children(recursive=True) if "SegmentBlocks" in " ".join(_cmdline(p))]


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001 -- a process that ended or is not ours
        return []


def test_ray_worker_killed_mid_run_loses_and_duplicates_nothing(local_ray, tiny_bundle, inputs, plain, tmp_path):
    pytest.importorskip("psutil", reason="psutil finds the actor process to kill")
    out = tmp_path / "killed"
    first = threading.Event()
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = predict_ray(tiny_bundle, inputs, out, workers=2, block_size=1,
                                            on_record=lambda rec: first.set())
        except BaseException as e:  # noqa: BLE001 -- reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    assert first.wait(60), "no record arrived within 60 s"
    victims = _actor_processes()
    assert victims, "no SegmentBlocks actor process found"
    n_before = len((out / JOURNAL).read_text().splitlines())
    os.kill(victims[0].pid, signal.SIGKILL)
    t.join(90)
    assert not t.is_alive(), "the run did not finish within 90 s after the kill"
    assert "error" not in result, result.get("error")
    assert n_before < len(inputs), "the run had finished before the kill; nothing was tested"
    meta = json.loads((out / "predict.json").read_text())
    assert meta["ray"]["duplicate_rows"] == 0
    recs = records(out)
    assert [r["file"] for r in recs] == [str(p) for p in inputs]  # one record per input, in input order
    same_outputs(plain, out)


@pytest.mark.slow
def test_reproduce_on_ray_records_the_same_steps_and_a_plain_rerun_reuses_them(tmp_path):
    """``lungsam reproduce --ray``: the quick tiny protocol's training steps as Ray tasks on a local Ray (started
    and stopped by the command); a rerun without --ray reuses every step (same step records and settings).
    About 5 min on the shared 2-core machine (U-Net steps dominate), hence slow."""
    from click.testing import CliRunner

    from lungsam.cli import main
    from lungsam.data import demo_data_dir

    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path / "cxr"
    for name in ("montgomery", "shenzhen"):
        shutil.copytree(demo_data_dir(), root / name, ignore=shutil.ignore_patterns("README*"))
    args = ["reproduce", "--data-root", str(root), "--backbone", "tiny", "--quick", "--epochs", "1", "--subset", "10",
            "--size", "64", "--out", str(tmp_path / "results"), "--quiet", "--device", "cpu"]
    r = CliRunner().invoke(main, [*args, "--ray", "local"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results" / "tiny" / "results.json").read_text())
    trained = [s for s in res["steps"] if s["kind"] in ("grid", "k-fold", "pooled", "unet") and s["status"] == "ran"]
    assert len(trained) >= 10 and all(s["info"]["ray"] == "local" for s in trained)
    assert res["settings"]["ray"] == "local" and res["command"].endswith("--ray local")
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0 and "(0 ran," in again.output, again.output
