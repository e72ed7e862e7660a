"""``lungsam bench``; module level imports only click and :mod:`lungsam.options` (the work lives in
:mod:`lungsam.benchmarks.bench`)."""
from __future__ import annotations

import click

from ..options import RUNTIME_DEVICE, TRAIN_DEVICE, Command, examples, log_to, ranged, verbosity
from ..prompts import PROMPT_MODES


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str | None) -> list[int] | None:
    items = _csv(value)
    if items is None:
        return None
    try:
        return [int(v) for v in items]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from exc


@click.command("bench", cls=Command, extra="export", epilog=examples(
    "lungsam bench bundles/mobile_points --out bench/mobile_points --repeats 2 --warmup 1",
    "lungsam bench --sweep --run runs/mobile_points --sizes 1024,512 --out bench/sweep"))
@click.argument("bundle", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--data", "data_dir", default=None,
              help="Data set directory (images/ + masks/) or demo:NAME; default: the bundle run's test split.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory for results.json, results.md and latency.png.")
@click.option("--backends", default="torch,onnxruntime,openvino,tensorrt", show_default=True,
              help="Comma-separated: torch, onnxruntime, openvino, tensorrt.")
@click.option("--precisions", default=None,
              help="Comma-separated: fp32, fp16, bf16, int8 (bf16: torch on GPU, OpenVINO on CPUs with native "
                   "bfloat16; int8: onnxruntime / OpenVINO on CPU, from lungsam export --int8). Default: "
                   "fp32,fp16,int8; with --sweep fp32,fp16.")
@click.option("--interleave", is_flag=True,
              help="Run every row side by side, image by image (ratios that hold on a machine shared with other "
                   "jobs); memory is then each backend's RSS growth while it opens and warms up.")
@click.option("--device", type=RUNTIME_DEVICE, default="cpu", show_default=True, help="Where every backend runs.")
@click.option("--batch", "batches", default="1", show_default=True,
              help="Comma-separated batch sizes for the throughput measurement.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0),
              help="Untimed passes before the timed ones (per backend and precision).")
@click.option("--repeats", default=None, type=click.IntRange(min=1),
              help="Timed passes over the images (per batch size). Default: 3 on cuda; 1 on cpu, where one pass of "
                   "28 images gives 28 timings per row and a MobileSAM bench on 2 cores stays under 10 minutes.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use at most N images.")
@click.option("--compare", "compare_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="An earlier results.json: print ratios against it.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="CPU threads for torch and onnxruntime (default: all cores).")
@click.option("--sweep", is_flag=True, default=False,
              help="Instead of the backend bench: accuracy/latency across encoder input size, precision and "
                   "backbone (torch path).")
@click.option("--sizes", default="1024,768,512,384,256", show_default=True,
              help="--sweep: encoder input sizes.")
@click.option("--backbones", "sweep_backbones", default=None,
              help="--sweep: comma-separated backbones (default: the bundle's backbone).")
@click.option("--run", "run_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="The training run behind the torch reference (default: the run recorded in the bundle); "
                   "with --sweep: the run whose tuned decoder and prompt are used (instead of BUNDLE).")
@click.option("--box-from-first-pass/--no-box-from-first-pass", default=None,
              help="Bundles prompted with a box: every backend takes each image's box from the model's own first "
                   "mask (two decoder calls, no ground truth). Default: what the bundle was exported with.")
@verbosity
def bench(bundle, data_dir, out_dir, backends, precisions, device, batches, warmup, repeats, limit, compare_path,
          threads, sweep, sizes, sweep_backbones, run_dir, box_from_first_pass, interleave, quiet) -> None:
    """Parity and latency of a BUNDLE across backends and precisions (writes results.json/.md/latency.png)."""
    repeats = repeats if repeats is not None else (3 if device == "cuda" else 1)
    if sweep:
        _sweep(bundle=bundle, run_dir=run_dir, data_dir=data_dir, out_dir=out_dir, sizes=_ints(sizes),
               precisions=_csv(precisions), backbones=_csv(sweep_backbones), device=device, batches=_ints(batches),
               warmup=warmup, repeats=repeats, limit=limit, threads=threads)
        return
    if bundle is None:
        raise click.UsageError("BUNDLE is required (or use --sweep --run RUN)")
    _bench(bundle=bundle, data_dir=data_dir, out_dir=out_dir, backends=_csv(backends), precisions=_csv(precisions),
           device=device, batches=_ints(batches), warmup=warmup, repeats=repeats, limit=limit,
           compare_path=compare_path, threads=threads, run_dir=run_dir, box_from_first_pass=box_from_first_pass,
           interleave=interleave)


def _bench(*, bundle, out_dir, **options) -> None:
    """``lungsam bench BUNDLE``: :func:`lungsam.benchmarks.bench.run_bench`, its ratios and files printed."""
    from ..data import DataError
    from ..layout import BenchLayout
    from ..runs import RunError
    from ..runtime.bundle import BundleError
    from .bench import REFERENCE, BenchError, run_bench

    try:
        res = run_bench(bundle, out_dir, log=lambda m: click.echo(m, err=True), **options)
    except (BenchError, BundleError, RunError, DataError) as e:
        raise click.ClickException(str(e)) from e
    for r in res["results"]:
        vs = (r.get("vs_reference") or {}).get("end_to_end_p50")
        if vs is not None and (r["backend"], r["precision"], r.get("mode")) != REFERENCE:
            click.echo(f"{r['backend']} {r['precision']}: end-to-end p50 = {vs:.2f}x torch fp32 eager "
                       "(same images, same run)")
    click.echo(f"wrote {BenchLayout(out_dir).results_json}, results.md, latency.png ({res['wall_s']:.0f} s)")


def _sweep(*, bundle, run_dir, out_dir, sizes, precisions, **options) -> None:
    """``lungsam bench --sweep``: :func:`lungsam.benchmarks.sweep.run_sweep` on ``--run`` or on the run the
    bundle records (``Bundle.meta.run``)."""
    from ..data import DataError
    from ..layout import RunLayout, SweepLayout
    from ..runs import RunError
    from .plan import BenchError
    from .sweep import run_sweep

    if run_dir is None:
        if bundle is None:
            raise click.UsageError("--sweep needs BUNDLE (whose run is used) or --run RUN")
        run_dir = _bundle_run_dir(bundle)
        if run_dir is None or not RunLayout(run_dir).run_json.exists():
            raise click.ClickException(f"the bundle's run {run_dir} is not here; pass --run RUN")
    try:
        res = run_sweep(run_dir, out_dir, sizes=sizes or [1024, 768, 512, 384, 256],
                        precisions=precisions or ["fp32", "fp16"], log=lambda m: click.echo(m, err=True), **options)
    except (BenchError, RunError, DataError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {SweepLayout(out_dir).sweep_json}, sweep.md, sweep.png ({res['wall_s']:.0f} s)")


def _bundle_run_dir(bundle) -> str | None:
    """The run folder the bundle's typed manifest records (``run.source``: bundles exported with --provenance)."""
    from ..runtime.bundle import Bundle, BundleError
    from .inputs import bundle_run

    try:
        meta = Bundle.load(bundle, verify=False).meta
    except BundleError as e:
        raise click.ClickException(str(e)) from e
    return bundle_run(meta)[0]


@click.command("bench-train", cls=Command, extra="export", epilog=examples(
    "lungsam bench-train --backbone mobile_sam --out bench/train_speed",
    "lungsam bench-train --backbone lite_medsam --encoder-size 192 --cpu-bf16 --out bench/train_speed_bf16"))
@click.option("--data", "data", multiple=True, default=["demo:montgomery"], show_default=True,
              help="Data set folder(s) whose first --images images are timed.")
@click.option("--backbone", default="mobile_sam", show_default=True, help="mobile_sam, lite_medsam, vit_b, tiny.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Backbone weights (default: official weights, downloaded once).")
@click.option("--prompt", type=click.Choice(list(PROMPT_MODES)), default="points",
              show_default=True, help="Prompt mode of the timed decoder steps.")
@click.option("--images", "n_images", type=ranged("images"), default=16, show_default=True,
              help="Images per timed epoch.")
@click.option("--batch-size", type=ranged("batch_size"), default=4, show_default=True, help="Images per step.")
@click.option("--size", type=ranged("size"), default=256, show_default=True,
              help="Working resolution (images and masks resized to SxS).")
@click.option("--encoder-size", type=ranged("encoder_size"), default=None,
              help="Image encoder input side (default: the backbone's native size); the decoder's cost follows its "
                   "grid.")
@click.option("--device", type=TRAIN_DEVICE, default="auto", show_default=True,
              help="auto: cuda when torch sees a GPU, else cpu.")
@click.option("--cpu-bf16", is_flag=True, help="Time every step in bfloat16 autocast (CPU with native bfloat16 only). "
              "Without it, such a CPU also times the bfloat16 decoder steps beside the float32 ones.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for train_speed.json and train_speed.md.")
@verbosity
def bench_train(data, backbone, checkpoint, prompt, n_images, batch_size, size, encoder_size, device, cpu_bf16,
                out, quiet) -> None:
    """Training speed: epoch time with the embedding cache vs recomputing the encoder, and decoder time per sample."""
    from ..train.config import TrainConfig
    from .train_speed import run_train_speed

    cfg = TrainConfig(data=list(data), backbone=backbone, checkpoint=checkpoint, prompt=prompt, batch_size=batch_size,
                      size=size, encoder_size=encoder_size, device=device, cpu_bf16=cpu_bf16)
    r = run_train_speed(cfg, n_images, out, log=log_to("bench-train"))
    click.echo(f"epoch with cache {r['epoch_cached_s']:.2f} s, recomputing the encoder {r['epoch_recompute_s']:.2f} s "
               f"({r['speedup_cached_vs_recompute']:.1f}x); report: {out}/train_speed.md")
