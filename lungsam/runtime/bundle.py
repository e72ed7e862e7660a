"""Reading and verifying exported bundles (``lungsam export`` -> ``lungsam.runtime``). Torch-free.

A bundle is a folder with ``manifest.json`` (format ``lungsam-bundle/1``, :mod:`lungsam.manifest`,
docs/DEVELOPING.md) and the model files it lists. :meth:`Bundle.load` validates the manifest against its
schema before anything runs, then checks that every listed file is a regular file inside the bundle (no
symlinks, also not of a folder on its way) with the sha256 and size the manifest records, and refuses the
bundle otherwise, naming the file or key. ``expect_digest`` pins the exact bundle: the sha256 of
``manifest.json``'s bytes (:attr:`Bundle.digest`), which covers every listed file.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..artifacts import sha256_file
from ..manifest import (
    BUNDLE_FORMAT,
    DIGEST_FILE,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MODEL_NAMES,
    ONNX_IO,
    PRECISIONS,
    BundleError,
    BundleIntegrityError,
    Manifest,
    manifest_digest,
    normalize_digest,
    parse_digest_line,
    parse_manifest,
)
from ..postprocess import CleanupSpec
from ..preprocess import PreprocessSpec
from ..prompts import LearnedPrompt
from ..qc import load_calibration

__all__ = ["BUNDLE_FORMAT", "MODEL_NAMES", "ONNX_IO", "PRECISIONS", "Bundle", "BundleError", "BundleIntegrityError"]


def _read_manifest_bytes(root: Path) -> bytes:
    """``manifest.json``'s bytes: a regular file (not a symlink) of bounded size."""
    mpath = root / MANIFEST_FILE
    try:
        st = os.lstat(mpath)
    except FileNotFoundError:
        raise BundleError(f"{root}: not a lungsam bundle (no {MANIFEST_FILE}); create one with `lungsam export RUN`"
                          ) from None
    except OSError as e:
        raise BundleError(f"{mpath}: cannot read manifest ({e.strerror or e})") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise BundleIntegrityError(f"{mpath}: not a regular file (a symlink or special file); refusing it")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath}: {st.st_size} bytes, more than a manifest may hold ({MAX_MANIFEST_BYTES})")
    try:
        with open(mpath, "rb") as f:
            return f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise BundleError(f"{mpath}: cannot read manifest ({e.strerror or e})") from None


@dataclass
class Bundle:
    """An exported model bundle.

    Attributes:
        root: the bundle folder.
        manifest: ``manifest.json`` as parsed JSON (kept for older callers; read :attr:`meta` instead).
        spec: the backbone's preprocessing (``meta.preprocess``).
        working_size: S of the working frame.
        prompt: the run's learned prompt.
        threshold: probability threshold for the mask.
        verified: whether :meth:`verify` passed.
        meta: the validated :class:`lungsam.manifest.Manifest` (``None`` only for hand-built bundles).
        digest: the bundle digest, sha256 of ``manifest.json``'s bytes (``None`` for hand-built bundles).
        checked: what :meth:`verify` checked, one line each (``lungsam verify`` prints them).
    """

    root: Path
    manifest: dict[str, Any]
    spec: PreprocessSpec
    working_size: int
    prompt: LearnedPrompt
    threshold: float
    verified: bool = False
    meta: Manifest | None = None
    digest: str | None = None
    checked: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True, expect_digest: str | None = None) -> Bundle:
        """Read ``path`` (the bundle folder or its ``manifest.json``), validate the manifest and, by default,
        verify every file. ``expect_digest``: refuse the bundle unless its digest is this one.

        Raises:
            BundleError: not a bundle or a malformed manifest (the message names the key path).
            BundleIntegrityError: a digest other than ``expect_digest``, or a listed file missing, changed,
                not a regular file, a symlink or outside the bundle.
        """
        want = None if expect_digest is None else normalize_digest(expect_digest)
        p = Path(path)
        root = p.parent if p.name == MANIFEST_FILE and p.is_file() else p
        if not root.is_dir():
            raise BundleError(f"{root}: no such bundle folder")
        data = _read_manifest_bytes(root)
        digest = manifest_digest(data)
        if want is not None and digest != want:
            raise BundleIntegrityError(f"bundle {root}: digest {digest} is not the expected {want}; this is not the "
                                       "bundle that was validated (manifest.json or a file it lists was changed)")
        meta = parse_manifest(data, str(root / MANIFEST_FILE))
        bundle = cls(root=root, manifest=json.loads(data), spec=meta.preprocess, working_size=meta.working_size,
                     prompt=meta.prompt, threshold=meta.threshold, meta=meta, digest=digest)
        bundle.checked.append(f"schema: {MANIFEST_FILE} is a valid {meta.format} manifest ({meta.backbone}, working "
                              f"size {meta.working_size}, model input {meta.preprocess.img_size}, prompt "
                              f"{meta.prompt.mode}, threshold {meta.threshold:.3f}, models "
                              f"{', '.join(meta.model_names())})")
        if want is not None:
            bundle.checked.append(f"digest: {digest} is the expected one")
        if verify:
            bundle.verify()
        return bundle

    # -----------------------------------------------------------------------------------------
    def _resolve(self, rel: str) -> Path:
        """The path of a listed file after checking that no part of it below the root is a symlink and
        that it resolves inside the root (raises :class:`BundleIntegrityError`)."""
        parts = rel.split("/")
        if not rel or rel.startswith("/") or any(x in ("", ".", "..") for x in parts):
            raise BundleIntegrityError(f"{self.root}: manifest lists a path outside the bundle: {rel!r}")
        path = self.root
        for part in parts:
            path = path / part
            if path.is_symlink():
                raise BundleIntegrityError(f"{self.root}: {rel} is a symlink or lies in a symlinked folder "
                                           f"({path.relative_to(self.root)}); bundle files must be regular files "
                                           "inside the bundle")
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise BundleIntegrityError(f"{self.root}: {rel} resolves outside the bundle")
        return path

    def verify(self) -> None:
        """Check every file under ``manifest.files``: a regular file inside the bundle (no symlink), with the
        recorded size and sha256; raise :class:`BundleIntegrityError` naming each problem."""
        files = self.meta.files if self.meta is not None else {}
        if not files:
            raise BundleIntegrityError(f"{self.root}: manifest lists no files to verify")
        problems: list[str] = []
        total = 0
        for rel, rec in files.items():
            try:
                path = self._resolve(rel)
                st = os.lstat(path)
            except BundleIntegrityError as e:
                problems.append(f"{rel}: {str(e).split(': ', 1)[-1]}")
                continue
            except FileNotFoundError:
                problems.append(f"{rel}: missing")
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: not a regular file")
                continue
            if rec.bytes is not None and rec.bytes != st.st_size:
                problems.append(f"{rel}: size {st.st_size} bytes, manifest says {rec.bytes} (file changed)")
                continue
            digest = sha256_file(path)
            if digest != rec.sha256:
                problems.append(f"{rel}: sha256 {digest[:12]}... does not match the manifest ({rec.sha256[:12]}...) "
                                "(file changed)")
            total += st.st_size
        problems += self._digest_file_problems()
        if problems:
            raise BundleIntegrityError(f"bundle {self.root} failed verification; re-export it or restore the files:\n  "
                                       + "\n  ".join(problems))
        self.checked.append(f"files: {len(files)} listed files are regular files inside the bundle (no symlinks) "
                            f"with the recorded size and sha256 ({total / 1e6:.1f} MB)")
        self.verified = True

    def _digest_file_problems(self) -> list[str]:
        """:data:`DIGEST_FILE` beside the manifest, when present, must record this manifest's digest."""
        path = self.root / DIGEST_FILE
        if self.digest is None:
            return []
        if not (path.exists() or path.is_symlink()):
            self.checked.append(f"digest file: no {DIGEST_FILE} (exported before bundle digests); only "
                                "--expect-digest pins this bundle")
            return []
        if path.is_symlink() or not path.is_file():
            return [f"{DIGEST_FILE}: not a regular file"]
        try:
            recorded = parse_digest_line(path.read_text(encoding="utf-8", errors="replace")[:4096], DIGEST_FILE)
        except BundleError as e:
            return [str(e)]
        if recorded != self.digest:
            edited = (f"{MANIFEST_FILE}: digest {self.digest[:12]}... differs from the one recorded at export in "
                      f"{DIGEST_FILE} ({recorded[:12]}...): the manifest was edited")
            return [edited]
        self.checked.append(f"digest file: {DIGEST_FILE} records this manifest's digest")
        return []

    def unlisted_files(self) -> list[str]:
        """Files in the bundle folder that the manifest does not list (never opened by the runtime)."""
        listed = set(self.meta.files) if self.meta is not None else set(self.manifest.get("files") or {})
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
                rel = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if rel not in listed and rel not in (MANIFEST_FILE, DIGEST_FILE):
                    out.append(rel)
        return sorted(out)

    # -----------------------------------------------------------------------------------------
    @property
    def backbone(self) -> str | None:
        return self.meta.backbone if self.meta is not None else self.manifest.get("backbone")

    @property
    def box_from_first_pass(self) -> bool:
        """The bundle's default prompt policy (``manifest.inference.box_from_first_pass``)."""
        return self.meta.inference.box_from_first_pass if self.meta is not None else False

    @cached_property
    def postprocess(self) -> CleanupSpec:
        """The mask clean-up (manifest ``postprocess``; absent: off), validated once; a bad section raises
        :class:`BundleError` naming the bundle."""
        try:
            return CleanupSpec.from_dict(self.manifest.get("postprocess"))
        except ValueError as e:
            raise BundleError(f"bundle {self.root}: {e}") from None

    @cached_property
    def quality_model(self):
        """The quality flag's calibration (manifest ``qc``, :func:`lungsam.qc.load_calibration`: a
        :class:`~lungsam.qc.QcModel`, a version 1 calibration, or ``None`` without one), parsed and validated once;
        a bad section raises :class:`BundleError` naming the bundle."""
        try:
            return load_calibration(self.manifest.get("qc"))
        except ValueError as e:
            raise BundleError(f"bundle {self.root}: {e}") from None

    def model_names(self) -> tuple[str, ...]:
        """The models present, in :data:`MODEL_NAMES` order."""
        if self.meta is not None:
            return self.meta.model_names()
        return tuple(n for n in MODEL_NAMES if (self.manifest.get("models") or {}).get(n))

    def _entries(self, name: str) -> dict:
        if self.meta is not None:
            return self.meta.models.get(name) or {}
        return (self.manifest.get("models") or {}).get(name) or {}

    def has_model(self, name: str, precision: str = "fp32") -> bool:
        return precision in self._entries(name)

    def precisions(self, name: str) -> list[str]:
        return sorted(self._entries(name))

    def model_entry(self, name: str, precision: str = "fp32") -> dict[str, Any]:
        """``manifest["models"][name][precision]`` as a dict, with a clear error when absent."""
        entries = self._entries(name)
        if not entries:
            raise BundleError(f"bundle {self.root} has no {name!r} model")
        if precision not in entries:
            raise BundleError(f"bundle {self.root} has no {precision} {name!r} model (it has: "
                              f"{', '.join(sorted(entries)) or 'none'}); export with --{precision} to add them")
        e = entries[precision]
        return e.to_dict() if hasattr(e, "to_dict") else e

    def model_path(self, name: str, precision: str = "fp32") -> Path:
        """Path of an ONNX model; it must be covered by the manifest's hashes."""
        return self._listed_file(self.model_entry(name, precision)["file"])

    def _listed_file(self, rel: str) -> Path:
        listed = self.meta.files if self.meta is not None else (self.manifest.get("files") or {})
        if rel not in listed:
            raise BundleIntegrityError(f"bundle {self.root}: {rel} is not listed in manifest['files'] (unverifiable)")
        return self._resolve(rel)

    def engine_entry(self, name: str, precision: str) -> dict[str, Any] | None:
        """The TensorRT engine record for a model, or ``None``.

        Expected shape (``lungsam export RUN --trt``): ``manifest["engines"][name][precision] =
        {"file", "gpu", "compute_capability", "tensorrt"}``; a flat list of records that also carry
        ``name`` and ``precision`` is accepted too.
        """
        engines = self.meta.engines if self.meta is not None else self.manifest.get("engines")
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
