"""Click options generated from the config dataclasses (``lungsam.options.option`` / ``options_from``): one default
and one help per setting, the same ranges as the configs, and the values a command passes back to its config."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import click
import pytest
from click.testing import CliRunner

from lungsam.cli import main
from lungsam.options import (
    OPTION_KEY,
    config_values,
    explicit_params,
    field_default,
    option,
    option_fields,
    options_from,
)
from lungsam.train.config import TrainConfig, UNetConfig, format_thresholds, parse_thresholds


@dataclass
class Toy:
    lr: float = field(default=1e-3, metadata=option("Learning rate.", range="lr"))
    mode: str = field(default="a", metadata=option("Mode.", choices=("a", "b")))
    names: tuple[str, ...] = field(default=("x",), metadata=option(
        "Names.", parse=lambda t: tuple(t.split(",")), text=",".join))
    data: list[str] = field(default_factory=lambda: ["d"], metadata=option("Data.", multiple=True))
    fast: bool = field(default=False, metadata=option("Go fast.", flag="--go-fast"))
    hidden: int = 7


def toy_command():
    seen = {}

    @click.command()
    @options_from(Toy)
    def cmd(**params):
        seen.update(params=config_values(Toy, params),
                    explicit=explicit_params(click.get_current_context(), params))

    return cmd, seen


def test_options_from_a_dataclass_carry_its_defaults_help_ranges_and_choices():
    cmd, seen = toy_command()
    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 0, r.output
    assert seen["params"] == {"lr": 1e-3, "mode": "a", "names": ("x",), "data": ["d"], "fast": False}
    assert seen["explicit"] == set()
    r = CliRunner().invoke(cmd, ["--lr", "0.5", "--names", "p,q", "--data", "e", "--data", "f", "--go-fast"])
    assert r.exit_code == 0, r.output
    assert seen["params"] == {"lr": 0.5, "mode": "a", "names": ("p", "q"), "data": ["e", "f"], "fast": True}
    assert seen["explicit"] == {"lr", "names", "data", "fast"}
    for bad in (["--lr", "0"], ["--lr", "nan"], ["--mode", "c"]):  # the range table and the choices refuse them
        r = CliRunner().invoke(cmd, bad)
        assert r.exit_code == 2 and bad[0] in r.output, r.output
    text = CliRunner().invoke(cmd, ["--help"]).output
    for line in ("Learning rate.", "[default: 0.001]", "[a|b]", "[default: x]", "[default: d]", "--go-fast"):
        assert line in text, text
    assert "--hidden" not in text  # a field without option metadata is not an option


def test_exclude_names_real_fields_only():
    assert [f.name for f in option_fields(Toy, exclude=("mode",))] == ["lr", "names", "data", "fast"]
    with pytest.raises(ValueError, match="Toy has no field nope"):
        option_fields(Toy, exclude=("nope",))


@pytest.mark.parametrize("cls,command", [(TrainConfig, "train"), (UNetConfig, "train-unet")])
def test_each_command_offers_its_config_fields_with_their_defaults(cls, command):
    """The option's default, read back through the option as a user's value would be, is the field's default;
    so a run without options is the config's default run."""
    cmd = main.commands[command]
    params = {p.name: p for p in cmd.params}
    ctx = cmd.make_context(command, ["--out", "x"])
    for f in option_fields(cls):
        assert f.name in params, f.name
        assert params[f.name].help == f.metadata[OPTION_KEY].help
        got = ctx.params[f.name]
        got = list(got) if isinstance(got, tuple) and f.metadata[OPTION_KEY].multiple else got
        assert got == field_default(f), f.name
    assert cls(**config_values(cls, ctx.params)) == cls()
    not_options = {f.name for f in fields(cls)} - {f.name for f in option_fields(cls)} - {"recipe"}  # --recipe: below
    assert not_options & set(params) == set()


def test_the_train_options_keep_their_names_and_defaults():
    """``lungsam train --help`` before the options were generated (2026-12-01): the same names and defaults."""
    before = {"--data": "demo:montgomery", "--backbone": "mobile_sam", "--prompt": "points", "--points-per-lung": "3",
              "--folds": "5", "--epochs": "100", "--patience": "10", "--min-delta": "0.001", "--lr": "1e-05",
              "--weight-decay": "0.0", "--batch-size": "4", "--size": "256", "--augment": "0", "--lora-rank": "0",
              "--lora-alpha": "8.0", "--lora-targets": "qkv", "--seed": "0", "--thresholds": "0.05:0.95:0.05",
              "--device": "auto"}
    text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    for opt, default in before.items():
        start = text.index(f"{opt} ")
        assert f"[default: {default}]" in text[start:text.index("[default:", start) + 40], opt
    for opt in ("--checkpoint", "--encoder-size", "--cpu-bf16", "--out", "--resume", "--only-fold", "--recipe",
                "--cleanup"):
        assert f"{opt} " in text, opt


@pytest.mark.parametrize("values", [(0.05, 0.1, 0.15), (0.5, 0.55, 0.6, 0.65, 0.7), (0.3, 0.5), (0.42,)])
def test_a_threshold_sweep_reads_back_from_its_text(values):
    assert parse_thresholds(format_thresholds(values)) == values
