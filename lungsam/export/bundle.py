"""``lungsam export``: build a bundle in a temporary folder, gate it on parity, then move it into place.

Bundle layout and manifest keys: :mod:`lungsam.manifest` and docs/DEVELOPING.md ("Bundle format"). The
manifest is written last and lists the sha256 and size of every other file in the bundle; its own sha256
is the bundle digest, printed at the end and written beside it (``manifest.json.sha256``).

The manifest leaves the building with the bundle, so by default it records what an auditor needs
(backbone, weights sha256, data set names and counts, metrics, versions, the CPU model of the parity
figures) and no host name, absolute local path or held-out image id; ``provenance=True``
(``lungsam export --provenance``) keeps those too (the run folder, data folders, checkpoint path, host,
parity image ids), which ``lungsam bench`` uses to find the run.

The temporary folder is ``.lungsam-export.<host>.<pid>.<random>.tmp`` beside ``--out``; a killed export
leaves it behind, and the next export into the same parent folder removes it (its process is gone).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..artifacts import (
    machine_record,
    package_versions,
    read_json,
    sha256_file,
    utc_now,
    write_bytes_atomic,
)
from ..cpufeatures import cpu_features
from ..errors import LungsamError
from ..layout import FoldLayout, RunLayout
from ..manifest import (
    BUNDLE_FORMAT,
    DIGEST_FILE,
    MANIFEST_FILE,
    MODEL_NAMES,
    FileRecord,
    InferencePolicy,
    Manifest,
    ModelEntry,
    OpenVinoModel,
    ParityRecord,
    RunRecord,
    TensorSpec,
    digest_line,
    engine_filename,
    manifest_digest,
    model_filename,
)
from ..postprocess import CleanupSpec
from ..qc import load_calibration
from .config import ExportOptions
from .trt import TensorRTUnavailable, gpu_record, require_tensorrt

__all__ = ["BUNDLE_FORMAT", "ExportError", "ExportResult", "ParityGateError", "export_bundle"]

TEMP_PREFIX = ".lungsam-export."
TEMP_SUFFIX = ".tmp"
FOREIGN_TEMP_MAX_AGE_S = 7 * 24 * 3600  # a temp folder of another host counts as abandoned after a week
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}

Log = Callable[[str], None]
logger = logging.getLogger(__name__)


class ExportError(LungsamError, RuntimeError):
    pass


class ParityGateError(ExportError):
    """The exported models disagree with torch; ``table`` holds the figures, ``parity`` the summaries."""

    def __init__(self, message: str, table: str, parity: dict):
        super().__init__(message)
        self.table = table
        self.parity = parity


@dataclass
class ExportResult:
    """What an export wrote: ``manifest`` as written (JSON object), ``digest`` the bundle digest."""

    out: Path
    manifest: dict
    table: str
    digest: str = ""

    def summary(self) -> str:
        files = ", ".join(sorted(self.manifest["files"]))
        return (f"{self.table}\nbundle written to {self.out} ({files})\n"
                f"bundle digest sha256:{self.digest} (pin it: lungsam verify {self.out} --expect-digest {self.digest})")


# The int8 pipeline quantises the encoder only; its decoders are the FP32 files. Quantising the decoders
# too saved little (the decoder is ~5 % of a CPU image) and cut mask agreement with FP32 on the 28 Montgomery
# test images of the MobileSAM run from 0.9957 to 0.9942 mean (min 0.9921 -> 0.9872).
INT8_FP32_MODELS = ("decoder", "decoder_fixed")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder; choose a new --out")


def data_name(d: str) -> str:
    """A data set's name for a manifest that leaves the building: ``demo:...`` as is, a folder by its name."""
    return d if d.startswith("demo:") else Path(d).name


def parity_samples(run_model, data_dir: str | None, limit: int | None) -> tuple[list, dict]:
    """Held-out samples for the parity check, in the run's working frame.

    Default: the run's data sets (``run.json`` ``config.data``) filtered to the fold's test split.
    ``data_dir``: that folder's samples of the test split when it holds any, else all its samples.
    Returns ``(samples, source record)``; the record's ``data`` are the folders and ``ids`` the image ids
    (:func:`private_parity_source` drops them for a manifest without provenance).
    """
    from ..data import load_dataset, pool

    size = run_model.working_size
    test_ids = list(run_model.split.get("test", []))
    dirs = [data_dir] if data_dir else list(run_model.run["config"]["data"])
    data = pool([load_dataset(d, size) for d in dirs])
    wanted = set(test_ids)
    samples = [s for s in data.samples if s.id in wanted]
    selection = "fold test split"
    if not samples:
        if not data_dir:
            raise ExportError(f"none of the fold's {len(test_ids)} test images was found in "
                              f"{', '.join(map(str, dirs))}; pass --data DIR with held-out images")
        samples, selection = data.samples, f"all images of {data_name(data_dir)} (none of the fold's test ids)"
    if limit:
        samples = samples[:limit]
    return samples, {"data": [str(d) for d in dirs], "selection": selection, "n": len(samples),
                     "ids": [s.id for s in samples]}


def export_models(run_model, tmp: Path, opts: ExportOptions, log: Log) -> tuple[dict, dict, dict]:
    """Write the ONNX models into ``tmp`` (at ``opts.opset``): FP32, plus FP16 versions of each
    (``opts.writes_fp16``), an INT8 encoder (``opts.int8``, :func:`add_int8_encoder`) and the in-graph
    pre/postprocessing models (``opts.in_graph``, :func:`add_graph_models`).
    Returns ``(models, skipped, int8_info)``: ``models[name][precision] = [files]``, ``skipped[name] = reason``,
    ``int8_info = {"record": manifest quantization.int8 record, "openvino": {name: [IR files]}}`` (empty without
    int8)."""
    models, skipped = export_fp32_models(run_model, tmp, opts.opset, log)
    if opts.writes_fp16:
        add_fp16_models(models, tmp, log)
    int8_info = (add_int8_encoder(run_model, models, tmp, opts.int8_method, opts.calibration_images, log,
                                  opts.openvino_int8)
                 if opts.int8 else {})
    if opts.in_graph:
        add_graph_models(run_model, models, tmp, opts.opset, log)
    return models, skipped, int8_info


def export_fp32_models(run_model, tmp: Path, opset: int, log: Log) -> tuple[dict, dict]:
    """The FP32 encoder, decoder and (prompt modes without a per-image box) fixed-prompt decoder:
    ``(models, skipped)`` as :func:`export_models` returns them."""
    from .graphs import fixed_prompt_points
    from .onnx_export import export_decoder, export_encoder, export_fixed_decoder

    sam, spec = run_model.sam, run_model.spec
    skipped: dict[str, str] = {}
    t = time.perf_counter()
    models = {"encoder": {"fp32": export_encoder(sam, spec, tmp / model_filename("encoder", "fp32"), opset)},
              "decoder": {"fp32": export_decoder(sam, tmp / model_filename("decoder", "fp32"), opset)}}
    if run_model.prompt.needs_ground_truth:
        skipped["decoder_fixed"] = (f"prompt mode {run_model.prompt.mode!r} needs each image's ground-truth box, "
                                    "so no prompt can be baked in; use decoder.onnx with the box as points 2/3")
    else:
        coords, labels = fixed_prompt_points(run_model.prompt, spec, run_model.working_size)
        models["decoder_fixed"] = {"fp32": export_fixed_decoder(sam, coords, labels,
                                                                tmp / model_filename("decoder_fixed", "fp32"), opset)}
    log(f"exported FP32 ONNX models in {time.perf_counter() - t:.1f} s")
    return models, skipped


def add_fp16_models(models: dict, tmp: Path, log: Log) -> None:
    """An FP16 version of every FP32 model (``models[name]["fp16"]``)."""
    from .onnx_export import convert_fp16

    t = time.perf_counter()
    for name in list(models):
        models[name]["fp16"] = convert_fp16(models[name]["fp32"][0], tmp / model_filename(name, "fp16"))
    log(f"converted to FP16 in {time.perf_counter() - t:.1f} s")


def add_int8_encoder(run_model, models: dict, tmp: Path, int8_method: str, calibration_images: int,
                     log: Log, openvino_int8: bool = True) -> dict:
    """The INT8 encoder (``models["encoder"]["int8"]``; the decoders' int8 entries name their FP32 files, see
    :data:`INT8_FP32_MODELS`): ``"static"`` calibrates on ``calibration_images`` training images
    (:func:`static_int8_encoder`; ``openvino_int8``: also the NNCF model), ``"dynamic"`` is onnxruntime's dynamic
    quantisation of the weight MatMuls. Returns ``int8_info`` (see :func:`export_models`)."""
    from .onnx_export import int8_record, quantize_int8

    t = time.perf_counter()
    src, dst = models["encoder"]["fp32"][0], tmp / model_filename("encoder", "int8")
    if int8_method == "dynamic":
        models["encoder"]["int8"] = quantize_int8(src, dst)
        int8_info = {"record": int8_record(), "openvino": {}}
        log(f"quantised the encoder to INT8 (dynamic, weight MatMuls) in {time.perf_counter() - t:.1f} s")
    elif int8_method == "static":
        models["encoder"]["int8"], int8_info = static_int8_encoder(run_model, src, dst, calibration_images, log,
                                                                   openvino_int8)
    else:
        raise ExportError(f"unknown --int8-method {int8_method!r}; choose static or dynamic")
    for name in INT8_FP32_MODELS:
        if name in models:
            models[name]["int8"] = models[name]["fp32"]
    return int8_info


def static_int8_encoder(run_model, src: Path, dst: Path, calibration_images: int, log: Log,
                        openvino_int8: bool = True) -> tuple[list, dict]:
    """Static INT8 encoders calibrated on training images: onnxruntime QDQ at ``dst``, and the NNCF OpenVINO IR
    beside it when openvino/nncf are installed and ``openvino_int8`` (:mod:`lungsam.export.quantize`). Returns
    ``(files, int8_info)``."""
    from .quantize import (
        OPENVINO_INT8_SUFFIX,
        calibration_inputs,
        openvino_available,
        quantize_openvino,
        quantize_static_onnx,
        static_record,
    )

    t = time.perf_counter()
    inputs, calib = calibration_inputs(run_model, calibration_images)
    files = quantize_static_onnx(src, dst, inputs)
    log(f"quantised the encoder to INT8 (onnxruntime static QDQ, per-channel, {calib['n']} training images) "
        f"in {time.perf_counter() - t:.1f} s")
    ov_files = {}
    if not openvino_int8:
        log("--no-openvino-int8: no OpenVINO (NNCF) INT8 encoder")
    elif openvino_available():
        t = time.perf_counter()
        xml = dst.parent / f"{model_filename('encoder', 'int8')[:-5]}{OPENVINO_INT8_SUFFIX}.xml"
        ov_files["encoder"] = quantize_openvino(src, xml, inputs)
        log(f"quantised the encoder to INT8 for OpenVINO (NNCF, {calib['n']} training images) in "
            f"{time.perf_counter() - t:.1f} s")
    else:
        log("openvino/nncf not installed: no OpenVINO INT8 encoder (pip install 'lungsam[int8]')")
    return files, {"record": static_record(calib, bool(ov_files)), "openvino": ov_files}


def add_graph_models(run_model, models: dict, tmp: Path, opset: int, log: Log) -> None:
    """``encoder_raw`` and ``decoder_mask`` (FP32; :mod:`lungsam.export.ingraph`): the decoded uint8 image in, the
    thresholded mask at the original size out. Needs ``decoder_fixed`` (checked before any export work by
    :func:`check_in_graph_request`)."""
    from .ingraph import export_mask_decoder, export_raw_encoder

    t = time.perf_counter()
    spec, s = run_model.spec, run_model.working_size
    models["encoder_raw"] = {"fp32": export_raw_encoder(run_model.sam, spec, s, tmp / model_filename("encoder_raw",
                                                                                                      "fp32"), opset)}
    models["decoder_mask"] = {"fp32": export_mask_decoder(models["decoder_fixed"]["fp32"][0], spec, s,
                                                          run_model.threshold, tmp / model_filename("decoder_mask",
                                                                                                     "fp32"))}
    log(f"exported the in-graph pre/postprocessing models (encoder_raw, decoder_mask) in "
        f"{time.perf_counter() - t:.1f} s")


def check_in_graph_request(run_model, run_dir: Path) -> None:
    """``--in-graph-preprocess`` needs a learned prompt that can be baked in (no per-image box)."""
    if run_model.prompt.needs_ground_truth:
        raise ExportError(f"--in-graph-preprocess, run {run_dir}: prompt mode {run_model.prompt.mode!r} needs each "
                          "image's box, so there is no fixed-prompt decoder to return masks; export without it")


def build_engines(run_model, tmp: Path, models: dict, max_batch: int, log: Log) -> dict:
    """TensorRT engines for every exported model; ``{name: record}`` (see :func:`lungsam.export.trt.build_engine`)."""
    from .graphs import fixed_prompt_points
    from .trt import build_engine, bundle_profiles, has_weak_typing

    trt = require_tensorrt()
    source = "fp32" if has_weak_typing(trt) else "fp16"
    sam, spec = run_model.sam, run_model.spec
    n_fixed = 0 if "decoder_fixed" not in models else len(fixed_prompt_points(run_model.prompt, spec,
                                                                                run_model.working_size)[0])
    profiles = bundle_profiles(spec.img_size, sam.prompt_encoder.embed_dim, spec.embedding_size, n_fixed, max_batch)
    engines = {}
    for name in [n for n in MODEL_NAMES if n in models]:  # the in-graph models have no engines
        t = time.perf_counter()
        engines[name] = build_engine(models[name][source][0], tmp / engine_filename(name), profiles[name],
                                     tmp / "timing.cache")
        log(f"built TensorRT engine {engine_filename(name)} in {time.perf_counter() - t:.1f} s")
    return engines


def openvino_precisions(models: dict, int8_info: dict) -> list[str]:
    """Precisions the parity gate checks with OpenVINO (empty when openvino is not installed): every exported
    one (int8 only with an NNCF encoder), plus bf16 (OpenVINO's hint on the FP32 models) on a CPU with native
    bfloat16."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return []
    from ..cpufeatures import cpu_features

    precs = [p for p in models["encoder"] if p != "int8" or (int8_info.get("openvino") or {}).get("encoder")]
    return precs + (["bf16"] if cpu_features()["native_bf16"] else [])


def run_parity(run_model, tmp: Path, models: dict, engines: dict, cases: list, log: Log,
               int8_info: dict | None = None) -> dict:
    """:class:`lungsam.export.parity.ParityResult` per pipeline ``"<onnx|openvino|trt>-<precision>/<decoder>"``,
    each with ``ms_per_image``: its wall time on the parity batches, all pipelines interleaved batch by batch
    (what ``--backend auto`` reads, :func:`lungsam.runtime.backends.auto_cpu_backend`)."""
    from .parity import JitterVariants, compare, onnx_pipeline, openvino_pipeline

    pipelines = {}
    for precision in models["encoder"]:
        for dec in ("decoder", "decoder_fixed"):
            if dec in models:
                pipelines[f"onnx-{precision}/{dec}"] = onnx_pipeline(models["encoder"][precision][0],
                                                                     models[dec][precision][0], dec == "decoder_fixed")
    ov_files = (int8_info or {}).get("openvino") or {}
    for precision in openvino_precisions(models, int8_info or {}):
        src = "fp32" if precision == "bf16" else precision
        enc = ov_files["encoder"][0] if precision == "int8" else models["encoder"][src][0]
        for dec in ("decoder", "decoder_fixed"):
            if dec in models:
                pipelines[f"openvino-{precision}/{dec}"] = openvino_pipeline(enc, models[dec][src][0],
                                                                             dec == "decoder_fixed", precision)
    if engines:
        from .trt import engine_pipeline

        for dec in ("decoder", "decoder_fixed"):
            if dec in engines:
                pipelines[f"trt-fp16/{dec}"] = engine_pipeline(tmp / engines["encoder"]["file"],
                                                               tmp / engines[dec]["file"], dec == "decoder_fixed")
    jitter = JitterVariants.of(run_qc(run_model), run_model.prompt, run_model.spec, run_model.working_size)
    if jitter is not None:
        log(f"parity: also at the quality flag's {len(jitter.names)} prompt variants (shift {jitter.shift})")
    return compare(pipelines, run_model.sam, run_model.spec, cases, run_model.threshold, log=log,
                   cleanup=run_cleanup(run_model), jitter=jitter)


def int8_gate(results: dict, max_f1_drop: float) -> list[str]:
    """INT8 pipelines whose mean F1 against ground truth is more than ``max_f1_drop`` below torch FP32's on the
    same images (the agreement floor is :func:`lungsam.export.parity.gate`'s, for every pipeline)."""
    failed = []
    for name, r in results.items():
        if "-int8/" in name:
            s = r.summary()
            if not s["f1_gt_mean"] >= s["f1_gt_torch_mean"] - max_f1_drop:
                failed.append(name)
    return failed


def int8_hint(int8_method: str, calibration_images: int, failed: list[str] = ()) -> str:
    """Which option to change when INT8 pipelines (``failed``: their names) fail the gate."""
    if int8_method == "static":
        if failed and all(f.startswith("openvino-int8/") for f in failed):
            return ("onnxruntime's static INT8 passed: export again with --no-openvino-int8 to keep it without the "
                    f"NNCF model, or try more calibration images (--calibration-images, now {calibration_images})")
        return (f"try --int8-method dynamic (weight MatMuls only), more calibration images (--calibration-images, now "
                f"{calibration_images}), or export without --int8")
    return "export without --int8 (dynamic quantisation has no further setting), or try --int8-method static"


def run_cleanup(run_model) -> CleanupSpec:
    """The fold's mask clean-up chosen on validation (``metrics.json`` ``postprocess``; absent: off)."""
    return CleanupSpec.from_dict(run_model.metrics.get("postprocess"))


def run_qc(run_model) -> dict | None:
    """The fold's quality-flag calibration as the manifest section ``qc`` (validated), or ``None``."""
    cal = load_calibration(run_model.metrics.get("qc"))
    return None if cal is None else cal.to_dict()


def file_records(root: Path) -> dict[str, FileRecord]:
    """``{relative posix path: FileRecord(sha256, bytes)}`` of every file under ``root`` except the manifest
    and its digest file."""
    return {p.relative_to(root).as_posix(): FileRecord(sha256_file(p), p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (MANIFEST_FILE, DIGEST_FILE)}


def private_parity_source(source: dict) -> dict:
    """The parity source record without folders and image ids: data set names and the count."""
    return {"data": [data_name(str(d)) for d in source["data"]], "selection": source["selection"], "n": source["n"]}


def private_config(config: dict) -> dict:
    """A run's training config with data set names instead of folders and the checkpoint's file name."""
    cfg = dict(config or {})
    cfg["data"] = [data_name(str(d)) for d in cfg.get("data") or []]
    if cfg.get("checkpoint"):
        cfg["checkpoint"] = Path(str(cfg["checkpoint"])).name
    return cfg


def checkpoint_summary(run: dict, provenance: bool) -> dict:
    """The backbone weights of a run for the manifest: file (name, or path with provenance), sha256 and
    whether they are the official ones (:func:`lungsam.weights.checkpoint_record`)."""
    from ..backbones import get_backbone
    from ..weights import checkpoint_record

    backbone = run["config"]["backbone"]
    rec = run.get("checkpoint") or checkpoint_record(get_backbone(backbone).weights, run["config"].get("checkpoint"),
                                                    run.get("weights_sha256") or "")
    rec = dict(rec)
    if not provenance and rec.get("path"):
        rec["path"] = Path(str(rec["path"])).name
    return rec


def run_record(run_model, run_dir: Path, provenance: bool) -> RunRecord:
    """The manifest's ``run``: name, fold, decoder weights, config, checkpoint, metrics (no per-image
    records); ``source`` (the run folder) only with ``provenance``."""
    fold_metrics = {k: v for k, v in run_model.metrics.items() if k not in ("per_image", "threshold_sweep")}
    run_metrics = RunLayout(run_dir).metrics_json
    config = run_model.run.get("config") or {}
    weights = FoldLayout(Path(run_model.fold_dir)).weights("decoder", "best")
    return RunRecord(source=str(run_dir.resolve()) if provenance else None, name=run_dir.resolve().name,
                     fold=run_model.fold, decoder_weights=weights.name, decoder_sha256=sha256_file(weights),
                     config=config if provenance else private_config(config),
                     checkpoint=checkpoint_summary(run_model.run, provenance), fold_metrics=fold_metrics,
                     metrics=read_json(run_metrics) if run_metrics.exists() else None)


def private_parity(parity: dict) -> dict:
    """The parity record without the host name, data folders, image ids and worst-image ids."""
    machine = {k: v for k, v in parity["machine"].items() if k != "hostname"}
    results = {name: {k: v for k, v in r.items() if k != "worst_image"} for name, r in parity["results"].items()}
    return {**parity, "source": private_parity_source(parity["source"]), "machine": machine, "results": results}


def first_pass_check(bundle_dir: Path, cases: list, log: Log) -> dict:
    """Score the bundle's two-pass path (box from its own first mask) on the parity images.

    Runs :class:`lungsam.runtime.LungSegmenter` (onnxruntime CPU, FP32, ``box_from_first_pass=True``) on
    each case's working image, so the figures are those of the code a deployment runs; the decoder graph
    itself is already gated by the parity check. Returns F1/IoU summaries against ground truth.
    """
    from ..metrics import f1_score, iou_score, summarize
    from ..runtime.segmenter import LungSegmenter

    seg = LungSegmenter.load(bundle_dir, backend="onnxruntime", device="cpu", precision="fp32",
                             box_from_first_pass=True)
    f1, iou, t0 = [], [], time.perf_counter()
    for c in cases:
        r = seg.segment(c.image)
        f1.append(f1_score(r.mask, c.mask))
        iou.append(iou_score(r.mask, c.mask))
    out = {"n": len(cases), "f1": summarize(f1), "iou": summarize(iou), "backend": "onnxruntime CPU fp32",
           "seconds": time.perf_counter() - t0,
           "what": "lungsam.runtime two-pass path: pass 1 learned points + mean-mask box, pass 2 the box of "
                   "pass 1's mask (sigmoid > threshold, working frame); no ground truth given"}
    log(f"first-pass box check (onnxruntime fp32, {len(cases)} images): F1 {out['f1']['mean']:.4f} "
        f"(min {out['f1']['min']:.4f}), IoU {out['iou']['mean']:.4f}, no box given")
    return out


def optional_exports(pipelines: list[str]) -> list[str]:
    """The export options behind parity pipelines ``"<onnx|trt>-<precision>/<decoder>"`` (FP32 ONNX is
    always written, so it has none): ``["onnx-int8/decoder", "trt-fp16/decoder"]`` -> ``["--int8", "--trt"]``."""
    opts = {"--trt" if p.startswith("trt-") else "--" + p.split("/")[0].split("-")[-1] for p in pipelines}
    return sorted(opts - {"--fp32"})


def model_entries(models: dict, openvino_files: dict | None = None) -> dict[str, dict[str, ModelEntry]]:
    """``{name: {precision: ModelEntry}}`` of the exported files (I/O read from each ONNX file); an NNCF INT8
    model for OpenVINO (``openvino_files[name]``, IR files) is recorded as the int8 entry's ``openvino``."""
    from .onnx_export import io_signature

    def entry(name: str, prec: str, files: list[Path]) -> ModelEntry:
        io = io_signature(files[0])
        specs = {k: tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in io[k])
                 for k in ("inputs", "outputs")}
        same = "fp32" if prec == "int8" and name in INT8_FP32_MODELS else None
        ov = (openvino_files or {}).get(name) if prec == "int8" else None
        return ModelEntry(file=files[0].name, files=tuple(f.name for f in files), same_as=same,
                          openvino=None if not ov else OpenVinoModel(ov[0].name, tuple(f.name for f in ov)), **specs)

    return {name: {prec: entry(name, prec, files) for prec, files in precs.items()} for name, precs in models.items()}


def build_manifest(run_model, run_dir: Path, tmp: Path, models: dict, skipped: dict, engines: dict,
                   parity: dict, opts: ExportOptions, int8_info: dict | None = None) -> Manifest:
    """The manifest (:mod:`lungsam.manifest`); ``files`` covers everything already in ``tmp``; ``export`` records
    ``opts``. Without ``opts.provenance`` it holds no host name, local path or held-out image id (see the module
    doc).

    INT8: ``quantization.int8`` is :func:`lungsam.export.quantize.static_record` (or ``onnx_export.int8_record``
    for ``--int8-method dynamic``) plus ``fp32_models``; an NNCF encoder for OpenVINO is
    ``models.encoder.int8.openvino = {file, files}`` beside the onnxruntime file.
    """
    int8_info = int8_info or {}
    provenance = opts.provenance
    return Manifest(
        format=BUNDLE_FORMAT, created=utc_now(), backbone=run_model.backbone, preprocess=run_model.spec,
        working_size=run_model.working_size, prompt=run_model.prompt, threshold=run_model.threshold,
        inference=InferencePolicy(box_from_first_pass=opts.box_from_first_pass), opset=opts.opset,
        postprocess=run_cleanup(run_model).to_dict(), qc=run_qc(run_model),
        precisions=tuple(sorted({p for m in models.values() for p in m})),
        models=model_entries(models, int8_info.get("openvino")),
        quantization=({"int8": {**int8_info["record"], "fp32_models": list(INT8_FP32_MODELS)}}
                      if "int8" in models.get("encoder", {}) else {}),
        skipped=skipped, engines=engines, timing_cache="timing.cache" if engines else None,
        parity=ParityRecord.from_dict(parity if provenance else private_parity(parity), "parity"),
        run=run_record(run_model, run_dir, provenance), export=opts.to_dict(), provenance=provenance,
        versions=package_versions(),
        files=file_records(tmp))


def write_manifest(folder: Path, manifest: Manifest) -> str:
    """Write ``manifest.json`` (strict JSON, validated) and :data:`DIGEST_FILE`; returns the bundle digest."""
    data = manifest.to_bytes()
    write_bytes_atomic(folder / MANIFEST_FILE, data)
    digest = manifest_digest(data)
    write_bytes_atomic(folder / DIGEST_FILE, digest_line(digest).encode("ascii"))
    return digest


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temp_folders(parent: Path, now: float | None = None) -> list[Path]:
    """Export temp folders in ``parent`` whose export is gone: made on this host by a process that no
    longer runs, or made elsewhere more than :data:`FOREIGN_TEMP_MAX_AGE_S` ago."""
    now = time.time() if now is None else now
    out = []
    with os.scandir(parent) as it:
        for e in it:
            m = re.fullmatch(re.escape(TEMP_PREFIX) + r"([A-Za-z0-9-]+)\.(\d+)\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX),
                             e.name)
            if not m or not e.is_dir(follow_symlinks=False):
                continue
            host, pid = m.group(1), int(m.group(2))
            if (host == _host_tag() and not _pid_alive(pid)) or now - e.stat(follow_symlinks=False).st_mtime > \
                    FOREIGN_TEMP_MAX_AGE_S:
                out.append(Path(e.path))
    return out


def make_temp_folder(out: Path, log: Log) -> Path:
    """Sweep the stale export temp folders beside ``out``, then create this export's one (raises
    :class:`ExportError` naming the folder when it cannot be written)."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_temp_folders(parent):
            shutil.rmtree(stale, ignore_errors=True)
            log(f"removed {stale.name}, left by an export that did not finish")
        return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{_host_tag()}.{os.getpid()}.", suffix=TEMP_SUFFIX,
                                     dir=parent))
    except OSError as e:
        raise ExportError(f"cannot write the bundle beside {out}: {e.filename or parent}: {e.strerror or e}") from None


def _make_readable(folder: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; give the bundle the usual umask permissions."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def export_bundle(run_dir: str | Path, out: str | Path, opts: ExportOptions | None = None, *, fold: int | None = None,
                  checkpoint: str | None = None, parity_images: int | None = None, data_dir: str | None = None,
                  log: Log | None = None) -> ExportResult:
    """Export a trained run to a bundle at ``out``, as ``opts`` (:class:`ExportOptions`, default: FP32 only) asks.

    Steps: load the run's ``fold`` (:func:`lungsam.runs.load_run`; default its best on validation, ``checkpoint``
    when the backbone weights recorded in run.json are not found); write ONNX FP32 (+FP16 with ``opts.fp16`` or
    ``opts.trt``, +INT8 encoders for CPUs with ``opts.int8``) and TensorRT engines (``opts.trt``) into a temporary
    folder beside ``out``; compare every exported pipeline with torch on held-out images (at most
    ``parity_images`` of the fold's test split, or of ``data_dir``); if each one's mean mask agreement reaches
    ``opts.min_agreement``, write ``manifest.json`` and rename the folder to ``out``. Otherwise nothing is left
    behind and :class:`ParityGateError` carries the figures.

    ``opts.box_from_first_pass`` (models prompted with a box): the bundle's default inference takes each image's
    box from the model's own first mask (``manifest["inference"]``); its accuracy on the parity images,
    through the runtime, is measured and recorded in ``manifest["inference"]["first_pass_check"]``.

    ``opts.provenance``: also record the run folder, data folders, checkpoint path, host name and parity image ids
    (left out by default: the bundle leaves the building). A full disk or a read-only folder raises
    :class:`ExportError` naming the path; nothing is left at ``out``.

    ``opts.int8``: see :func:`export_models` (``int8_method``, ``calibration_images``); every INT8 pipeline must
    also keep its mean F1 against ground truth within ``opts.max_int8_f1_drop`` of torch FP32's
    (:func:`int8_gate`). With openvino installed every precision is also gated through OpenVINO's CPU plugin
    (``openvino-*`` rows).

    ``opts.in_graph``: also write ``encoder_raw`` / ``decoder_mask`` (:mod:`lungsam.export.ingraph`), gated
    through the runtime against the host path on the parity images' files (:func:`lungsam.export.parity.
    in_graph_check`, recorded as ``manifest["parity"]["in_graph"]``). ``log``: progress lines (default: this
    module's logger at INFO).
    """
    log = log or logger.info
    opts = opts or ExportOptions()
    run_dir, out = Path(run_dir), Path(out)
    run_model = load_for_export(run_dir, out, fold, checkpoint, opts)
    from .parity import make_cases

    samples, source = parity_samples(run_model, data_dir, parity_images)
    cases = make_cases(samples, run_model.prompt, run_model.spec)
    log(f"exporting {run_dir} fold {run_model.fold} ({run_model.backbone}, prompt {run_model.prompt.mode}); "
        f"parity on {len(cases)} held-out images")
    tmp = make_temp_folder(out, log)
    try:
        manifest, digest, table = _build_in(tmp, run_model, run_dir, out, cases, source, opts, log, samples)
        move_into_place(tmp, out)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise ExportError(f"cannot write the bundle for {out}: {e.filename or tmp}: {e.strerror or e}; "
                          "nothing was written to --out") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out=out, manifest=manifest.to_dict(), table=table, digest=digest)


def load_for_export(run_dir: Path, out: Path, fold: int | None, checkpoint: str | None, opts: ExportOptions):
    """Check what can be checked before any export work (TensorRT present, ``out`` free, the run loadable, the
    prompt usable for ``--box-from-first-pass`` / ``--in-graph-preprocess``) and load the run."""
    from ..prompts import first_pass_prompt
    from ..runs import RunError, load_run

    if opts.trt:
        try:
            require_tensorrt()
            gpu_record()
        except TensorRTUnavailable as e:
            raise ExportError(str(e)) from None
    _check_out(out)
    try:
        run_model = load_run(run_dir, fold, checkpoint)
    except RunError as e:
        raise ExportError(str(e)) from None
    if opts.box_from_first_pass:
        try:
            first_pass_prompt(run_model.prompt)  # fails before any export work for a run trained without a box
        except ValueError as e:
            raise ExportError(f"--box-from-first-pass, run {run_dir}: {e}") from None
    if opts.in_graph:
        check_in_graph_request(run_model, run_dir)
    return run_model


def move_into_place(tmp: Path, out: Path) -> None:
    """Give the finished bundle the usual permissions and rename it to ``out`` (empty or absent, checked)."""
    _make_readable(tmp)
    if out.exists():
        out.rmdir()  # empty (checked before the export)
    tmp.rename(out)


def parity_record(run_model, source: dict, results: dict, opts: ExportOptions) -> dict:
    """The manifest's ``parity`` section (before :func:`private_parity`) from the gate's results."""
    parity = {"min_agreement": opts.min_agreement, "threshold": run_model.threshold, "source": source,
              "postprocess": run_cleanup(run_model).enabled,
              "metric": "agreement = F1 between exported and torch masks (working frame, sigmoid > threshold, "
                        "then the run's clean-up when on); "
                        "max_abs_logit_diff over low-res logits; torch = SAM preprocess + encoder + decode; "
                        "jitter (a run whose quality flag has a prompt-jitter term, prompted decoders): the same "
                        "agreement per image and prompt variant (qc.jitter.variants, decoded on each pipeline's own "
                        "embeddings), and |jitter IoU exported - torch| per image, max_log_odds_shift = its max x "
                        "weight / scale of the term (the largest move of the flag's log-odds)",
              "onnxruntime": "CPUExecutionProvider, ORT_ENABLE_ALL",
              # int8 kernels (and so its agreement) and the timings auto reads depend on the CPU's instructions
              "machine": {**machine_record(), "cpu_features": cpu_features()},
              "timing": "ms_per_image: wall time per image of each pipeline (encoder + decoder at the learned "
                        "prompt, batches of 2), the median over the batches after the first, pipelines interleaved "
                        "batch by batch on the same images; jitter.ms_per_image: the decoder calls at the flag's "
                        "prompt variants per image, decoded as the runtime does (one image at a time, equal point "
                        "counts in one call; median over the batches after the first), which the runtime adds to an "
                        "image when the flag has a jitter term",
              "results": {name: {**r.summary(), "ms_per_image": r.ms_per_image} for name, r in results.items()}}
    if opts.int8:
        parity["max_int8_f1_drop"] = opts.max_int8_f1_drop
    if any(r.jitter is not None for r in results.values()):
        parity["max_jitter_log_odds_shift"] = opts.max_jitter_log_odds_shift
    return parity


def check_gates(results: dict, opts: ExportOptions, out: Path, table: str, parity: dict) -> None:
    """Raise :class:`ParityGateError` (nothing is written to ``out``) when a pipeline misses the INT8 F1 gate or
    the agreement gate, with the option to change."""
    from .parity import failing

    failed_int8 = int8_gate(results, opts.max_int8_f1_drop) if opts.int8 else []
    why = failing(results, opts.min_agreement, opts.max_jitter_log_odds_shift)
    failed = list(why)
    # the hint names what to change for every INT8 pipeline that misses either gate
    hint_int8 = int8_hint(opts.int8_method, opts.calibration_images,
                          sorted(set(failed_int8) | {f for f in failed if "-int8/" in f}))
    if failed_int8:
        raise ParityGateError(f"INT8 gate failed for {', '.join(failed_int8)}: mean F1 against ground truth more than "
                              f"{opts.max_int8_f1_drop} below torch FP32 on the same images; nothing was written to "
                              f"{out}; {hint_int8}", table, parity)
    detail = "; ".join(f"{n}: {w}" for n, w in why.items())
    if failed and opts.int8 and all("-int8/" in f for f in failed):
        raise ParityGateError(f"parity gate failed against torch FP32 ({detail}); nothing was written to {out}; "
                              f"{hint_int8}", table, parity)
    if failed:
        options = optional_exports(failed)
        hint = f" (export again without {', '.join(options)} to keep the other models)" if options else ""
        raise ParityGateError(f"parity gate failed ({detail}); nothing was written to {out}{hint}", table, parity)


def _build_in(tmp: Path, run_model, run_dir: Path, out: Path, cases: list, source: dict, opts: ExportOptions,
              log: Log, samples: list) -> tuple[Manifest, str, str]:
    """Models, engines, parity gate and manifest in ``tmp``; returns ``(manifest, digest, parity table)``."""
    from .parity import format_table

    models, skipped, int8_info = export_models(run_model, tmp, opts, log)
    engines = build_engines(run_model, tmp, models, opts.max_batch, log) if opts.trt else {}
    results = run_parity(run_model, tmp, models, engines, cases, log, int8_info)
    table = format_table(results, opts.min_agreement, opts.max_jitter_log_odds_shift)
    parity = parity_record(run_model, source, results, opts)
    check_gates(results, opts, out, table, parity)
    manifest = build_manifest(run_model, run_dir, tmp, models, skipped, engines, parity, opts, int8_info)
    digest = write_manifest(tmp, manifest)
    if opts.in_graph:  # manifest.json is not among the files it hashes: rewriting it is safe
        manifest, digest, table = gate_in_graph(tmp, manifest, samples, out, table, log)
    if opts.box_from_first_pass:
        check = first_pass_check(tmp, cases, log)
        manifest.inference = replace(manifest.inference, first_pass_check=check)
        digest = write_manifest(tmp, manifest)
    return manifest, digest, table


def gate_in_graph(tmp: Path, manifest: Manifest, samples: list, out: Path, table: str, log: Log
                  ) -> tuple[Manifest, str, str]:
    """Run the in-graph gate (:func:`lungsam.export.parity.in_graph_check`) on the bundle in ``tmp``; record it as
    ``parity.in_graph`` and rewrite the manifest, or raise :class:`ParityGateError`. Returns
    ``(manifest, digest, table with the in-graph rows)``."""
    from .parity import format_in_graph_table, in_graph_check, in_graph_failures

    record = in_graph_check(tmp, samples, log)
    table = f"{table}\n{format_in_graph_table(record)}"
    parity = replace(manifest.parity, in_graph=record)
    failed = in_graph_failures(record)
    if failed:
        raise ParityGateError(f"in-graph gate failed for {', '.join(failed)}: the in-graph path's masks differ from "
                              f"the host path's beyond the tolerance ({record['tolerance']['rule']}); nothing was "
                              f"written to {out} (export without --in-graph-preprocess to keep the host path)",
                              table, parity.to_dict())
    manifest.parity = parity
    return manifest, write_manifest(tmp, manifest), table
