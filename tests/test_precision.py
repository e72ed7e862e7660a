"""--cpu-bf16: training steps in bfloat16 autocast on a CPU with native bfloat16, a clear error elsewhere.

The CI machine may lack AVX512-BF16, so most tests here declare the CPU capable (``native_bf16``): torch then runs
the same bfloat16 autocast path, emulated. What is checked is what the code computes in, not how fast."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lungsam.train.engine as engine
from lungsam.backbones import build_backbone, get_backbone
from lungsam.cli import main
from lungsam.data import DEMO_DATA, demo_data_dir, load_dataset
from lungsam.prompts import learn_prompt
from lungsam.reproduce.protocol import protocol_settings


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)


class ConvOutputDtypes:
    """Records the dtype of every Conv2d/ConvTranspose2d output while active (all modules, any model)."""

    def __enter__(self):
        self.seen: set[torch.dtype] = set()

        def hook(module, args, output):
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                self.seen.add(output.dtype)
        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def test_precision_rule(monkeypatch):
    assert engine.mixed_precision("cpu", True, False) is False  # amp is CUDA's; CPU runs stay float32 by default
    assert engine.mixed_precision("cuda", True, False) is True
    assert engine.mixed_precision("cuda", False, False) is False
    with pytest.raises(RuntimeError, match="for CPU runs"):
        engine.mixed_precision("cuda", True, True)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(RuntimeError, match="AVX512-BF16 or AMX"):
        engine.mixed_precision("cpu", False, True)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert engine.mixed_precision("cpu", False, True) is True


@pytest.mark.parametrize("bf16", [False, True])
def test_decoder_trainer_computes_in_the_precision_asked(native_bf16, bf16):
    demo = load_dataset(DEMO_DATA, 64)
    sam = build_backbone("tiny")
    masks = [s.mask for s in demo.samples[:6]]
    prompt = learn_prompt(masks, "points", 2)
    emb = np.random.default_rng(0).standard_normal((6, 32, 8, 8)).astype(np.float32)
    tr = engine.DecoderTrainer(sam, get_backbone("tiny").preprocess, 64, prompt, lr=1e-2, weight_decay=0.0,
                               batch_size=3, box_jitter=0.0, device="cpu", amp=True, seed=0, cpu_bf16=bf16)
    with ConvOutputDtypes() as step:
        loss = tr.step(emb[:3], masks[:3])
    with ConvOutputDtypes() as val:
        v = tr.validate(emb, masks)
    want = torch.bfloat16 if bf16 else torch.float32
    assert step.seen == {want} and val.seen == {want}
    assert all(p.dtype == torch.float32 for p in sam.mask_decoder.parameters())  # the weights Adam updates
    assert tr.scaler is None and np.isfinite(loss) and 0.0 <= v["val_f1"] <= 1.0


def test_train_cli_records_and_reports_bf16(native_bf16, tmp_path):
    from lungsam.artifacts import read_json

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--backbone", "tiny", "--folds", "1", "--epochs", "2", "--batch-size", "4",
                                  "--cpu-bf16", "--device", "cpu", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert read_json(out / "run.json")["config"]["cpu_bf16"] is True
    assert "in CPU bfloat16 autocast, thresholds and test scores in float32" in (out / "report.md").read_text()


def test_bf16_on_a_cpu_without_it_fails_before_any_work(no_native_bf16, tmp_path):
    for cmd in (["train", "--backbone", "tiny"], ["train-unet"]):
        out = tmp_path / cmd[0]
        r = CliRunner().invoke(main, [*cmd, "--folds", "1", "--epochs", "1", "--cpu-bf16", "--device", "cpu",
                                      "--out", str(out), "--quiet"])
        assert r.exit_code == 2, r.output
        assert "needs a CPU with native bfloat16" in r.output and not out.exists()


def test_unet_trains_in_bf16_and_scores_in_float32(native_bf16, tmp_path, monkeypatch):
    import lungsam.train.unet as unet_mod
    from lungsam.artifacts import read_json

    seen: dict[str, set] = {"train": set(), "score": set()}
    predict = unet_mod.predict_unet

    def scoring(*a, **k):  # the threshold sweep and test scores after training
        with ConvOutputDtypes() as c:
            out = predict(*a, **k)
        seen["score"] |= c.seen
        return out
    monkeypatch.setattr(unet_mod, "predict_unet", scoring)
    out = tmp_path / "unet"
    with ConvOutputDtypes() as everything:
        s = unet_mod.train_unet_run(unet_mod.UNetConfig(folds=1, epochs=2, channels=(4, 8, 16), res_units=1,
                                                        batch_size=4, size=64, cpu_bf16=True, device="cpu"), out,
                                    log=lambda m: None, progress=False)
    assert torch.bfloat16 in everything.seen and seen["score"] == {torch.float32}
    assert read_json(out / "run.json")["config"]["cpu_bf16"] is True
    assert "in CPU bfloat16 autocast" in (out / "report.md").read_text()
    assert 0.0 <= s["aggregate"]["test_f1_pooled"]["mean"] <= 1.0


def test_reproduce_cpu_bf16_reaches_every_training_step(native_bf16, tmp_path):
    root = tmp_path / "cxr"
    for name in ("montgomery", "shenzhen"):
        shutil.copytree(demo_data_dir(), root / name, ignore=shutil.ignore_patterns("README*"))
    st = protocol_settings(data_root=str(root), backbone="tiny", quick=True, cpu_bf16=True, device="cpu")
    assert st.label == "tiny-bf16" and "--cpu-bf16" in st.command()
    out = tmp_path / "results"
    r = CliRunner().invoke(main, ["reproduce", "--data-root", str(root), "--backbone", "tiny", "--quick", "--epochs",
                                  "1", "--subset", "10", "--size", "64", "--out", str(out), "--quiet", "--device",
                                  "cpu", "--cpu-bf16"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "tiny-bf16" / "results.json").read_text())
    assert res["settings"]["cpu_bf16"] is True and "--cpu-bf16" in res["command"]
    trained = [s for s in res["steps"] if s["kind"] in ("grid", "k-fold", "pooled", "unet")]
    assert {s["kind"] for s in trained} == {"grid", "k-fold", "pooled", "unet"}
    for s in trained:
        assert json.loads((out / "tiny-bf16" / s["out"] / "run.json").read_text())["config"]["cpu_bf16"], s["name"]
    assert "ran in bfloat16 autocast on the CPU" in (out / "tiny-bf16" / "tables.md").read_text()


def test_reproduce_cpu_bf16_on_a_cpu_without_it_is_refused(no_native_bf16, tmp_path):
    r = CliRunner().invoke(main, ["reproduce", "--data-root", str(tmp_path), "--backbone", "tiny", "--cpu-bf16",
                                  "--device", "cpu", "--out", str(tmp_path / "results")])
    assert r.exit_code == 2 and "needs a CPU with native bfloat16" in r.output
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("native", [False, True])
def test_bench_train_times_bf16_steps_beside_float32_where_the_cpu_has_it(tmp_path, monkeypatch, native):
    from lungsam.artifacts import read_json
    from lungsam.benchmarks.commands import bench_train

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    out = tmp_path / "t"
    res = CliRunner().invoke(bench_train, ["--backbone", "tiny", "--encoder-size", "64", "--images", "4",
                                           "--batch-size", "2", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = read_json(out / "train_speed.json")
    md = (out / "train_speed.md").read_text()
    if native:
        assert [p["batch_size"] for p in r["decoder_step_per_sample_cpu_bf16"]] == [1, 4]
        assert all(p["seconds_per_sample"] > 0 for p in r["decoder_step_per_sample_cpu_bf16"])
        assert "| float32 / bfloat16 |" in md
    else:
        assert r["decoder_step_per_sample_cpu_bf16"] is None and "bfloat16" not in md
        refused = CliRunner().invoke(bench_train, ["--backbone", "tiny", "--cpu-bf16", "--device", "cpu",
                                                   "--out", str(tmp_path / "b")])
        assert refused.exit_code != 0 and "needs a CPU with native bfloat16" in refused.output
        assert not (tmp_path / "b").exists()


def test_resume_refuses_to_switch_precision(native_bf16, tiny_run):
    """A run trained in float32 does not go on in bfloat16 (or back): --resume names the setting."""
    from lungsam.artifacts import read_json
    from lungsam.train.config import TrainConfig
    from lungsam.train.run import train_run

    cfg = TrainConfig.from_dict({**read_json(tiny_run / "run.json")["config"], "cpu_bf16": True, "device": "cpu"})
    before = (tiny_run / "run.json").read_text()
    with pytest.raises(ValueError, match="cpu_bf16"):
        train_run(cfg, tiny_run, resume=True, log=lambda m: None, progress=False)
    assert (tiny_run / "run.json").read_text() == before
