"""Reading and verifying exported bundles (``lungsam export`` -> ``lungsam.runtime``). Torch-free.

A bundle is a folder with ``manifest.json`` (format ``lungsam-bundle/1``, see docs/DEVELOPING.md) and the
model files it lists. :meth:`Bundle.load` checks the sha256 and size of every file listed under
``manifest["files"]`` and refuses a bundle where any is missing or changed, naming the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..artifacts import sha256_file
from ..preprocess import PreprocessSpec
from ..prompts import LearnedPrompt
from ..errors import LungsamError

BUNDLE_FORMAT = "lungsam-bundle/1"
MODEL_NAMES = ("encoder", "decoder", "decoder_fixed")
PRECISIONS = ("fp32", "fp16", "int8")  # int8: onnxruntime CPU only (dynamic quantisation)

#: ONNX I/O names fixed by the bundle format (docs/DEVELOPING.md).
ONNX_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "encoder": (("image",), ("embeddings",)),
    "decoder": (("embeddings", "point_coords", "point_labels"), ("low_res_logits", "iou_predictions")),
    "decoder_fixed": (("embeddings",), ("low_res_logits", "iou_predictions")),
}


class BundleError(LungsamError, ValueError):
    """A bundle that cannot be used (not a bundle, unknown format, missing model)."""


class BundleIntegrityError(BundleError):
    """A file listed in the manifest is missing or its bytes changed since export."""


@dataclass
class Bundle:
    """An exported model bundle.

    Attributes:
        root: the bundle folder.
        manifest: parsed ``manifest.json``.
        spec: the backbone's preprocessing (``manifest["preprocess"]``).
        working_size: S of the working frame.
        prompt: the run's learned prompt.
        threshold: probability threshold for the mask.
        verified: whether :meth:`verify` passed.
    """

    root: Path
    manifest: dict[str, Any]
    spec: PreprocessSpec
    working_size: int
    prompt: LearnedPrompt
    threshold: float
    verified: bool = False

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> "Bundle":
        """Read ``path`` (the bundle folder or its ``manifest.json``) and, by default, verify every file."""
        p = Path(path)
        root = p.parent if p.is_file() and p.name == "manifest.json" else p
        mpath = root / "manifest.json"
        if not root.exists():
            raise BundleError(f"{root}: no such bundle folder")
        if not mpath.is_file():
            raise BundleError(f"{root}: not a lungsam bundle (no manifest.json); create one with `lungsam export RUN`")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{mpath}: cannot read manifest ({e})") from e
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        if fmt != BUNDLE_FORMAT:
            raise BundleError(f"{mpath}: unsupported bundle format {fmt!r} (this runtime reads {BUNDLE_FORMAT!r})")
        for key in ("preprocess", "working_size", "prompt", "threshold", "models", "files"):
            if key not in manifest:
                raise BundleError(f"{mpath}: manifest has no {key!r} entry")
        try:
            spec = PreprocessSpec.from_dict(manifest["preprocess"])
            prompt = LearnedPrompt.from_dict(manifest["prompt"])
            working_size = int(manifest["working_size"])
            threshold = float(manifest["threshold"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{mpath}: invalid manifest ({type(e).__name__}: {e})") from e
        if not 0.0 < threshold < 1.0:
            raise BundleError(f"{mpath}: threshold {threshold} is not a probability in (0, 1)")
        bundle = cls(root=root, manifest=manifest, spec=spec, working_size=working_size, prompt=prompt,
                     threshold=threshold)
        if verify:
            bundle.verify()
        return bundle

    # -----------------------------------------------------------------------------------------
    def _resolve(self, rel: str) -> Path:
        pp = PurePosixPath(rel)
        if pp.is_absolute() or ".." in pp.parts or not pp.parts:
            raise BundleIntegrityError(f"{self.root}: manifest lists a path outside the bundle: {rel!r}")
        return self.root.joinpath(*pp.parts)

    def verify(self) -> None:
        """Check size and sha256 of every file under ``manifest["files"]``; raise :class:`BundleIntegrityError`
        naming each missing or changed file."""
        files = self.manifest["files"]
        if not isinstance(files, dict) or not files:
            raise BundleIntegrityError(f"{self.root}: manifest lists no files to verify")
        problems: list[str] = []
        for rel, entry in files.items():
            path = self._resolve(rel)
            if not path.is_file():
                problems.append(f"{rel}: missing")
                continue
            size = path.stat().st_size
            if "bytes" in entry and int(entry["bytes"]) != size:
                problems.append(f"{rel}: size {size} bytes, manifest says {entry['bytes']} (file changed)")
                continue
            digest = sha256_file(path)
            if digest != entry.get("sha256"):
                problems.append(f"{rel}: sha256 {digest[:12]}... does not match the manifest "
                                f"({str(entry.get('sha256'))[:12]}...) (file changed)")
        if problems:
            raise BundleIntegrityError(f"bundle {self.root} failed verification; re-export it or restore the files:\n  "
                                       + "\n  ".join(problems))
        self.verified = True

    # -----------------------------------------------------------------------------------------
    def has_model(self, name: str, precision: str = "fp32") -> bool:
        return precision in (self.manifest["models"].get(name) or {})

    def precisions(self, name: str) -> list[str]:
        return sorted((self.manifest["models"].get(name) or {}).keys())

    def model_entry(self, name: str, precision: str = "fp32") -> dict[str, Any]:
        """``manifest["models"][name][precision]``, with a clear error when absent."""
        entries = self.manifest["models"].get(name)
        if not entries:
            raise BundleError(f"bundle {self.root} has no {name!r} model")
        if precision not in entries:
            raise BundleError(f"bundle {self.root} has no {precision} {name!r} model (it has: "
                              f"{', '.join(sorted(entries)) or 'none'}); export with --{precision} to add them")
        return entries[precision]

    def model_path(self, name: str, precision: str = "fp32") -> Path:
        """Path of an ONNX model; it must be covered by the manifest's hashes."""
        return self._listed_file(self.model_entry(name, precision)["file"])

    def _listed_file(self, rel: str) -> Path:
        if rel not in self.manifest["files"]:
            raise BundleIntegrityError(f"bundle {self.root}: {rel} is not listed in manifest['files'] (unverifiable)")
        return self._resolve(rel)

    def engine_entry(self, name: str, precision: str) -> dict[str, Any] | None:
        """The TensorRT engine record for a model, or ``None``.

        Expected shape (``lungsam export RUN --trt``): ``manifest["engines"][name][precision] =
        {"file", "gpu", "compute_capability", "tensorrt"}``; a flat list of records that also carry
        ``name`` and ``precision`` is accepted too.
        """
        engines = self.manifest.get("engines")
        if not engines:
            return None
        if isinstance(engines, dict):
            e = engines.get(name)
            if isinstance(e, dict) and "file" in e:
                return e if e.get("precision", precision) == precision else None
            return (e or {}).get(precision) if isinstance(e, dict) else None
        for e in engines:
            if isinstance(e, dict) and e.get("name") == name and e.get("precision") == precision:
                return e
        return None

    def engine_path(self, entry: dict[str, Any]) -> Path:
        return self._listed_file(entry["file"])
