"""``lungsam train --recipe``: named TrainConfig defaults, explicit options win, the run records both; the paper
recipe is what ``lungsam reproduce`` runs; ``--cleanup off`` keeps the masks as thresholded."""
from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
from click.testing import CliRunner

from lungsam.cli import main
from lungsam.errors import ArgumentError
from lungsam.layout import RunLayout
from lungsam.train.commands import train, train_config
from lungsam.train.config import TrainConfig
from lungsam.train.recipes import PAPER, RECIPES, apply_recipe, get_recipe, recipe_config


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_a_valid_train_config(name):
    cfg = recipe_config(name)
    for k, v in RECIPES[name].values.items():
        assert getattr(cfg, k) == v, k
    assert cfg.recipe == name
    assert json.loads(json.dumps(cfg.to_dict()))["recipe_values"] == json.loads(json.dumps(dict(RECIPES[name].values)))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # what run.json records reads back
    assert set(RECIPES[name].values) <= {f.name for f in fields(TrainConfig)}


def config_of(*args: str) -> TrainConfig:
    """The TrainConfig ``lungsam train ARGS`` would run (options parsed by click, nothing trained)."""
    ctx = train.make_context("train", [*args, "--out", "unused"])
    settings = {k: v for k, v in ctx.params.items() if k not in ("recipe", "out", "resume", "only_folds", "quiet")}
    with ctx:
        return train_config(ctx, ctx.params["recipe"], settings)


def test_explicit_options_win_over_the_recipe_and_the_run_records_what_it_set():
    cfg = config_of("--recipe", "recommended", "--lr", "3e-4", "--backbone", "tiny")
    assert (cfg.lr, cfg.backbone) == (3e-4, "tiny")  # given: kept
    assert (cfg.prompt, cfg.points_per_lung, cfg.cleanup) == ("points", 3, "validation")  # from the recipe
    assert cfg.recipe == "recommended"
    assert "lr" not in cfg.recipe_values and "backbone" not in cfg.recipe_values
    assert cfg.recipe_values["thresholds"] == list(RECIPES["recommended"].values["thresholds"])
    # an explicit value equal to the default still wins (it was asked for)
    cfg = config_of("--recipe", "paper", "--lr", "1e-05", "--thresholds", "0.05:0.95:0.05", "--batch-size", "4")
    assert (cfg.backbone, cfg.patience, cfg.cleanup) == ("vit_b", 15, "off")
    assert cfg.batch_size == 4 and len(cfg.thresholds) == 19
    assert {"lr", "thresholds", "batch_size"}.isdisjoint(cfg.recipe_values)
    plain = config_of("--lr", "3e-4")
    assert plain.recipe is None and plain.recipe_values == {} and plain.backbone == "mobile_sam"
    assert plain.comparable() == TrainConfig(lr=3e-4).comparable()


def test_a_recipe_and_the_same_values_by_hand_resume_the_same_run():
    by_recipe = recipe_config("recommended")
    by_hand = TrainConfig(**dict(RECIPES["recommended"].values))
    assert by_recipe.comparable() == by_hand.comparable()
    assert by_recipe.to_dict() != by_hand.to_dict()  # the record differs: it says where the values came from


@pytest.mark.parametrize("args,said", [(["--recipe"], "needs a recipe name"), (["--recipe", "best"], "'best' is not")])
def test_recipe_without_a_known_name_lists_the_recipes(tmp_path, args, said):
    r = CliRunner().invoke(main, ["train", *args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert said in r.output and all(f"{n}: " in r.output for n in RECIPES), r.output
    assert not (tmp_path / "run").exists()
    with pytest.raises(ArgumentError, match="recommended"):
        get_recipe("best")
    with pytest.raises(ArgumentError):
        apply_recipe("best", {}, set())


def test_the_paper_recipe_is_what_lungsam_reproduce_runs():
    from lungsam.reproduce import paper
    from lungsam.reproduce.protocol import Settings

    st = Settings(data_root=".", backbone="vit_b", checkpoint=None)
    assert (PAPER["lr"], PAPER["weight_decay"]) == (paper.GRID_BEST["lr"], paper.GRID_BEST["weight_decay"])
    assert (min(PAPER["thresholds"]), max(PAPER["thresholds"])) == paper.THRESHOLD_RANGE
    for k in ("epochs", "patience", "batch_size", "points_per_lung", "folds"):
        assert PAPER[k] == getattr(st, k), k
    assert PAPER["prompt"] in paper.KFOLD["montgomery"]  # the prompt of the paper's k-fold rows we know
    assert (PAPER["backbone"], PAPER["cleanup"]) == ("vit_b", "off")


def test_cleanup_off_keeps_the_thresholded_masks():
    """The validation choice with a stray blob that clean-up would remove: on by default, off when asked."""
    from lungsam.train.engine import choose_threshold_and_cleanup

    masks, probs = [], []
    for shift in range(4):
        m = np.zeros((64, 64), bool)
        m[10:50, 6 + shift:26 + shift] = m[10:50, 36:56] = True
        p = np.where(m, 0.9, 0.1).astype(np.float32)
        p[2:6, 60:63] = 0.9  # a stray blob outside the lungs
        masks.append(m)
        probs.append(p)
    probs = np.stack(probs)
    on = choose_threshold_and_cleanup(probs, masks, (0.5,))
    off = choose_threshold_and_cleanup(probs, masks, (0.5,), allow_cleanup=False)
    assert on.cleanup.enabled and on.val_f1_cleaned > on.val_f1_raw
    assert not off.cleanup.enabled and off.record()["postprocess_choice"]["rule"] == "off (cleanup = off)"
    assert off.record()["postprocess"]["enabled"] is False


def test_a_recipe_run_records_its_name_and_values(tmp_path):
    """A real (one-epoch, tiny) ``lungsam train --recipe recommended`` run with two options given by hand."""
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--recipe", "recommended", "--backbone", "tiny", "--cleanup", "off",
                                  "--folds", "1", "--epochs", "1", "--size", "64", "--out", str(out), "-qq"])
    assert r.exit_code == 0, r.output
    layout = RunLayout(out)
    config = json.loads(layout.run_json.read_text())["config"]
    assert (config["recipe"], config["backbone"], config["lr"], config["cleanup"]) == ("recommended", "tiny", 1e-4,
                                                                                       "off")
    assert config["recipe_values"]["lr"] == 1e-4 and "backbone" not in config["recipe_values"]
    fold = json.loads(layout.fold(0).metrics_json.read_text())
    assert fold["postprocess"]["enabled"] is False and fold["threshold_range"] == [0.05, 0.95]
