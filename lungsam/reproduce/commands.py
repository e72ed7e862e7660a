"""``lungsam reproduce`` (module level imports only click and :mod:`lungsam.options`)."""
from __future__ import annotations

import click

from ..options import TRAIN_DEVICE, Command, examples, log_to, ranged, verbosity


@click.command(cls=Command, extra="train", epilog=examples(
    "lungsam reproduce --data-root ../shared/data --backbone lite_medsam --quick --out results",
    "lungsam reproduce --data-root ../shared/data --backbone mobile_sam --encoder-size 512 --jobs 2"))
@click.option("--data-root", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder holding montgomery/ and shenzhen/ (each with images/ and masks/).")
@click.option("--backbone", required=True, help="mobile_sam, lite_medsam, vit_b (with --checkpoint), tiny (tests).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True),
              help="Backbone weights (required for vit_b/vit_l/vit_h; default: official weights from the cache).")
@click.option("--device", type=TRAIN_DEVICE, default="auto", show_default=True,
              help="auto: cuda when torch sees a GPU, else cpu.")
@click.option("--quick", is_flag=True,
              help="Reduced protocol: one 60/20/20 split, 5 epochs, 2-cell grid, 60 images per set (see tables.md).")
@click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False),
              help="Results folder; everything goes to OUT/<backbone>/ (OUT/<backbone>-enc<S>/ with --encoder-size).")
@click.option("--epochs", type=ranged("epochs"), help="Maximum epochs per training run (default: 100, --quick: 5).")
@click.option("--subset", type=ranged("subset"),
              help="Use at most N images of each set, a seeded random subset (default: all; --quick: 60).")
@click.option("--size", type=ranged("size"), default=256, show_default=True,
              help="Working resolution (images and masks resized to SxS).")
@click.option("--encoder-size", type=ranged("encoder_size"), default=None,
              help="Image encoder input side for every SAM step (default: the backbone's native size). Smaller makes "
                   "the decoder's token grid, and training, cheaper; results go to OUT/<backbone>-enc<S>/.")
@click.option("--cpu-bf16", is_flag=True,
              help="CPU only: every training step in bfloat16 autocast (needs AVX512-BF16 or AMX; an error elsewhere); "
                   "results go to OUT/<backbone>[-enc<S>]-bf16/.")
@click.option("--jobs", type=ranged("jobs"), default=1, show_default=True,
              help="Training steps run at once, each in its own process with an equal share of the torch threads "
                   "(independent steps only: the grid cells; then the k-fold runs and the pooled run; then the "
                   "U-Nets).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run the training steps as Ray tasks (one GPU each when the cluster has GPUs): 'local' (or no "
                   "value, as the last option) starts a local Ray; 'auto', HOST:PORT or ray://HOST:10001 joins a "
                   "cluster (--out on storage every node sees). Same steps, records and resume. docs/scale.md.")
@click.option("--ray-cpus-per-step", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: CPUs (torch threads) per training step.")
@verbosity
def reproduce(data_root, backbone, checkpoint, device, quick, out, epochs, subset, size, encoder_size, cpu_bf16, jobs,
              ray_address, ray_cpus_per_step, quiet):
    """Run the paper's protocol (zero-shot, thresholds, lr x wd grid, 5-fold per prompt, cross-dataset)
    as resumable steps and write OUT/<backbone>/tables.md, results.json and figures."""
    from .protocol import protocol_settings, run_protocol

    settings = protocol_settings(data_root=data_root, backbone=backbone, checkpoint=checkpoint, device=device,
                                 quick=quick, epochs=epochs, subset=subset, size=size, encoder_size=encoder_size,
                                 cpu_bf16=cpu_bf16, jobs=jobs, ray=ray_address, ray_cpus=ray_cpus_per_step)
    res = run_protocol(settings, out, command=settings.command(out), log=log_to("reproduce"), progress=not quiet)
    n = {k: sum(1 for s in res["steps"] if s["status"].startswith(k)) for k in ("ran", "reused", "shared")}
    click.echo(f"{len(res['steps'])} steps ({n['ran']} ran, {n['reused']} reused, {n['shared']} shared) in "
               f"{res['wall_time_s']:.0f} s; tables: {res['paths']['tables']}")
