"""``lungsam export ... --triton REPO``: a Triton Inference Server model repository from a bundle.

Layout (``NAME`` = ``--triton-name``, default ``lungsam``)::

    REPO/NAME_encoder/config.pbtxt, 1/model.onnx (+ its external data files)
    REPO/NAME_decoder_fixed/config.pbtxt, 1/model.onnx     (the run's learned prompt baked in)
    REPO/NAME_decoder/config.pbtxt, 1/model.onnx           (prompted decoder, for interactive prompts)
    REPO/NAME/config.pbtxt, 1/                             (ensemble: image -> encoder -> decoder_fixed)
    REPO/NAME.lungsam.json                                 (what was written from which bundle)

Every ``config.pbtxt`` is built as Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``),
written with ``google.protobuf.text_format`` and parsed back (:func:`validate_config`) before the repository is
moved into place. Tensors are float32 at the boundary, as in the bundle; the batch dimension is Triton's
(``max_batch_size``, dynamic batching). Preprocessing (read, working frame, resize + pad) and postprocessing
(low-res logits -> original size -> threshold) are not in the graphs: the client sends the raw padded model input
``(3, img, img)`` (0..255; the encoder normalises in-graph) and gets ``low_res_logits (1, 4E, 4E)`` and
``iou_predictions (1,)``, which is what :mod:`lungsam.runtime.triton_backend` does with the bundle's manifest.

Each model's ``parameters`` carry ``lungsam_bundle_manifest_sha256`` so a client can check that the server
serves the bundle it holds.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..artifacts import sha256_file, utc_now, write_text_atomic
from ..errors import LungsamError
from ..manifest import MANIFEST_FILE

BUNDLE_SHA_PARAMETER = "lungsam_bundle_manifest_sha256"
INSTANCE_KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")
REPOSITORY_FORMAT = "lungsam-triton-repository/1"
ENSEMBLE_OUTPUTS = ("low_res_logits", "iou_predictions")


class TritonRepositoryError(LungsamError, RuntimeError):
    """The repository cannot be written (message names the file or option)."""


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise TritonRepositoryError("--triton needs tritonclient (its model_config protobuf): "
                                    "pip install 'lungsam[triton]'") from e
    return model_config_pb2, text_format


def model_names(name: str) -> dict[str, str]:
    """Triton model names of a repository written with ``--triton-name name``."""
    return {"ensemble": name, "encoder": f"{name}_encoder", "decoder_fixed": f"{name}_decoder_fixed",
            "decoder": f"{name}_decoder"}


def _dims(shape: list[Any]) -> list[int]:
    """Manifest shape (batch first, symbolic axes as strings) -> Triton dims without the batch axis (-1 = dynamic)."""
    return [int(d) if isinstance(d, int) else -1 for d in shape[1:]]


def _tensors(pb, entries: list[dict], cls) -> list:
    out = []
    for e in entries:
        if e["dtype"] != "float32":
            raise TritonRepositoryError(f"tensor {e['name']} is {e['dtype']}; the bundle's I/O must be float32")
        out.append(cls(name=e["name"], data_type=pb.TYPE_FP32, dims=_dims(e["shape"])))
    return out


def onnx_model_config(name: str, entry: dict, *, max_batch: int, instances: int, kind: str, bundle_sha: str,
                      queue_delay_us: int):
    """``ModelConfig`` of one bundle ONNX model served by Triton's onnxruntime backend."""
    pb, _ = _pb()
    cfg = pb.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch,
                         default_model_filename="model.onnx")
    cfg.input.extend(_tensors(pb, entry["inputs"], pb.ModelInput))
    cfg.output.extend(_tensors(pb, entry["outputs"], pb.ModelOutput))
    cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    cfg.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    cfg.parameters[BUNDLE_SHA_PARAMETER].string_value = bundle_sha
    return cfg


def ensemble_config(names: dict[str, str], encoder: dict, decoder_fixed: dict, *, max_batch: int, bundle_sha: str):
    """``ModelConfig`` of the ensemble: ``image`` -> encoder -> ``embeddings`` -> decoder_fixed -> logits, iou."""
    pb, _ = _pb()
    cfg = pb.ModelConfig(name=names["ensemble"], platform="ensemble", max_batch_size=max_batch)
    cfg.input.extend(_tensors(pb, encoder["inputs"], pb.ModelInput))
    cfg.output.extend(_tensors(pb, [o for o in decoder_fixed["outputs"] if o["name"] in ENSEMBLE_OUTPUTS],
                               pb.ModelOutput))
    enc = cfg.ensemble_scheduling.step.add(model_name=names["encoder"], model_version=-1)
    enc.input_map["image"] = "image"
    enc.output_map["embeddings"] = "embeddings"
    dec = cfg.ensemble_scheduling.step.add(model_name=names["decoder_fixed"], model_version=-1)
    dec.input_map["embeddings"] = "embeddings"
    for out in ENSEMBLE_OUTPUTS:
        dec.output_map[out] = out
    cfg.parameters[BUNDLE_SHA_PARAMETER].string_value = bundle_sha
    return cfg


def validate_config(path: str | Path):
    """Parse ``config.pbtxt`` as Triton's ``ModelConfig`` (raises :class:`TritonRepositoryError` naming the file
    on any unknown field or bad value) and check the folder name equals the model name; returns the message."""
    pb, text_format = _pb()
    path = Path(path)
    cfg = pb.ModelConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), cfg)
    except text_format.ParseError as e:
        raise TritonRepositoryError(f"{path}: not a valid Triton model configuration ({e})") from e
    if cfg.name != path.parent.name:
        raise TritonRepositoryError(f"{path}: model name {cfg.name!r} differs from its folder {path.parent.name!r}")
    if not cfg.input or not cfg.output:
        raise TritonRepositoryError(f"{path}: a model needs inputs and outputs")
    return cfg


def _copy_model(bundle_root: Path, entry: dict, version_dir: Path) -> None:
    """The model as ``model.onnx``; its external data files keep their names (the graph refers to them)."""
    version_dir.mkdir(parents=True)
    shutil.copyfile(bundle_root / entry["file"], version_dir / "model.onnx")
    for rel in entry.get("files", [entry["file"]]):
        if rel != entry["file"]:
            shutil.copyfile(bundle_root / rel, version_dir / Path(rel).name)


def preflight(repo: str | Path, name: str) -> None:
    """Fail before an export starts: tritonclient missing, or the model names already taken in ``repo``."""
    _pb()
    clash = [n for n in model_names(name).values() if (Path(repo) / n).exists()]
    if clash:
        raise TritonRepositoryError(f"{repo}: models {', '.join(clash)} exist already; choose another --triton-name "
                                    "or a new repository")


def write_repository(bundle: str | Path, repo: str | Path, *, name: str = "lungsam", precision: str = "fp32",
                     max_batch: int = 8, instances: int = 1, kind: str = "KIND_AUTO",
                     queue_delay_us: int = 2000) -> dict[str, Any]:
    """Write (or add to) the Triton model repository ``repo`` from the bundle folder ``bundle``.

    Args:
        name: model name prefix (``name`` is the ensemble); existing models of that name are refused.
        precision: which of the bundle's ONNX models to serve (``fp32``, ``fp16``; ``int8`` is CPU onnxruntime).
        max_batch: Triton ``max_batch_size`` (dynamic batching forms batches up to it).
        instances, kind: ``instance_group`` (``KIND_AUTO``: GPU when the server has one).
        queue_delay_us: dynamic batching's ``max_queue_delay_microseconds``.
    Returns the record written to ``REPO/NAME.lungsam.json``.
    """
    if kind not in INSTANCE_KINDS:
        raise TritonRepositoryError(f"instance kind {kind!r}; choose from {', '.join(INSTANCE_KINDS)}")
    if max_batch < 1 or instances < 1 or queue_delay_us < 0:
        raise TritonRepositoryError("max_batch and instances must be >= 1, queue_delay_us >= 0")
    repo, root = Path(repo), Path(bundle)
    preflight(repo, name)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise TritonRepositoryError(f"{bundle}: not a bundle (no {MANIFEST_FILE})")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    bundle_sha = sha256_file(manifest_path)
    names = model_names(name)
    entries = served_entries(manifest, manifest_path, precision)
    configs = {names[model]: onnx_model_config(names[model], entry, max_batch=max_batch, instances=instances,
                                               kind=kind, bundle_sha=bundle_sha, queue_delay_us=queue_delay_us)
               for model, entry in entries.items()}
    configs[names["ensemble"]] = ensemble_config(names, entries["encoder"], entries["decoder_fixed"],
                                                 max_batch=max_batch, bundle_sha=bundle_sha)
    stage_repository(repo, root, {names[m]: e for m, e in entries.items()}, configs)
    record = {"format": REPOSITORY_FORMAT, "created": utc_now(), "bundle": str(root.resolve()),
              "bundle_manifest_sha256": bundle_sha, "precision": precision, "models": names,
              "max_batch_size": max_batch, "instance_group": {"count": instances, "kind": kind},
              "client": "sends the raw padded model input (B, 3, img, img) float32 0..255 (lungsam.preprocess."
                        "model_input); gets low_res_logits (B, 1, 4E, 4E) and iou_predictions (B, 1); "
                        "postprocessing with the bundle's manifest (lungsam.runtime, --backend triton)"}
    write_text_atomic(repo / f"{name}.lungsam.json", json.dumps(record, indent=2) + "\n")
    return record


def served_entries(manifest: dict, manifest_path: Path, precision: str) -> dict[str, dict]:
    """``{model: manifest entry}`` of the models served at ``precision``: the encoder and decoder_fixed (required:
    the ensemble runs them), the prompted decoder when present. The in-graph models are not served (yet)."""
    entries: dict[str, dict] = {}
    for model in ("encoder", "decoder_fixed", "decoder"):
        by_precision = manifest["models"].get(model) or {}
        if precision not in by_precision:
            if model == "decoder_fixed":
                raise TritonRepositoryError(
                    f"{manifest_path}: no {precision} decoder_fixed (a bundle whose prompt needs a box per image has "
                    "no fixed-prompt decoder, so no image -> mask ensemble); export with --prompt points, auto-box "
                    "or auto-both" if not by_precision else f"{manifest_path}: no {precision} models; export with "
                    f"--{precision}")
            if model == "encoder":
                raise TritonRepositoryError(f"{manifest_path}: no {precision} encoder; export with --{precision}")
            continue
        entries[model] = by_precision[precision]
    return entries


def stage_repository(repo: Path, bundle_root: Path, entries: dict[str, dict], configs: dict) -> None:
    """Write each model folder (``config.pbtxt`` validated, ``1/model.onnx``; ``entries`` keyed by Triton model
    name, the ensemble with an empty version folder) in a temporary folder inside ``repo``, then move them in."""
    _, text_format = _pb()
    repo.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".triton-", dir=repo) as tmp:
        stage = Path(tmp)
        for model_name in configs:
            if model_name in entries:
                _copy_model(bundle_root, entries[model_name], stage / model_name / "1")
            else:
                (stage / model_name / "1").mkdir(parents=True)  # Triton needs a version folder, even empty
            path = stage / model_name / "config.pbtxt"
            write_text_atomic(path, text_format.MessageToString(configs[model_name]))
            validate_config(path)
        for model_name in configs:
            (stage / model_name).rename(repo / model_name)
