"""``lungsam predict``; module level imports only click and :mod:`lungsam.options` (the work lives in
:mod:`lungsam.runtime.predict`)."""
from __future__ import annotations

import click

from ..options import RUNTIME_DEVICE, Command, examples, log_to, verbosity

BOX_SOURCE_CHOICES = ("learned", "given", "first-pass")  # lungsam.manifest.BOX_SOURCES (a test pins the two)

@click.command("predict", cls=Command, epilog=examples(
    "lungsam predict bundles/mobile_points xrays/ --out predictions",
    "lungsam predict bundles/mobile_points test_images/ --out predictions --ground-truth test_masks/ --overlay"))
@click.argument("bundle", type=click.Path(exists=True, path_type=str))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output folder: <stem>_mask.png, <stem>_overlay.png, predictions.jsonl, predict.json.")
@click.option("--overlay", is_flag=True, help="Also write <stem>_overlay.png (mask over the image).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt", "triton"]),
              default="auto", show_default=True,
              help="auto: TensorRT on --device cuda when the bundle has engines usable here, else onnxruntime; on the "
                   "CPU OpenVINO when the bundle's export timed it faster on a CPU like this one "
                   "(docs/cpu_inference.md); triton: the Triton server at $LUNGSAM_TRITON_URL serving this bundle "
                   "(docs/scale.md).")
@click.option("--device", type=RUNTIME_DEVICE, default="cpu", show_default=True,
              help="Where the models run (cuda: onnxruntime-gpu or TensorRT).")
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
@click.option("--preprocess", "preprocess", type=click.Choice(["host", "graph", "auto"]), default="host",
              show_default=True,
              help="host: resize, normalise and upsample the mask in numpy; graph: the bundle's in-graph models "
                   "(lungsam export --in-graph-preprocess; fp32, onnxruntime/OpenVINO, learned prompt, one image per "
                   "call); auto: graph where the bundle's export timed it faster on a CPU like this one. predict.json "
                   "says which ran (docs/in_graph_preprocessing.md).")
@click.option("--ground-truth", type=click.Path(exists=True, file_okay=False, path_type=str), default=None,
              help="Folder of reference masks named like the inputs: adds F1/IoU per image and metrics.json.")
@click.option("--box-source", type=click.Choice(BOX_SOURCE_CHOICES), default=None,
              help="Where each image's box comes from (the prompt policy): learned (the training split's mean-mask "
                   "box, or none for a points bundle), first-pass (bundles prompted with a box: the model's own "
                   "first mask, two decoder passes), given (a box per image: the Python API only). Default: the "
                   "bundle's (lungsam export --box-from-first-pass records first-pass), else its prompt mode's.")
@click.option("--box-from-first-pass/--no-box-from-first-pass", default=None,
              help="Bundles prompted with a box: take each image's box from the model's own first mask "
                   "(two decoder passes), so a `both` bundle needs no annotation (= --box-source first-pass; "
                   "--no-box-from-first-pass: the prompt mode's own). Default: what the bundle was "
                   "exported with (lungsam export --box-from-first-pass).")
@click.option("--dicom-seg", is_flag=True,
              help="DICOM inputs: also write <stem>_seg.dcm, a DICOM Segmentation (right / left lung) in the "
                   "source's study (needs lungsam[dicom]; docs/pacs.md).")
@click.option("--fractional", is_flag=True, help="With --dicom-seg: a FRACTIONAL SEG (the probability map).")
@click.option("--sr", is_flag=True, help="With --dicom-seg: also <stem>_sr.dcm, a TID 1500 measurement report.")
@click.option("--secondary-capture", is_flag=True,
              help="With --dicom-seg: also <stem>_sc.dcm, an RGB overlay for viewers without SEG support.")
@click.option("--no-progress", is_flag=True, hidden=True, help="Same as --quiet (kept for existing scripts).")
@click.option("--expect-digest", default=None, metavar="HEX",
              help="Refuse the bundle unless its digest (sha256 of manifest.json, printed by lungsam export and "
                   "lungsam verify) is HEX: pins the exact bundle a site validated.")
@click.option("--qc-site", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None, metavar="FILE",
              help="Flag at this site's own line (a file from `lungsam qc-site`, made for this bundle) instead of "
                   "the bundle's; scores are unchanged, predict.json records the line (docs/quality.md).")
@click.option("--qc-jitter/--no-qc-jitter", default=True, show_default=True,
              help="Score the quality flag with its prompt-jitter term (ten more decoder runs per image, no second "
                   "encoder pass) where the bundle has one; --no-qc-jitter: the flag without it, at its own line, "
                   "for sites bound by CPU time (docs/quality.md).")
@click.option("--overwrite", is_flag=True,
              help="--out holds a previous `lungsam predict` run: remove its files first (anything else there is "
                   "refused). Without it a non-empty --out is refused.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=64_000_000, show_default=True,
              help="Largest input (rows x columns) read, checked from each file's header before decoding; "
                   "larger inputs fail with the reason. Bounds memory per image.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on Ray (Ray Data + a pool of workers each loading the bundle once; a rerun skips complete "
                   "inputs): 'local' (or no value, as the last option) starts a local Ray; 'auto', HOST:PORT or "
                   "ray://HOST:10001 joins a cluster (--out must be on storage every node sees). docs/scale.md.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: workers (actors) in the pool.")
@click.option("--ray-cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With --ray: CPUs Ray reserves per worker (set --threads to match).")
@click.option("--ray-gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="With --ray: GPUs per worker (> 0 needs --device cuda; 0.5 puts two workers on a GPU).")
@verbosity
def predict(bundle: str, inputs: tuple[str, ...], out_dir: str, overlay: bool, backend: str, device: str,
            precision: str, allow_fallback: bool, threads: int | None, batch_size: int, ground_truth: str | None,
            box_source: str | None, box_from_first_pass: bool | None, dicom_seg: bool, fractional: bool, sr: bool,
            secondary_capture: bool, no_progress: bool, expect_digest: str | None, qc_site: str | None,
            qc_jitter: bool, overwrite: bool, max_pixels: int,
            ray_address: str | None, ray_workers: int, ray_cpus_per_worker: float, ray_gpus_per_worker: float,
            performance_hint: str | None, preprocess: str, quiet: int) -> None:
    """Segment the lungs in chest X-rays (PNG/JPEG/TIFF, 8/16-bit, and DICOM) with an exported BUNDLE.

    INPUTS are files or folders. Torch-free. Exit code 1 when any input failed (each failure is a line
    in predictions.jsonl with its reason; the batch goes on).
    """
    no_progress = no_progress or quiet
    _check_combinations(dicom_seg, fractional, sr, secondary_capture, box_source, box_from_first_pass)
    if qc_site is not None and not qc_jitter:
        raise click.UsageError("--qc-site cannot be combined with --no-qc-jitter: a site's line is set on the "
                               "bundle's full scores (with the prompt jitter)")
    load = dict(backend=backend, device=device, precision=precision, allow_fallback=allow_fallback, threads=threads,
                box_source=box_source, box_from_first_pass=box_from_first_pass, expect_digest=expect_digest,
                max_pixels=max_pixels, qc_jitter=qc_jitter)
    dicom = dict(dicom_seg=dicom_seg, fractional=fractional, sr=sr, secondary_capture=secondary_capture)
    if ray_address is not None:
        if overwrite or preprocess != "host":  # a Ray rerun resumes its folder (ray_run.json); it never clears it
            raise click.UsageError("--overwrite cannot be combined with --ray: a rerun skips the inputs already "
                                   "complete; choose an empty --out for a new run" if overwrite else
                                   "--preprocess graph/auto is not wired into --ray yet: drop it, or run without --ray")
        return _predict_ray(bundle, inputs, out_dir, ray_address, ray_workers, ray_cpus_per_worker,
                            ray_gpus_per_worker, overlay=overlay, batch_size=batch_size, ground_truth=ground_truth,
                            no_progress=no_progress, qc_site=qc_site, **load, **dicom)
    listing = _input_listing(inputs, out_dir, overwrite)
    seg = _load_segmenter(bundle, performance_hint=performance_hint, preprocess=preprocess, **load)
    if qc_site is not None:
        seg.use_site_operating_point(qc_site)  # a SiteQcError (LungsamError) is the CLI's error line
    _refuse_needs_box(seg, bundle)
    _require_inputs(listing)
    n = len(listing.files)
    d = seg.describe()
    fp = " (box from the first pass)" if d["box_from_first_pass"] else ""
    site = (f", site flag line {d['qc_operating_point']['flag_below']:.4f}"
            if d["qc_operating_point"]["source"] == "site" else "")
    log_to("predict")(f"{n} inputs; {d['backend']} on {d['device']} ({d['precision']}), prompt {d['prompt_mode']}{fp}, "
                      f"threshold {d['threshold']:.3f}{site}")
    if "backend_choice" in d:  # how --backend auto chose, said where the user can see it
        log_to("predict")(d["backend_choice"])
    summary = _predict_listing(seg, listing, out_dir, overlay=overlay, batch_size=batch_size,
                               ground_truth=ground_truth, overwrite=overwrite, no_progress=no_progress,
                               hook=_dicom_hook(seg, **dicom))
    _report(summary)


def _check_combinations(dicom_seg: bool, fractional: bool, sr: bool, secondary_capture: bool,
                        box_source: str | None, box_from_first_pass: bool | None) -> None:
    """Usage errors (exit code 2) of option combinations, before any work."""
    if (fractional or sr or secondary_capture) and not dicom_seg:
        raise click.UsageError("--fractional, --sr and --secondary-capture go with --dicom-seg")
    if None not in (box_source, box_from_first_pass) and box_from_first_pass != (box_source == "first-pass"):
        flag = "--box-from-first-pass" if box_from_first_pass else "--no-box-from-first-pass"
        raise click.UsageError(f"{flag} contradicts --box-source {box_source}: give one of them")


def _input_listing(inputs: tuple[str, ...], out_dir: str, overwrite: bool):
    """The output folder checked (before any work), then the inputs listed (the output folder is never read)."""
    from ..imageio import scan_inputs
    from .predict import PredictOutputError, check_out_dir, earlier_run_folder

    try:
        check_out_dir(out_dir, overwrite)
    except PredictOutputError as e:
        raise click.ClickException(str(e)) from e
    return scan_inputs(inputs, exclude=[out_dir], skip_folder=earlier_run_folder)


def _require_inputs(listing) -> None:
    if not listing.files:
        why = "".join(f"\n  skipped: {s.path}: {s.reason}" for s in listing.skipped[:10])
        raise click.ClickException("no input images found (PNG/JPEG/TIFF/BMP/DICOM files or folders of them)" + why)


def _load_segmenter(bundle: str, **load):
    """:meth:`LungSegmenter.load` with the CLI's options; its RuntimeWarnings printed as ``warning:`` lines."""
    import warnings

    from .backends import BackendUnavailableError
    from .bundle import BundleError
    from .segmenter import LungSegmenter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            seg = LungSegmenter.load(bundle, **load)
        except (BundleError, BackendUnavailableError, ValueError) as e:
            raise click.ClickException(str(e)) from e
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    return seg


def _refuse_needs_box(seg, bundle: str) -> None:
    """``lungsam predict`` has no per-image boxes: refuse a prompt policy that asks for them."""
    if not seg.needs_box:
        return
    if not seg.prompt.needs_ground_truth:
        raise click.ClickException(f"--box-source given: bundle {bundle} would need a lung box for every image, and "
                                   "`lungsam predict` has no boxes; use --box-source learned or the Python API "
                                   "(LungSegmenter.segment(image, box=...))")
    raise click.ClickException(
        f"bundle {bundle} was trained with prompt mode {seg.prompt.mode!r}, which needs a ground-truth lung box "
        "for every image; `lungsam predict` has no boxes: add --box-from-first-pass (the model's own first mask "
        "gives the box; `lungsam export --box-from-first-pass` makes it the bundle's default), use a bundle "
        "trained with --prompt points, auto-box or auto-both, or the Python API "
        "(LungSegmenter.segment(image, box=...))")


def _dicom_hook(seg, *, dicom_seg: bool, fractional: bool, sr: bool, secondary_capture: bool):
    """With ``--dicom-seg``: the record hook that writes DICOM-SEG (and SR / SC) beside each mask; else ``None``."""
    if not dicom_seg:
        return None
    from .dicom_out import dicom_record_hook

    try:
        import highdicom  # noqa: F401
    except ImportError as e:
        raise click.ClickException("--dicom-seg needs highdicom: pip install 'lungsam[dicom]'") from e
    return dicom_record_hook(seg.bundle, fractional=fractional, sr=sr, secondary_capture=secondary_capture)


def _predict_listing(seg, listing, out_dir: str, *, no_progress: bool, **options):
    """:func:`lungsam.runtime.predict.predict_files` with a progress bar and ``skipped:`` lines on stderr."""
    from tqdm import tqdm

    from .predict import PredictOutputError, predict_files

    n = len(listing.files)

    def progress(it):
        return tqdm(it, total=n, unit="img", desc="predict", disable=no_progress)

    def skipped(rec):
        click.echo(f"skipped: {rec['file']}: {rec['reason']}", err=True)

    hook = options.pop("hook")
    try:
        return predict_files(seg, listing, out_dir, progress=progress, on_skip=skipped, record_hook=hook, **options)
    except PredictOutputError as e:
        raise click.ClickException(str(e)) from e


def _report(summary) -> None:
    """``failed:`` and ``warning:`` lines on stderr, the closing ``N ok, M failed`` line; exit code 1 on failures."""
    for rec in summary.records:
        if rec["status"] == "error":
            click.echo(f"failed: {rec['error']}", err=True)
        for w in rec.get("warnings") or []:
            click.echo(f"warning: {rec['file']}: {w}", err=True)
    click.echo(f"{summary.line} ({summary.seconds:.1f} s); results in {summary.jsonl}")
    if summary.failed:
        raise SystemExit(1)


@click.command("verify", cls=Command, epilog=examples(
    "lungsam verify bundles/mobile_points",
    "lungsam verify bundles/mobile_points --expect-digest 2061b51e..."))
@click.argument("bundle", type=click.Path(exists=True, path_type=str))
@click.option("--expect-digest", default=None, metavar="HEX",
              help="Also require this bundle digest (sha256 of manifest.json, as lungsam export printed it).")
@verbosity
def verify(bundle: str, expect_digest: str | None, quiet: int) -> None:
    """Check a BUNDLE before use: the manifest against its schema, every listed file (regular file inside the
    bundle, no symlinks, size and sha256), the digest recorded at export and, with --expect-digest, the one
    you pinned. Prints what it checked and the digest; exit code 1 when any check fails.
    """
    from .bundle import Bundle, BundleError

    try:
        b = Bundle.load(bundle, verify=True, expect_digest=expect_digest)
    except BundleError as e:
        click.echo(f"FAILED: {e}", err=True)
        raise SystemExit(1) from None
    for line in b.checked:
        click.echo(f"ok  {line}")
    unlisted = b.unlisted_files()
    if unlisted:
        click.echo(f"note: {len(unlisted)} file(s) not listed in the manifest (never opened by the runtime): "
                   f"{', '.join(unlisted[:10])}{' ...' if len(unlisted) > 10 else ''}")
    if expect_digest is None:
        click.echo("note: no --expect-digest given; compare the digest below with the one you validated")
    click.echo(f"digest sha256:{b.digest}")


SITE_MIN_IMAGES = 50  # lungsam.qc_site.DEFAULT_MIN_IMAGES (a test pins the two)


@click.command("qc-site", cls=Command, epilog=examples(
    "lungsam predict bundles/lite site_batch/ --out site_batch_pred",
    "lungsam qc-site bundles/lite site_batch_pred --flag-share 0.10 --out site_qc.json",
    "lungsam predict bundles/lite new_images/ --qc-site site_qc.json --out new_pred"))
@click.argument("bundle", type=click.Path(exists=True, path_type=str))
@click.argument("predict_run", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--flag-share", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.10,
              show_default=True, help="Share of the batch's images the site's line flags (its review budget).")
@click.option("--min-images", type=click.IntRange(min=1), default=SITE_MIN_IMAGES, show_default=True,
              help="Fewest segmented images the line may be set from.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="The site file to write (JSON, lungsam-qc-site/1).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@verbosity
def qc_site(bundle: str, predict_run: str, flag_share: float, min_images: int, out: str, overwrite: bool,
            quiet: int) -> None:
    """Set this site's quality-flag line for BUNDLE from PREDICT_RUN, a finished `lungsam predict` of a batch of
    the site's own radiographs (no ground truth): the score below which --flag-share of them fall. The bundle's
    own line was set on the training hospital's images and flags a different share elsewhere; this one is bound
    to the bundle's digest and used with `lungsam predict --qc-site` or the node's model.qc_site.
    """
    from pathlib import Path

    from ..errors import OutputExistsError
    from ..qc_site import write_site_file
    from .site_line import site_line_from_run

    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; add --overwrite to replace it")
    op = site_line_from_run(bundle, predict_run, flag_share, min_images)
    write_site_file(out, op)
    click.echo(f"site line {op.flag_below:.4f}: flags {op.flagged} of {op.n} images ({op.flagged / op.n:.1%}); the "
               f"bundle's line {op.bundle_flag_below:.4f} flagged {op.bundle_flagged} ({op.bundle_flagged / op.n:.1%}) "
               f"of the same images; written {out}")


def _predict_ray(bundle: str, inputs: tuple[str, ...], out_dir: str, address: str, workers: int, cpus: float,
                 gpus: float, *, no_progress: bool, **options) -> None:
    """``lungsam predict --ray``: :func:`lungsam.runtime.ray_batch.predict_ray`; same outputs and exit code."""
    from ..imageio import list_inputs
    from .bundle import Bundle, BundleError
    from .prompting import resolve_policy
    from .ray_batch import RayBatchError, SegmenterOptions, predict_ray

    try:
        b = Bundle.load(bundle, verify=True)  # fail here, before a cluster starts, on a broken bundle
    except BundleError as e:
        raise click.ClickException(str(e)) from e
    if options.get("qc_site") is not None:  # a site file for another bundle fails here too, not in each worker
        from ..qc import load_calibration
        from ..qc_site import read_site_file, site_quality_model

        site_quality_model(load_calibration(b.manifest.get("qc")), read_site_file(options["qc_site"])[0], b.digest)
    policy = resolve_policy(b.meta.inference if b.meta is not None else None, options["box_source"],
                            options["box_from_first_pass"])
    if policy.source(b.prompt) == "given":
        raise click.ClickException(f"bundle {bundle} was trained with prompt mode {b.prompt.mode!r}, which needs a "
                                   "lung box per image: add --box-from-first-pass (see `lungsam predict --help`)")
    n = len(list_inputs(list(inputs)))
    if n == 0:
        raise click.ClickException("no input images found (PNG/JPEG/TIFF/BMP/DICOM files or folders of them)")
    click.echo(f"{n} inputs; Ray at {address}, {workers} workers ({cpus:g} CPU, {gpus:g} GPU each)", err=True)
    if no_progress:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        summary = predict_ray(bundle, inputs, out_dir, options=SegmenterOptions(**options), address=address,
                              workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)
    except (RayBatchError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    for rec in summary.records:
        if rec["status"] != "ok":
            click.echo(f"failed: {rec['error']}", err=True)
    click.echo(f"{summary.line} ({summary.seconds:.1f} s); results in {summary.jsonl}")
    if summary.failed:
        raise SystemExit(1)
