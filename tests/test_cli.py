"""The command line as a user meets it: one error handler and exit codes, ranges refused before any work,
the same flags and help everywhere, ``python -m lungsam``, and the extra a runtime-only install lacks."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import lungsam
from lungsam.cli import main
from lungsam.errors import ArgumentError, ConfigError, LungsamError
from lungsam.options import Command, configure_logging, release_logging
from lungsam.ranges import RANGES, Range

REPO = Path(__file__).resolve().parents[1]
DEMO = "demo:montgomery"


def all_commands(group: click.Group = main, prefix: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, (*prefix, name))


# --- bad values: exit 2, the option named, nothing written -----------------------------------------

BAD = [
    (["export", "{run}", "--min-agreement", "-5"], "--min-agreement"),
    (["export", "{run}", "--min-agreement", "1.5"], "--min-agreement"),
    (["eval", "--backbone", "tiny", "--data", DEMO, "--threshold", "1.5"], "--threshold"),
    (["eval", "--backbone", "tiny", "--data", DEMO, "--threshold", "nan"], "--threshold"),
    (["eval", "--backbone", "tiny", "--data", DEMO, "--threshold", "-0.2"], "--threshold"),
    (["eval", "--backbone", "tiny", "--data", DEMO, "--threshold", "0"], "--threshold"),
    (["eval", "--backbone", "tiny", "--data", DEMO, "--size", "0"], "--size"),
    (["eval", "--backbone", "tiny", "--data", DEMO, "--device", "gpu"], "--device"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--patience", "-1"], "--patience"),
    (["train", "--patience", "0"], "--patience"),
    (["train", "--min-delta", "-1"], "--min-delta"),
    (["train", "--augment", "-1"], "--augment"),
    (["train", "--size", "7"], "--size"),
    (["train", "--size", "100000"], "--size"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--batch-size", "-2"], "--batch-size"),
    (["train", "--points-per-lung", "0"], "--points-per-lung"),
    (["train", "--weight-decay", "-0.1"], "--weight-decay"),
    (["train", "--lora-rank", "-1"], "--lora-rank"),
    (["train", "--lora-alpha", "0"], "--lora-alpha"),
    (["train", "--folds", "0"], "--folds"),
    (["train", "--only-fold", "-1"], "--only-fold"),
    (["train", "--device", "gpu"], "--device"),
    (["train", "--checkpoint", "/nonexistent/weights.pt"], "--checkpoint"),
    (["train-unet", "--lr", "0"], "--lr"),
    (["train-unet", "--epochs", "0"], "--epochs"),
    (["train-unet", "--batch-size", "0"], "--batch-size"),
    (["train-unet", "--channels", "16,0,32"], "--channels"),
    (["train-unet", "--channels", "16,x"], "--channels"),
    (["train-unet", "--res-units", "-1"], "--res-units"),
    (["reproduce", "--data-root", "{tmp}", "--backbone", "tiny", "--epochs", "0"], "--epochs"),
    (["reproduce", "--data-root", "{tmp}", "--backbone", "tiny", "--size", "8"], "--size"),
    (["reproduce", "--data-root", "{tmp}", "--backbone", "tiny", "--subset", "0"], "--subset"),
    (["bench-train", "--batch-size", "0"], "--batch-size"),
    (["bench-train", "--images", "0"], "--images"),
    (["bench-train", "--device", "tpu"], "--device"),
]


@pytest.mark.parametrize("args,option", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_a_bad_value_is_refused_before_any_work(tmp_path, args, option):
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "out"
    argv = [a.format(run=run, tmp=tmp_path) for a in args]
    r = CliRunner().invoke(main, [*argv, "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert option in r.output, r.output
    assert not out.exists()


def test_an_error_the_library_finds_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    r = CliRunner().invoke(main, ["train", "--backbone", "tiny", "--data", str(tmp_path / "empty"),
                                  "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "error: " in r.output and "no usable" in r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)


def test_the_handler_maps_lungsam_errors_and_keeps_programming_errors():
    @click.command(cls=Command)
    @click.argument("what")
    def boom(what):
        if what == "data":
            raise LungsamError("the data folder has no pairs")
        if what == "option":
            raise ArgumentError("--x cannot be used with --y")
        if what == "extra":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        if what == "engine":
            raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
        if what == "missing-own-module":
            raise ModuleNotFoundError("No module named 'lungsam.nothing'", name="lungsam.nothing")
        raise ValueError("a bug")

    r = CliRunner().invoke(boom, ["data"])
    assert (r.exit_code, r.output) == (1, "error: the data folder has no pairs\n")
    r = CliRunner().invoke(boom, ["option"])
    assert (r.exit_code, r.output) == (2, "error: --x cannot be used with --y\n")
    r = CliRunner().invoke(boom, ["extra"])
    assert r.exit_code == 1 and "pip install 'lungsam[train]'" in r.output and "torch" in r.output
    r = CliRunner().invoke(boom, ["engine"])  # the runtime without an inference engine: one of two extras
    assert r.exit_code == 1 and "lungsam[cpu]" in r.output and "lungsam[gpu]" in r.output
    r = CliRunner().invoke(boom, ["missing-own-module"])  # not an optional dependency: a bug, raised as is
    assert isinstance(r.exception, ModuleNotFoundError)
    r = CliRunner().invoke(boom, ["bug"])
    assert isinstance(r.exception, ValueError) and "error:" not in r.output


# --- the same ranges in the config dataclasses -----------------------------------------------------

BAD_FIELDS = [("lr", 0), ("lr", float("nan")), ("patience", -1), ("min_delta", -1.0), ("augment_views", -1),
              ("size", 7), ("epochs", 0), ("batch_size", -2), ("points_per_lung", 0),
              ("thresholds", (0.5, 1.5)), ("device", "gpu"), ("prompt", "nope"), ("epochs", True)]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_train_config_validates_itself(field, value):
    from lungsam.train.config import TrainConfig

    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError):  # callers catching ValueError keep working
        TrainConfig(**{field: value})


def test_unet_config_validates_itself():
    from lungsam.train.unet import UNetConfig

    UNetConfig()
    for kw in ({"channels": (16, 0)}, {"lr": -1.0}, {"res_units": -1}, {"size": 4}):
        with pytest.raises(ConfigError, match="UNetConfig"):
            UNetConfig(**kw)


def test_click_types_and_configs_read_one_table():
    from lungsam.options import ranged

    for name, rng in RANGES.items():
        assert ranged(name).rng is rng
    r = Range(float, 0.0, 1.0, low_open=True, high_open=True)
    assert [r.problem(v) is None for v in (0.0, 0.5, 1.0, float("inf"), float("nan"), "0.5")] == \
        [False, True, False, False, False, False]


# --- one spelling, help and examples everywhere ----------------------------------------------------

def test_every_option_has_help_and_every_command_ends_with_examples():
    missing, no_examples = [], []
    for path, cmd in all_commands():
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip():
                missing.append(f"{' '.join(path)} {p.opts[0]}")
            elif isinstance(p, click.Option) and not p.help.rstrip().endswith((".", ")")):  # a sentence, ended
                missing.append(f"{' '.join(path)} {p.opts[0]}: {p.help!r} is not a sentence")
        if not (cmd.help or "").strip():
            missing.append(f"{' '.join(path)}: no description")
        if not isinstance(cmd, click.Group):
            text = CliRunner().invoke(main, [*path, "--help"]).output
            tail = text.rstrip().splitlines()[-3:]
            if not any(line.strip().startswith("lungsam ") for line in tail) or "Examples:" not in text:
                no_examples.append(" ".join(path))
    assert not missing, missing
    assert not no_examples, no_examples


def test_flags_are_spelled_the_same_everywhere():
    for path, cmd in all_commands():
        if isinstance(cmd, click.Group):
            continue
        opts = {o: p for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
        assert {"-q", "--quiet", "-v", "--verbose", "--log-file"} <= set(opts), path
        if "--device" in opts:
            assert isinstance(opts["--device"].type, click.Choice), path


def test_log_file_and_levels(tmp_path):
    log = logging.getLogger("lungsam.test")
    configure_logging(quiet=True, log_file=str(tmp_path / "run.log"))
    log.info("shown in the file only")
    log.warning("shown everywhere")
    release_logging()
    text = (tmp_path / "run.log").read_text()
    assert "INFO lungsam.test: shown in the file only" in text
    assert "WARNING lungsam.test: shown everywhere" in text


def test_quiet_keeps_progress_off_stderr_and_the_log_file_keeps_it(tmp_path):
    """A real (one-epoch, tiny) training run: with -qq its progress messages leave stderr, reach --log-file."""
    log = tmp_path / "train.log"
    tiny = ["train", "--backbone", "tiny", "--folds", "1", "--epochs", "1", "--size", "64"]
    r = CliRunner().invoke(main, [*tiny, "--out", str(tmp_path / "run"), "-qq", "--log-file", str(log)])
    assert r.exit_code == 0, r.output
    assert "data: 16 pairs" not in r.output and "test F1" in r.output
    text = log.read_text()
    assert "INFO lungsam.train: data: 16 pairs from demo:montgomery" in text and "fold 0: threshold" in text
    r = CliRunner().invoke(main, [*tiny, "--out", str(tmp_path / "run2")])
    assert r.exit_code == 0 and "data: 16 pairs" in r.output, r.output


# --- install: version, python -m, a missing extra --------------------------------------------------

def test_version_and_python_m():
    assert lungsam.__version__ and lungsam.__version__[0].isdigit()
    r = subprocess.run([sys.executable, "-m", "lungsam", "--version"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and lungsam.__version__ in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "lungsam", "train", "--lr", "0", "--out", "x"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--lr" in r.stderr


BLOCK_TORCH = (
    "import sys\n"
    "for m in ('torch', 'torchvision', 'segment_anything', 'monai'):\n"
    "    sys.modules[m] = None  # as in a runtime-only install: importing them raises ModuleNotFoundError\n"
    "from lungsam.cli import main\n"
    "main(sys.argv[1:], prog_name='lungsam')\n"
)


@pytest.mark.parametrize("args,extra", [(["train", "--folds", "1", "--out", "{tmp}/r"], "train"),
                                        (["train-unet", "--folds", "1", "--out", "{tmp}/r"], "train"),
                                        (["export", "{tmp}", "--out", "{tmp}/b"], "export")])
def test_a_runtime_only_install_names_the_extra(tmp_path, args, extra):
    argv = [a.format(tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *argv], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"pip install 'lungsam[{extra}]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


def test_predict_help_works_without_torch():
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "predict", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Examples:" in r.stdout, r.stderr


def test_extras_give_exactly_one_onnxruntime():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def closure(names):
        out, todo = set(), list(names)
        while todo:
            n = todo.pop()
            for req in extras[n]:
                if req.startswith("lungsam["):
                    todo += req[len("lungsam["):req.index("]")].split(",")
                else:
                    out.add(req.split(">")[0].split("=")[0].split("[")[0].strip())
        return out

    core = {r.split(">")[0].split("[")[0].strip() for r in project["dependencies"]}
    assert not core & {"onnxruntime", "onnxruntime-gpu"}
    for name in extras:
        got = closure([name]) & {"onnxruntime", "onnxruntime-gpu"}
        assert len(got) <= 1, (name, got)
    assert closure(["cpu"]) & {"onnxruntime"} and closure(["gpu"]) & {"onnxruntime-gpu"}
    assert "onnxruntime" in closure(["dev"]) and "onnxruntime" in closure(["all"])
    json.dumps(extras)  # strict JSON-able (no surprises in the table)
