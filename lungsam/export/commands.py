"""``lungsam export``: a trained run -> a torch-free bundle (ONNX FP32/FP16/INT8, optional TensorRT engines).

Module level imports only click; torch, onnx and TensorRT load inside the command.
"""
from __future__ import annotations

import click


@click.command("export")
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(), help="Bundle folder to create (must not exist, or be empty).")
@click.option("--fp16", is_flag=True, help="Also write FP16 ONNX models (*_fp16.onnx; float32 inputs/outputs).")
@click.option("--int8", is_flag=True,
              help="Also write an INT8 encoder for CPUs (the decoders stay FP32), calibrated on the fold's training "
                   "images: encoder_int8.onnx (onnxruntime static QDQ, per-channel) and encoder_int8_ov.xml (NNCF, "
                   "OpenVINO); gated on parity and on F1 (--max-int8-f1-drop).")
@click.option("--int8-method", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="--int8: static (calibrated activations and weights) or dynamic (onnxruntime's dynamic "
                   "quantisation of the weight MatMuls; no calibration, no OpenVINO model).")
@click.option("--calibration-images", default=32, show_default=True, type=click.IntRange(min=1),
              help="--int8 static: training-split images used to calibrate the activation ranges.")
@click.option("--max-int8-f1-drop", default=0.002, show_default=True, type=click.FloatRange(min=0),
              help="INT8 gate: largest allowed drop of mean F1 against ground truth below torch FP32.")
@click.option("--trt", is_flag=True, help="Also build TensorRT FP16 engines (implies --fp16; needs an NVIDIA GPU and pip install 'lungsam[trt]').")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 23), help="ONNX opset.")
@click.option("--fold", default=None, type=int, help="Fold to export (default: best validation F1).")
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Backbone checkpoint, when the one recorded in run.json is not found.")
@click.option("--min-agreement", default=0.99, show_default=True, type=float,
              help="Parity gate: every exported model's mean mask agreement (F1 vs torch) must reach this.")
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
def export(run_dir: str, out: str, fp16: bool, int8: bool, trt: bool, opset: int, fold: int | None,
           checkpoint: str | None, min_agreement: float, parity_images: int | None, data_dir: str | None, max_batch: int,
           box_from_first_pass: bool, int8_method: str, calibration_images: int, max_int8_f1_drop: float) -> None:
    """Export RUN's tuned model to a bundle checked against torch on held-out images.

    The bundle is built in a temporary folder and moved to --out only when the parity gate passes.
    """
    ctx = click.get_current_context()
    given = [f"--{n.replace('_', '-')}" for n in ("int8_method", "calibration_images", "max_int8_f1_drop")
             if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
    if given and not int8:
        raise click.UsageError(f"{', '.join(given)} only apply with --int8 (add --int8, or drop them)")
    if trt:  # fail before any heavy work
        from .trt import TensorRTUnavailable, require_tensorrt

        try:
            require_tensorrt()
        except TensorRTUnavailable as e:
            raise click.ClickException(str(e)) from None

    from .bundle import ExportError, ParityGateError, export_bundle

    try:
        result = export_bundle(run_dir, out, fp16=fp16, int8=int8, trt=trt, opset=opset, fold=fold,
                               checkpoint=checkpoint, min_agreement=min_agreement, parity_images=parity_images, data_dir=data_dir,
                               max_batch=max_batch, box_from_first_pass=box_from_first_pass,
                               int8_method=int8_method, calibration_images=calibration_images,
                               max_int8_f1_drop=max_int8_f1_drop, log=lambda m: click.echo(m, err=True))
    except ParityGateError as e:
        click.echo(e.table, err=True)
        raise click.ClickException(str(e)) from None
    except ExportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(result.summary())
