"""``node.toml``: the DICOM node's configuration as validated dataclasses (tomllib). Torch-free.

Every error is a :class:`ConfigError` naming the file and the key (``listen.port``, ``destinations[1].url``, ...).
Unknown keys are refused (a typo must not silently fall back to a default). See docs/pacs.md for an example.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI (lungsam[dicom] depends on it there)
    import tomli as tomllib

from ..errors import LungsamError
from ..runtime import dicom_out
from ..runtime.dicom_out import SECONDARY_CAPTURE

#: SOP classes the node stores (DX for presentation / processing, CR) and, with ``accept_secondary_capture``, SC.
CHEST_SOP_CLASSES = tuple(dicom_out.CHEST_SOP_CLASSES)
DESTINATION_KINDS = ("c-store", "stow-rs")
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 printable characters, no backslash


class ConfigError(LungsamError, ValueError):
    """An invalid node configuration; the message names the file and the key."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the listening port: the node's ``certificate`` and ``private_key`` (PEM); with ``ca_certificates``
    callers must present a certificate signed by one of them."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None


@dataclass(frozen=True)
class ListenConfig:
    """The Storage SCP: its AE title, address and who may connect (empty lists: anyone)."""

    ae_title: str = "LUNGSAM"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_ae_titles: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ()
    max_object_mb: float = 200.0
    accept_secondary_capture: bool = False
    tls: TlsConfig | None = None

    @property
    def sop_classes(self) -> tuple[str, ...]:
        return CHEST_SOP_CLASSES + ((SECONDARY_CAPTURE,) if self.accept_secondary_capture else ())

    @property
    def max_object_bytes(self) -> int:
        return int(self.max_object_mb * 1024 * 1024)


@dataclass(frozen=True)
class ModelConfig:
    """The bundle and what to make from each radiograph (SEG always; SR and SC optional)."""

    bundle: Path
    backend: str = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    fractional: bool = False
    sr: bool = True
    secondary_capture: bool = False
    qc_site: Path | None = None  # a site's flag line (lungsam qc-site), as `lungsam predict --qc-site`


@dataclass(frozen=True)
class Destination:
    """Where results go: ``c-store`` (``host``, ``port``, ``ae_title`` of the PACS) or ``stow-rs`` (``url`` of a
    DICOMweb service; ``username`` with the password in the environment variable ``password_env``)."""

    name: str
    kind: str
    host: str | None = None
    port: int | None = None
    ae_title: str | None = None
    url: str | None = None
    username: str | None = None
    password_env: str | None = None
    timeout_s: float = 30.0

    def password(self) -> str | None:
        return None if self.password_env is None else os.environ.get(self.password_env)

    def describe(self) -> str:
        if self.kind == "c-store":
            return f"{self.name} (C-STORE {self.ae_title}@{self.host}:{self.port})"
        return f"{self.name} (STOW-RS {self.url})"


@dataclass(frozen=True)
class RetryConfig:
    """Backoff for a destination that is down: ``initial_s``, doubled after each failure up to ``max_s``;
    ``max_attempts`` 0 retries for ever (a result that reaches it goes to the failed folder)."""

    initial_s: float = 2.0
    max_s: float = 300.0
    max_attempts: int = 0


@dataclass(frozen=True)
class NodeConfig:
    """The whole ``node.toml``: ``work_dir`` (spool, outbox, failed, sent ledger, audit log), ``[listen]``,
    ``[model]``, ``[[destinations]]``, ``[retry]``."""

    work_dir: Path
    listen: ListenConfig
    model: ModelConfig
    destinations: tuple[Destination, ...]
    retry: RetryConfig = field(default_factory=RetryConfig)
    source: Path | None = None


# ---------------------------------------------------------------------------------------------

def _err(src: Path, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{src}: {key}: {msg}")


def _check_keys(src: Path, where: str, table: dict, cls: type, skip: tuple[str, ...] = ()) -> None:
    known = {f.name for f in fields(cls)} - set(skip)
    for k in table:
        if k not in known:
            raise _err(src, f"{where}{k}", f"unknown key (known: {', '.join(sorted(known))})")


def _typed(src: Path, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise _err(src, key, f"expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise _err(src, key, f"expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _ae(src: Path, key: str, value: Any) -> str:
    v = _typed(src, key, value, str)
    if not _AE.match(v) or not v.strip():
        raise _err(src, key, f"{v!r} is not an AE title (1-16 printable characters, no backslash)")
    return v


def _port(src: Path, key: str, value: Any) -> int:
    v = _typed(src, key, value, int)
    if not 1 <= v <= 65535:
        raise _err(src, key, f"{v} is not a TCP port (1-65535)")
    return v


def _path(src: Path, key: str, value: Any, base: Path) -> Path:
    p = Path(_typed(src, key, value, str)).expanduser()
    return p if p.is_absolute() else (base / p)


def _listen(src: Path, t: dict, base: Path) -> ListenConfig:
    _check_keys(src, "listen.", t, ListenConfig)
    kw: dict[str, Any] = {}
    if "ae_title" in t:
        kw["ae_title"] = _ae(src, "listen.ae_title", t["ae_title"])
    if "host" in t:
        kw["host"] = _typed(src, "listen.host", t["host"], str)
    if "port" in t:
        kw["port"] = _port(src, "listen.port", t["port"])
    if "allowed_calling_ae_titles" in t:
        v = _typed(src, "listen.allowed_calling_ae_titles", t["allowed_calling_ae_titles"], list)
        kw["allowed_calling_ae_titles"] = tuple(_ae(src, f"listen.allowed_calling_ae_titles[{i}]", a)
                                                for i, a in enumerate(v))
    if "allowed_addresses" in t:
        v = _typed(src, "listen.allowed_addresses", t["allowed_addresses"], list)
        kw["allowed_addresses"] = tuple(_typed(src, f"listen.allowed_addresses[{i}]", a, str) for i, a in enumerate(v))
    if "max_object_mb" in t:
        v = float(_typed(src, "listen.max_object_mb", t["max_object_mb"], (int, float)))
        if not v > 0:
            raise _err(src, "listen.max_object_mb", f"must be > 0, got {v}")
        kw["max_object_mb"] = v
    if "accept_secondary_capture" in t:
        kw["accept_secondary_capture"] = _typed(src, "listen.accept_secondary_capture",
                                                t["accept_secondary_capture"], bool)
    if "tls" in t:
        tls = _typed(src, "listen.tls", t["tls"], dict)
        _check_keys(src, "listen.tls.", tls, TlsConfig)
        for k in ("certificate", "private_key"):
            if k not in tls:
                raise _err(src, f"listen.tls.{k}", "missing (PEM file)")
        paths = {k: _path(src, f"listen.tls.{k}", v, base) for k, v in tls.items()}
        for k, p in paths.items():
            if not p.is_file():
                raise _err(src, f"listen.tls.{k}", f"{p}: no such file")
        kw["tls"] = TlsConfig(**paths)
    return ListenConfig(**kw)


def _model(src: Path, t: dict, base: Path) -> ModelConfig:
    _check_keys(src, "model.", t, ModelConfig)
    if "bundle" not in t:
        raise _err(src, "model.bundle", "missing (the exported bundle folder)")
    kw: dict[str, Any] = {"bundle": _path(src, "model.bundle", t["bundle"], base)}
    choices = {"backend": ("auto", "onnxruntime", "tensorrt"), "device": ("cpu", "cuda"),
               "precision": ("fp32", "fp16", "int8")}
    for k, allowed in choices.items():
        if k in t:
            v = _typed(src, f"model.{k}", t[k], str)
            if v not in allowed:
                raise _err(src, f"model.{k}", f"{v!r} is not one of {', '.join(allowed)}")
            kw[k] = v
    if "threads" in t:
        v = _typed(src, "model.threads", t["threads"], int)
        if v < 1:
            raise _err(src, "model.threads", f"must be >= 1, got {v}")
        kw["threads"] = v
    for k in ("fractional", "sr", "secondary_capture"):
        if k in t:
            kw[k] = _typed(src, f"model.{k}", t[k], bool)
    if "qc_site" in t:
        p = _path(src, "model.qc_site", t["qc_site"], base)
        if not p.is_file():
            raise _err(src, "model.qc_site", f"{p}: no such file (make it with lungsam qc-site)")
        kw["qc_site"] = p
    return ModelConfig(**kw)


def _c_store_keys(src: Path, where: str, t: dict) -> dict[str, Any]:
    """A ``c-store`` destination's ``host``, ``port`` and ``ae_title`` (required; the STOW-RS keys refused)."""
    for k in ("host", "port", "ae_title"):
        if k not in t:
            raise _err(src, where + k, "missing (needed for kind c-store)")
    for k in ("url", "username", "password_env"):
        if k in t:
            raise _err(src, where + k, "only for kind stow-rs")
    return {"host": _typed(src, where + "host", t["host"], str), "port": _port(src, where + "port", t["port"]),
            "ae_title": _ae(src, where + "ae_title", t["ae_title"])}


def _stow_rs_keys(src: Path, where: str, t: dict) -> dict[str, Any]:
    """A ``stow-rs`` destination's ``url`` (required, http(s)) and optional ``username`` with ``password_env``
    (together or not at all; the C-STORE keys refused)."""
    if "url" not in t:
        raise _err(src, where + "url", "missing (needed for kind stow-rs, e.g. http://pacs:8042/dicom-web)")
    for k in ("host", "port", "ae_title"):
        if k in t:
            raise _err(src, where + k, "only for kind c-store")
    url = _typed(src, where + "url", t["url"], str)
    if not re.match(r"^https?://[^/\s]+", url):
        raise _err(src, where + "url", f"{url!r} is not an http(s) URL")
    kw: dict[str, Any] = {"url": url.rstrip("/")}
    for k in ("username", "password_env"):
        if k in t:
            kw[k] = _typed(src, where + k, t[k], str)
    if ("username" in kw) != ("password_env" in kw):
        raise _err(src, where + "password_env", "username and password_env go together")
    return kw


def _destination(src: Path, i: int, t: dict) -> Destination:
    where = f"destinations[{i}]."
    _check_keys(src, where, t, Destination)
    for k in ("name", "kind"):
        if k not in t:
            raise _err(src, where + k, "missing")
    name = _typed(src, where + "name", t["name"], str)
    if not re.match(r"^[A-Za-z0-9_-]{1,64}$", name):
        raise _err(src, where + "name", f"{name!r}: use letters, digits, - and _ (it names a folder)")
    kind = _typed(src, where + "kind", t["kind"], str)
    if kind not in DESTINATION_KINDS:
        raise _err(src, where + "kind", f"{kind!r} is not one of {', '.join(DESTINATION_KINDS)}")
    kw: dict[str, Any] = {"name": name, "kind": kind}
    kw.update(_c_store_keys(src, where, t) if kind == "c-store" else _stow_rs_keys(src, where, t))
    if "timeout_s" in t:
        v = float(_typed(src, where + "timeout_s", t["timeout_s"], (int, float)))
        if not v > 0:
            raise _err(src, where + "timeout_s", f"must be > 0, got {v}")
        kw["timeout_s"] = v
    return Destination(**kw)


def _retry(src: Path, t: dict) -> RetryConfig:
    _check_keys(src, "retry.", t, RetryConfig)
    kw: dict[str, Any] = {}
    for k in ("initial_s", "max_s"):
        if k in t:
            v = float(_typed(src, f"retry.{k}", t[k], (int, float)))
            if not v > 0:
                raise _err(src, f"retry.{k}", f"must be > 0, got {v}")
            kw[k] = v
    if "max_attempts" in t:
        v = _typed(src, "retry.max_attempts", t["max_attempts"], int)
        if v < 0:
            raise _err(src, "retry.max_attempts", f"must be >= 0 (0 = for ever), got {v}")
        kw["max_attempts"] = v
    r = RetryConfig(**kw)
    if r.max_s < r.initial_s:
        raise _err(src, "retry.max_s", f"{r.max_s} is below retry.initial_s {r.initial_s}")
    return r


def parse_config(data: dict, source: Path) -> NodeConfig:
    """A parsed TOML table -> :class:`NodeConfig` (relative paths are relative to ``source``'s folder)."""
    base = source.resolve().parent
    for k in data:
        if k not in ("work_dir", "listen", "model", "destinations", "retry"):
            raise _err(source, k, "unknown key (known: work_dir, listen, model, destinations, retry)")
    if "work_dir" not in data:
        raise _err(source, "work_dir", "missing (folder for the spool, outbox, failed objects and audit log)")
    if "model" not in data:
        raise _err(source, "model", "missing ([model] with bundle = ...)")
    dests = _typed(source, "destinations", data.get("destinations", []), list)
    if not dests:
        raise _err(source, "destinations", "at least one [[destinations]] is needed (where results go)")
    parsed = tuple(_destination(source, i, _typed(source, f"destinations[{i}]", d, dict)) for i, d in enumerate(dests))
    names = [d.name for d in parsed]
    for n in names:
        if names.count(n) > 1:
            raise _err(source, "destinations", f"name {n!r} is used twice")
    return NodeConfig(work_dir=_path(source, "work_dir", data["work_dir"], base),
                      listen=_listen(source, _typed(source, "listen", data.get("listen", {}), dict), base),
                      model=_model(source, _typed(source, "model", data["model"], dict), base),
                      destinations=parsed, retry=_retry(source, _typed(source, "retry", data.get("retry", {}), dict)),
                      source=source)


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate ``node.toml``; raises :class:`ConfigError` naming the file and key."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    return parse_config(data, p)
