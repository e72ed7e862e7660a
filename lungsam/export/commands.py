"""``lungsam export``: a trained run -> a torch-free bundle (ONNX FP32/FP16/INT8, optional TensorRT engines).

Module level imports only click, :mod:`lungsam.options` and the torch-free :mod:`lungsam.export.config` (whose
:class:`ExportOptions` fields are the command's model, precision and gate options); torch, onnx and TensorRT load
inside the command.
"""
from __future__ import annotations

import click

from ..options import Command, config_values, examples, explicit_params, log_to, options_from, ranged, verbosity
from .config import INT8_ONLY, ExportOptions


@click.command("export", cls=Command, extra="export", epilog=examples(
    "lungsam export runs/mobile_points --out bundles/mobile_points --fp16",
    "lungsam export runs/lite_cv5 --out bundles/lite_int8 --int8 --parity-images 10"))
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(),
              help="Bundle folder to create (must not exist, or be empty).")
@options_from(ExportOptions)
@click.option("--fold", default=None, type=ranged("fold"), help="Fold to export (default: best validation F1).")
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Backbone checkpoint, when the one recorded in run.json is not found.")
@click.option("--parity-images", default=None, type=click.IntRange(min=1),
              help="Use at most N held-out images for the parity check (default: all).")
@click.option("--data", "data_dir", default=None, type=str,
              help="Data set folder for the parity check (default: the run's data, fold's test split).")
@click.option("--triton", "triton_repo", default=None, type=click.Path(file_okay=False),
              help="Also write a Triton Inference Server model repository here (encoder, decoders, image->logits "
                   "ensemble; config.pbtxt checked against Triton's schema). docs/scale.md.")
@click.option("--triton-name", default="lungsam", show_default=True,
              help="Model name prefix in the repository (the ensemble's name).")
@click.option("--triton-precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Which of the bundle's ONNX models Triton serves (fp16 needs --fp16, int8 --int8).")
@click.option("--triton-max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Triton max_batch_size (dynamic batching).")
@click.option("--triton-instances", default=1, show_default=True, type=click.IntRange(min=1),
              help="Model instances per device (instance_group count).")
@click.option("--triton-kind", type=click.Choice(["KIND_AUTO", "KIND_CPU", "KIND_GPU"]), default="KIND_AUTO",
              show_default=True, help="instance_group kind (KIND_AUTO: GPU when the server has one).")
@verbosity
def export(run_dir: str, out: str, fold: int | None, checkpoint: str | None, parity_images: int | None,
           data_dir: str | None, triton_repo: str | None, triton_name: str, triton_precision: str,
           triton_max_batch: int, triton_instances: int, triton_kind: str, quiet: int, **settings) -> None:
    """Export RUN's tuned model to a bundle checked against torch on held-out images.

    The bundle is built in a temporary folder and moved to --out only when the parity gate passes. The last
    line is the bundle digest (sha256 of manifest.json, which lists every file's sha256): pin it with
    `lungsam verify BUNDLE --expect-digest HEX` or `lungsam predict --expect-digest HEX`.
    """
    opts = ExportOptions(**config_values(ExportOptions, settings))
    explicit = explicit_params(click.get_current_context(), INT8_ONLY)
    given = [f"--{n.replace('_', '-')}" for n in INT8_ONLY if n in explicit]
    if given and not opts.int8:
        raise click.UsageError(f"{', '.join(given)} only apply with --int8 (add --int8, or drop them)")
    if opts.trt:  # fail before any heavy work
        from .trt import require_tensorrt

        require_tensorrt()

    if triton_repo is not None:  # fail before any heavy work
        from .triton import preflight

        preflight(triton_repo, triton_name)

    from .bundle import ParityGateError, export_bundle

    try:
        result = export_bundle(run_dir, out, opts, fold=fold, checkpoint=checkpoint, parity_images=parity_images,
                               data_dir=data_dir, log=log_to("export"))
    except ParityGateError as e:  # the table says which model missed the gate; the handler prints the error
        click.echo(e.table, err=True)
        raise
    click.echo(result.summary())
    if triton_repo is not None:
        from .triton import write_repository

        rec = write_repository(result.out, triton_repo, name=triton_name, precision=triton_precision,
                               max_batch=triton_max_batch, instances=triton_instances, kind=triton_kind)
        click.echo(f"Triton model repository {triton_repo}: {', '.join(rec['models'].values())} "
                   f"(tritonserver --model-repository {triton_repo})")
