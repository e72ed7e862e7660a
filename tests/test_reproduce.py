"""``lungsam reproduce`` end to end on the tiny backbone: tables, results.json schema, resumability."""
import json
import re
import shutil

import pytest
from click.testing import CliRunner

from lungsam.cli import main
from lungsam.data import demo_data_dir
from lungsam.reproduce import paper
from lungsam.reproduce.protocol import ProtocolError, protocol_settings
from lungsam.train.config import DEFAULT_THRESHOLDS


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cxr")
    for name in ("montgomery", "shenzhen"):
        shutil.copytree(demo_data_dir(), root / name, ignore=shutil.ignore_patterns("README*"))
    return root


def _invoke(args):
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def reproduced(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    args = ["reproduce", "--data-root", str(data_root), "--backbone", "tiny", "--quick", "--epochs", "1",
            "--subset", "10", "--size", "64", "--out", str(out), "--quiet", "--device", "cpu"]
    first = _invoke(args)
    return out / "tiny", args, first


def test_tables_md_has_tables_1_to_9_with_paper_numbers(reproduced):
    root, _, _ = reproduced
    md = (root / "tables.md").read_text()
    for i in range(1, 11):
        assert re.search(rf"^## Table {i}:", md, re.M), f"Table {i} missing"
    for v in ("0.718", "0.860", "0.848", "0.782", "0.726", "0.863", "0.924", "0.933", "0.943 ± 0.007",
              "0.915 ± 0.011", "0.973", "0.941"):
        assert v in md, v
    assert "n/a" in md  # box/both k-fold rows and the threshold tables have no transcribed paper values
    assert md.count("_Command: `lungsam reproduce --data-root") >= 10  # every table states its provenance
    assert "machine:" in md and "time taken:" in md
    assert "split 0's training part" in md  # the zero-shot prompt source is stated
    unet_row = next(line for line in md.splitlines() if line.startswith("| U-Net (ours"))
    assert "not run yet" not in unet_row and "points minus our U-Net" in md


def test_results_json_schema(reproduced):
    root, _, _ = reproduced
    res = json.loads((root / "results.json").read_text())
    assert res["format"] == "lungsam-reproduce/1" and res["backbone"] == "tiny" and res["profile"] == "quick"
    for k in ("command", "machine", "versions", "started", "finished", "wall_time_s", "settings", "data", "steps",
              "tables", "paper", "estimate", "paths"):
        assert k in res, k
    t = res["tables"]
    assert set(t) == {"zero_shot", "threshold_sweep", "grid", "best_hyperparameters", "kfold", "cross_dataset", "unet",
                      "pooled"}
    po = t["pooled"]
    assert po["out"].startswith("runs/pooled/points_") and po["folds"] == 1
    for s in ("montgomery", "shenzhen"):
        own = po["per_set"][s]["own_set_run"]
        assert po["per_set"][s]["n"] == 2 and own is not None  # the same 2 test images as the set's own run
        assert own["better"] + own["worse"] <= 2 and -1 <= own["delta_f1"] <= 1
    for s in ("montgomery", "shenzhen"):
        assert res["data"][s]["n_used"] == 10 and res["data"][s]["n_source"] == 16
        assert set(t["zero_shot"][s]) == {"box", "points", "both", "auto-box"}
        assert t["zero_shot"][s]["box"]["paper_f1"] == paper.ZERO_SHOT[s]["box"]
        assert t["zero_shot"][s]["auto-box"]["paper_f1"] == "n/a"
        assert 0.0 <= t["zero_shot"][s]["points"]["f1"]["mean"] <= 1.0
        assert set(t["kfold"][s]) == {"points", "box", "both", "auto-box"}
        assert t["kfold"][s]["points"]["paper_f1"] == paper.KFOLD[s]["points"] and t["kfold"][s]["box"]["paper_f1"] == "n/a"
        assert tuple(r["threshold"] for r in t["threshold_sweep"][s]["points"]) == DEFAULT_THRESHOLDS  # 0.05-0.95
        assert len(t["grid"][s]) == 2 and sum(c["chosen"] for c in t["grid"][s]) == 1
    assert set(t["cross_dataset"]) == {"shenzhen->montgomery", "montgomery->shenzhen"}
    assert t["cross_dataset"]["shenzhen->montgomery"]["paper_f1"] == "0.924"
    kinds = [s["kind"] for s in res["steps"]]
    # 2 encodes + 2x4 zero-shot + 2x2 grid + 2x4 prompts (points reuses its grid cell: same settings) + 2 cross
    assert kinds.count("encode") == 2 and kinds.count("zero-shot") == 8 and kinds.count("cross") == 2
    assert kinds.count("grid") == 4 and kinds.count("k-fold") == 8 and kinds.count("pooled") == 1
    assert kinds.count("unet") == 2
    for s in ("montgomery", "shenzhen"):
        u = t["unet"][s]["ours_unet"]
        assert u["out"].startswith(f"runs/{s}-n10/unet_k1_") and u["folds"] == 1 and u["parameters"] > 0
        assert u["points_vs_unet"]["n"] == 2  # paired on the same 2 test images as the points run
    assert all(s["seconds"] >= 0 for s in res["steps"])
    shared = [s for s in res["steps"] if s["status"] != "ran"]
    assert [(s["kind"], s["status"].split(":")[0]) for s in shared] == [("k-fold", "shared with")] * 2
    for f in res["paths"]["figures"]:
        assert (root / f).exists(), f
    assert any("learning_curve" in f for f in res["paths"]["figures"])
    assert any("overlays" in f for f in res["paths"]["figures"])
    assert res["estimate"]["train_s_per_image_epoch"] > 0


def test_second_invocation_reuses_every_step(reproduced):
    root, args, _ = reproduced
    before = json.loads((root / "results.json").read_text())
    r = _invoke(args)
    assert "(0 ran," in r.output
    res = json.loads((root / "results.json").read_text())
    assert all(s["status"] == "reused" or s["status"].startswith("shared with") for s in res["steps"])
    assert res["tables"]["kfold"] == before["tables"]["kfold"]
    assert res["tables"]["zero_shot"] == before["tables"]["zero_shot"]


def test_killed_training_step_resumes(reproduced):
    """A training step without step.json (killed) is continued with train_run(resume=True) and then recorded."""
    root, args, _ = reproduced
    step = next(p for p in (root / "runs").glob("montgomery-n10/train/box_*") if p.is_dir())
    for f in (step / "step.json", step / "metrics.json", step / "folds" / "fold_0" / "metrics.json"):
        f.unlink()
    r = _invoke(args)
    assert "continuing the killed run" in r.output and "(1 ran," in r.output
    res = json.loads((root / "results.json").read_text())
    ran = [s["name"] for s in res["steps"] if s["status"] == "ran"]
    assert len(ran) == 1 and "box" in ran[0]
    assert json.loads((step / "run.json").read_text())["finished"] and (step / "step.json").exists()


def test_jobs_run_training_steps_in_worker_processes_with_the_same_steps_and_results(reproduced, tmp_path):
    """--jobs 2 trains the independent steps in two worker processes: the same steps, recorded in the protocol's
    order, each trained with the same configuration and scoring as one after another (the workers have their share
    of the torch threads, so sums may round differently: F1 within 5e-3). Steps do not record --jobs: a rerun
    without it reuses them all."""
    root1, args, _ = reproduced
    out = tmp_path / "jobs2"
    args2 = [*args[:args.index("--out") + 1], str(out), *args[args.index("--out") + 2:]]
    r = _invoke([*args2, "--jobs", "2"])
    assert "2 at a time" in r.output
    one = json.loads((root1 / "results.json").read_text())
    two = json.loads((out / "tiny" / "results.json").read_text())
    assert [s["name"] for s in two["steps"]] == [s["name"] for s in one["steps"]]
    assert two["settings"]["jobs"] == 2 and two["command"].endswith("--jobs 2")
    trained = [(a, b) for a, b in zip(one["steps"], two["steps"])
               if a["kind"] in ("grid", "k-fold", "pooled", "unet") and b["status"] == "ran"]
    assert len(trained) >= 10
    for a, b in trained:
        assert b["info"]["jobs"] == 2 and "jobs" not in a["info"], b["name"]
        cfg = [{k: v for k, v in json.loads((root / s["out"] / "run.json").read_text())["config"].items()
                if k != "data"} for root, s in ((root1, a), (out / "tiny", b))]
        assert cfg[0] == cfg[1], b["name"]
    kf1, kf2 = one["tables"]["kfold"], two["tables"]["kfold"]
    assert {n: list(v) for n, v in kf1.items()} == {n: list(v) for n, v in kf2.items()}  # same rows, same order
    for name in kf1:
        for prompt, row in kf1[name].items():
            other = kf2[name][prompt]
            assert abs(row["test_f1_pooled"]["mean"] - other["test_f1_pooled"]["mean"]) < 5e-3, (name, prompt)
    assert two["estimate"]["jobs"] == 2 and one["estimate"]["jobs"] == 1
    assert "some of which ran at once" in (out / "tiny" / "tables.md").read_text()
    again = _invoke(args2)
    assert "(0 ran," in again.output


def test_a_step_failing_in_a_worker_is_named_and_the_others_finish(reproduced, tmp_path):
    """With --jobs, a step that fails in its worker (here: its folder holds a U-Net run with other settings) is
    reported by name with its cause, exit code 2, after the step beside it finished and was recorded."""
    _, args, _ = reproduced
    out = tmp_path / "fail"
    args2 = [*args[:args.index("--out") + 1], str(out), *args[args.index("--out") + 2:], "--jobs", "2"]
    bad = out / "tiny" / "runs" / "montgomery-n10" / "unet_k1_e1"
    bad.mkdir(parents=True)
    (bad / "run.json").write_text(json.dumps({"config": {"channels": [4, 8], "size": 64}}))
    r = CliRunner().invoke(main, args2)
    assert r.exit_code == 2, r.output
    assert "training step(s) failed: [unet montgomery-n10 k=1]" in r.output and "settings differ" in r.output
    assert not (bad / "step.json").exists()
    other = out / "tiny" / "runs" / "shenzhen-n10" / "unet_k1_e1"
    assert json.loads((other / "step.json").read_text())["info"]["jobs"] == 2


def test_changed_settings_in_a_step_folder_is_an_error(reproduced):
    root, args, _ = reproduced
    sj = root / "runs" / "montgomery-n10" / "zeroshot_box" / "step.json"
    text = sj.read_text()
    rec = json.loads(text)
    rec["settings"]["threshold"] = 0.6
    sj.write_text(json.dumps(rec))
    try:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "different settings" in r.output
    finally:
        sj.write_text(text)


def test_step_recorded_before_a_config_field_existed_is_reused(reproduced):
    """A training step whose step.json lacks a field added to TrainConfig later (at its default) is the same run."""
    root, args, _ = reproduced
    sj = next(p for p in (root / "runs").glob("shenzhen-n10/train/points_*") if p.is_dir()) / "step.json"
    text = sj.read_text()
    rec = json.loads(text)
    for k in ("augment_views", "min_delta", "lora_rank", "cpu_bf16"):
        rec["settings"].pop(k)
    sj.write_text(json.dumps(rec))
    try:
        r = _invoke(args)
        assert "(0 ran," in r.output
    finally:
        sj.write_text(text)


def test_full_and_quick_settings(data_root):
    full = protocol_settings(data_root=str(data_root), backbone="tiny")
    assert full.folds == 5 and full.epochs == 100 and len(full.grid) == 9 and full.subset["shenzhen"] is None
    assert (1e-5, 0.0) in full.grid
    quick = protocol_settings(data_root=str(data_root), backbone="tiny", quick=True)
    assert quick.folds == 1 and quick.epochs < full.epochs and len(quick.grid) < 9 and quick.subset["shenzhen"]
    with pytest.raises(ProtocolError):
        protocol_settings(data_root=str(data_root / "montgomery"), backbone="tiny")
    with pytest.raises(ValueError):
        protocol_settings(data_root=str(data_root), backbone="vit_b")  # no weights without --checkpoint


def test_partial_tables_render_pending_sections(reproduced):
    """tables.md is rewritten after each phase; sections without results say so instead of failing."""
    from lungsam.reproduce.tables import PENDING, render

    root, _, _ = reproduced
    res = json.loads((root / "results.json").read_text())
    res["complete"] = False
    t = res["tables"]
    t["kfold"], t["threshold_sweep"], t["cross_dataset"], t["pooled"] = {}, {}, {}, None
    for u in t["unet"].values():
        u.update(ours_points=None, ours_best_without_gt=None, ours_best_any=None)
    md = render(res)
    assert md.count(PENDING) == 7 and "**PARTIAL**" in md
    for i in range(1, 11):
        assert f"## Table {i}:" in md
    assert "0.924" in md and "0.943 ± 0.007" in md


def test_encoder_size_runs_every_sam_step_at_that_size(data_root, tmp_path):
    """--encoder-size reaches the encode, zero-shot, training and cross-dataset steps, and the results go to their
    own folder (a native-size protocol beside it is not touched); the native size is the plain protocol."""
    out = tmp_path / "results"
    args = ["reproduce", "--data-root", str(data_root), "--backbone", "tiny", "--quick", "--epochs", "1",
            "--subset", "10", "--size", "64", "--out", str(out), "--quiet", "--device", "cpu", "--encoder-size", "64"]
    _invoke(args)
    root = out / "tiny-enc64"
    assert not (out / "tiny").exists()
    res = json.loads((root / "results.json").read_text())
    assert res["settings"]["encoder_size"] == 64 and "--encoder-size 64" in res["command"]
    md = (root / "tables.md").read_text()
    assert "at encoder input 64" in md.splitlines()[0] and "image encoder at 64x64" in md
    steps = res["steps"]
    encode = [s for s in steps if s["kind"] == "encode"]
    assert encode and all(json.loads((root / s["out"] / "step.json").read_text())["settings"]["encoder_size"] == 64
                          for s in encode)
    for s in steps:
        if s["kind"] == "zero-shot" or s["kind"] == "cross":
            assert json.loads((root / s["out"] / "metrics.json").read_text())["encoder_size"] == 64, s["name"]
        if s["kind"] in ("grid", "k-fold", "pooled"):
            assert json.loads((root / s["out"] / "run.json").read_text())["config"]["encoder_size"] == 64, s["name"]
    assert {s["kind"] for s in steps} >= {"encode", "zero-shot", "grid", "k-fold", "cross", "pooled"}
    native = protocol_settings(data_root=str(data_root), backbone="tiny", encoder_size=128)
    assert native.encoder_size is None and native.label == "tiny"
    with pytest.raises(ValueError, match="multiple of 16"):
        protocol_settings(data_root=str(data_root), backbone="tiny", encoder_size=72)


def test_cost_estimate_uses_fold_medians_and_counts_fixed_costs(tmp_path):
    """One fold slowed by another job does not move the extrapolation; time outside the epochs is counted per fold."""
    from types import SimpleNamespace

    from lungsam.artifacts import write_json_atomic
    from lungsam.reproduce.cost import FULL_SET_SIZES, TYPICAL_EPOCHS, estimate

    def fold(train_s):  # 5 epochs x (36 + 12) images; 4 s outside the epochs
        return {"train_time_s": train_s, "fold_wall_s": train_s + 4.0, "epochs_run": 5,
                "n": {"train": 36, "val": 12, "test": 12}}
    steps = []
    for i, secs in enumerate([24.0, 24.0, 240.0]):  # the third was slowed 10x
        write_json_atomic(tmp_path / f"r{i}" / "metrics.json", {"folds": [fold(secs)]})
        steps.append({"kind": "k-fold", "out": f"r{i}", "info": {}})
    e = estimate({"steps": steps}, SimpleNamespace(prompts=("points", "box", "both", "auto-box"), unet=False), tmp_path)
    assert e["train_s_per_image_epoch"] == pytest.approx(24.0 / 240) and e["train_fixed_s_per_fold"] == 4.0
    n = sum(FULL_SET_SIZES.values())
    folds = 2 * (9 + 4 * 5) + 5
    # the 3 grid cells at lr 1e-5 run to the 100-epoch cap; the other 6 cells, 20 k-fold runs and 5 pooled folds stop
    want = (TYPICAL_EPOCHS * 0.8 * n * (6 + 20 + 5) + 100 * 0.8 * n * 3) * 0.1 + folds * 4.0
    assert e["full_protocol_training_s_typical"] == pytest.approx(want)
    assert e["full_protocol_runs"]["slow_grid_cells_per_set"] == 3
    assert e["full_protocol_training_s_upper_bound"] > e["full_protocol_training_s_typical"]
    assert e["encode_s_per_image"] is None and e["unet_s_per_image_epoch"] is None
    # a fold that kept its epochs' whole wall time (training + validation + weight files) is costed by it
    for i in range(3):
        write_json_atomic(tmp_path / f"r{i}" / "metrics.json", {"folds": [{**fold(24.0), "epochs_wall_s": 36.0}]})
    e = estimate({"steps": steps}, SimpleNamespace(prompts=("points", "box", "both", "auto-box"), unet=False), tmp_path)
    assert e["train_s_per_image_epoch"] == pytest.approx(36.0 / 240) and e["train_fixed_s_per_fold"] == 0.0


def test_recorded_command_gives_back_the_same_settings(data_root):
    """``Settings.command(out)`` (what results.json and tables.md record) names every option that differs from
    what its mode sets, so running it again gives the same settings."""
    import shlex

    from lungsam.reproduce.commands import reproduce

    cases = [dict(quick=True), dict(quick=False), dict(quick=True, epochs=3, subset=10, size=128, encoder_size=64),
             dict(quick=False, epochs=7, device="cpu")]
    for kw in cases:
        st = protocol_settings(data_root=str(data_root), backbone="tiny", **kw)
        cmd = st.command("res")
        assert cmd.startswith("lungsam reproduce ") and "--out res" in cmd
        assert ("--epochs" in cmd) == ("epochs" in kw) and ("--size" in cmd) == ("size" in kw)
        ctx = reproduce.make_context("reproduce", shlex.split(cmd)[2:])
        p = ctx.params
        again = protocol_settings(data_root=p["data_root"], backbone=p["backbone"], checkpoint=p["checkpoint"],
                                  device=p["device"], quick=p["quick"], epochs=p["epochs"], subset=p["subset"],
                                  size=p["size"], encoder_size=p["encoder_size"])
        assert again == st and p["out"] == "res"


def test_cost_lines_say_whether_the_full_protocol_fits_a_working_day(reproduced):
    """Over 8 h: the advice names what would cut it (--cpu-bf16 only on a CPU run that did not use it); under 8 h:
    the line says it fits, and whether encoding was timed."""
    from lungsam.reproduce.tables import WORKING_DAY_S, render

    root, _, _ = reproduced
    res = json.loads((root / "results.json").read_text())
    e = res["estimate"]

    def cost(typical, device="cpu", bf16=False, encode=None):
        r = json.loads(json.dumps(res))
        r["device"], r["settings"]["cpu_bf16"] = device, bf16
        r["estimate"].update(full_protocol_training_s_typical=typical, full_protocol_encode_s=encode)
        md = render(r)
        return md[md.index("### Cost of the full protocol"):]

    assert e["train_s_per_image_epoch"] is not None
    long = cost(WORKING_DAY_S + 60)
    assert "more than a working day (8 h)" in long and "`--cpu-bf16`" in long
    assert "`--cpu-bf16`" not in cost(WORKING_DAY_S + 60, bf16=True)
    assert "`--cpu-bf16`" not in cost(WORKING_DAY_S + 60, device="cuda")
    assert "more than a working day" in cost(WORKING_DAY_S - 60, encode=120.0)  # encoding counts
    short = cost(WORKING_DAY_S / 2)
    assert "fits in a working day (8 h)" in short and "not timed here" in short
    assert "encoding included" in cost(WORKING_DAY_S / 2, encode=60.0)
