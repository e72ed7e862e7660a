"""``lungsam export``: a trained run -> a torch-free bundle (ONNX FP32/FP16/INT8, optional TensorRT engines).

Module level imports only click and :mod:`lungsam.options`; torch, onnx and TensorRT load inside the command.
"""
from __future__ import annotations

import click

from ..options import Command, examples, log_to, ranged, verbosity


@click.command("export", cls=Command, extra="export", epilog=examples(
    "lungsam export runs/mobile_points --out bundles/mobile_points --fp16",
    "lungsam export runs/lite_cv5 --out bundles/lite_int8 --int8 --parity-images 10"))
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(),
              help="Bundle folder to create (must not exist, or be empty).")
@click.option("--fp16", is_flag=True, help="Also write FP16 ONNX models (*_fp16.onnx; float32 inputs/outputs).")
@click.option("--int8", is_flag=True,
              help="Also write an INT8 encoder for CPUs (the decoders stay FP32), gated on parity and on F1 "
                   "(--max-int8-f1-drop); --int8-method says how.")
@click.option("--int8-method", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="--int8: static (calibrated on the fold's training images: encoder_int8.onnx as onnxruntime QDQ "
                   "with the weight MatMuls/Gemms in int8, and encoder_int8_ov.xml through NNCF for OpenVINO) or "
                   "dynamic (onnxruntime's dynamic quantisation of the weight MatMuls, encoder_int8.onnx only; the "
                   "fallback where static fails the gate). docs/cpu_inference.md.")
@click.option("--calibration-images", default=32, show_default=True, type=click.IntRange(min=1),
              help="--int8 static: training-split images used to calibrate the activation ranges.")
@click.option("--max-int8-f1-drop", default=0.002, show_default=True, type=click.FloatRange(min=0),
              help="INT8 gate: largest allowed drop of mean F1 against ground truth below torch FP32.")
@click.option("--trt", is_flag=True,
              help="Also build TensorRT FP16 engines (implies --fp16; needs an NVIDIA GPU and pip install "
                   "'lungsam[trt]').")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 23), help="ONNX opset.")
@click.option("--fold", default=None, type=ranged("fold"), help="Fold to export (default: best validation F1).")
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Backbone checkpoint, when the one recorded in run.json is not found.")
@click.option("--min-agreement", default=0.99, show_default=True, type=ranged("min_agreement"),
              help="Parity gate, in [0, 1]: every exported model's mean mask agreement (F1 vs torch) must reach this.")
@click.option("--parity-images", default=None, type=click.IntRange(min=1),
              help="Use at most N held-out images for the parity check (default: all).")
@click.option("--data", "data_dir", default=None, type=str,
              help="Data set folder for the parity check (default: the run's data, fold's test split).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Largest batch of the TensorRT optimisation profiles.")
@click.option("--box-from-first-pass", is_flag=True,
              help="Runs trained with a box prompt (box, both, auto-box, auto-both): make the bundle take each image's "
                   "box from the model's own first mask by default (no annotation needed), and measure that path "
                   "on the parity images.")
@click.option("--provenance", is_flag=True,
              help="Also record local provenance in the manifest: the run folder, data folders, checkpoint path, host "
                   "name and the parity image ids (left out by default: a bundle leaves the building). lungsam bench "
                   "finds the run through it.")
@click.option("--in-graph-preprocess", is_flag=True,
              help="Also write encoder_raw.onnx / decoder_mask.onnx: the decoded uint8 image in (resize and "
                   "normalisation in the graph), the thresholded mask at the image's size out, gated against the "
                   "host path (lungsam predict --preprocess graph; docs/in_graph_preprocessing.md).")
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
def export(run_dir: str, out: str, fp16: bool, int8: bool, trt: bool, opset: int, fold: int | None,
           checkpoint: str | None, min_agreement: float, parity_images: int | None, data_dir: str | None,
           max_batch: int,
           box_from_first_pass: bool, provenance: bool, triton_repo: str | None, triton_name: str,
           triton_precision: str, triton_max_batch: int, triton_instances: int, triton_kind: str,
           int8_method: str, calibration_images: int, max_int8_f1_drop: float, in_graph_preprocess: bool,
           quiet: int) -> None:
    """Export RUN's tuned model to a bundle checked against torch on held-out images.

    The bundle is built in a temporary folder and moved to --out only when the parity gate passes. The last
    line is the bundle digest (sha256 of manifest.json, which lists every file's sha256): pin it with
    `lungsam verify BUNDLE --expect-digest HEX` or `lungsam predict --expect-digest HEX`.
    """
    ctx = click.get_current_context()
    given = [f"--{n.replace('_', '-')}" for n in ("int8_method", "calibration_images", "max_int8_f1_drop")
             if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
    if given and not int8:
        raise click.UsageError(f"{', '.join(given)} only apply with --int8 (add --int8, or drop them)")
    if trt:  # fail before any heavy work
        from .trt import require_tensorrt

        require_tensorrt()

    if triton_repo is not None:  # fail before any heavy work
        from .triton import preflight

        preflight(triton_repo, triton_name)

    from .bundle import ParityGateError, export_bundle

    try:
        result = export_bundle(run_dir, out, fp16=fp16, int8=int8, trt=trt, opset=opset, fold=fold,
                               checkpoint=checkpoint, min_agreement=min_agreement, parity_images=parity_images,
                               data_dir=data_dir,
                               max_batch=max_batch, box_from_first_pass=box_from_first_pass, provenance=provenance,
                               int8_method=int8_method, calibration_images=calibration_images,
                               max_int8_f1_drop=max_int8_f1_drop, in_graph_preprocess=in_graph_preprocess,
                               log=log_to("export"))
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
