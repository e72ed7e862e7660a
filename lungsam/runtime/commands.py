"""``lungsam predict``; module level imports only click (the work lives in :mod:`lungsam.runtime.predict`)."""
from __future__ import annotations

import click


@click.command("predict")
@click.argument("bundle", type=click.Path(exists=True, path_type=str))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output folder: <stem>_mask.png, <stem>_overlay.png, predictions.jsonl, predict.json.")
@click.option("--overlay", is_flag=True, help="Also write <stem>_overlay.png (mask over the image).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]), default="auto",
              show_default=True,
              help="auto: TensorRT on --device cuda when the bundle has engines usable here, else onnxruntime; on the "
                   "CPU OpenVINO when the bundle's export timed it faster on a CPU like this one (docs/cpu_inference.md).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "bf16"]), default="fp32", show_default=True,
              help="int8: the bundle's INT8 encoder (lungsam export --int8), onnxruntime or OpenVINO on CPU; bf16: "
                   "OpenVINO's bfloat16 hint, CPUs with AVX512-BF16/AMX only.")
@click.option("--allow-fallback", is_flag=True,
              help="Downgrade (with a warning) when the backend/device/precision is unavailable, instead of failing.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime intra-op threads / OpenVINO INFERENCE_NUM_THREADS.")
@click.option("--performance-hint", type=click.Choice(["latency", "throughput"]), default=None,
              help="OpenVINO's PERFORMANCE_HINT (default latency); refused with other backends.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Images per model call.")
@click.option("--ground-truth", type=click.Path(exists=True, file_okay=False, path_type=str), default=None,
              help="Folder of reference masks named like the inputs: adds F1/IoU per image and metrics.json.")
@click.option("--box-from-first-pass/--no-box-from-first-pass", default=None,
              help="Bundles prompted with a box: take each image's box from the model's own first mask "
                   "(two decoder passes), so a `both` bundle needs no annotation. Default: what the bundle was "
                   "exported with (lungsam export --box-from-first-pass).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def predict(bundle: str, inputs: tuple[str, ...], out_dir: str, overlay: bool, backend: str, device: str,
            precision: str, allow_fallback: bool, threads: int | None, batch_size: int, ground_truth: str | None,
            box_from_first_pass: bool | None, no_progress: bool, performance_hint: str | None) -> None:
    """Segment the lungs in chest X-rays (PNG/JPEG/TIFF, 8/16-bit, and DICOM) with an exported BUNDLE.

    INPUTS are files or folders. Torch-free. Exit code 1 when any input failed (each failure is a line
    in predictions.jsonl with its reason; the batch goes on).
    """
    import warnings

    from tqdm import tqdm

    from ..imageio import list_inputs
    from .backends import BackendUnavailableError
    from .bundle import BundleError
    from .predict import predict_files
    from .segmenter import LungSegmenter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            seg = LungSegmenter.load(bundle, backend=backend, device=device, precision=precision,
                                     allow_fallback=allow_fallback, threads=threads,
                                     box_from_first_pass=box_from_first_pass, performance_hint=performance_hint)
        except (BundleError, BackendUnavailableError, ValueError) as e:
            raise click.ClickException(str(e)) from e
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    if seg.needs_box:
        raise click.ClickException(
            f"bundle {bundle} was trained with prompt mode {seg.prompt.mode!r}, which needs a ground-truth lung box "
            "for every image; `lungsam predict` has no boxes: add --box-from-first-pass (the model's own first mask "
            "gives the box; `lungsam export --box-from-first-pass` makes it the bundle's default), use a bundle "
            "trained with --prompt points, auto-box or auto-both, or the Python API "
            "(LungSegmenter.segment(image, box=...))")
    n = len(list_inputs(list(inputs)))
    if n == 0:
        raise click.ClickException("no input images found (PNG/JPEG/TIFF/BMP/DICOM files or folders of them)")
    d = seg.describe()
    fp = " (box from the first pass)" if d["box_from_first_pass"] else ""
    click.echo(f"{n} inputs; {d['backend']} on {d['device']} ({d['precision']}), prompt {d['prompt_mode']}{fp}, "
               f"threshold {d['threshold']:.3f}", err=True)

    def progress(it):
        return tqdm(it, total=n, unit="img", desc="predict", disable=no_progress)

    summary = predict_files(seg, inputs, out_dir, overlay=overlay, batch_size=batch_size, progress=progress,
                            ground_truth=ground_truth)
    for rec in summary.records:
        if rec["status"] != "ok":
            click.echo(f"failed: {rec['error']}", err=True)
    click.echo(f"{summary.line} ({summary.seconds:.1f} s); results in {summary.jsonl}")
    if summary.failed:
        raise SystemExit(1)
