"""The node's durable state under ``work_dir`` (one module names, writes and reads it all). Torch-free.

Layout::

    work_dir/incoming/            partial files (a crash leaves only these; removed at start)
    work_dir/spool/<seq>_<uid>.dcm        received objects, acknowledged, waiting to be segmented (in seq order)
    work_dir/outbox/<dest>/<seq>_<n>_<kind>_<uid>.dcm   results waiting for destination <dest>
    work_dir/failed/<name>.dcm + <name>.json    objects (or results) that could not be used, with the reason
    work_dir/sent.jsonl           ledger of acknowledged sends: {"destination", "sop_instance_uid", "time"}
    work_dir/audit.jsonl          audit log (JSON lines; UIDs, AE titles, addresses, no patient names)

Every file enters its folder by an fsync'ed write to ``incoming/`` and a rename, followed by an fsync of the folder,
so what the node acknowledged (spool) or decided to send (outbox) survives ``kill -9`` and power loss. ``<seq>`` is
the receive time in nanoseconds (20 digits), so names sort in arrival order. The ledger line is fsync'ed before
the outbox file is removed: after a restart a result already acknowledged by its destination is not sent again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_UID_CHARS = re.compile(r"[^0-9.]")


def safe_uid(uid: Any) -> str:
    """A UID fit for a file name (digits and dots, at most 64 characters; anything else becomes ``_``)."""
    s = _UID_CHARS.sub("_", str(uid or "unknown"))[:64]
    return s or "unknown"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def utc_stamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def strict_json(obj: Any) -> str:
    """One JSON line; NaN/Infinity are refused (strict JSON)."""
    return json.dumps(obj, allow_nan=False, sort_keys=False, separators=(",", ":"))


class AuditLog:
    """Append-only JSON lines ``{"time", "event", ...}``, each flushed and fsync'ed. Never pass patient names."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        line = strict_json({"time": utc_stamp(), "event": event, **fields})
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            self._f.close()


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file (a torn last line from a crash is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class SentLedger:
    """Which results each destination acknowledged (``sent.jsonl``), kept durable and in memory."""

    def __init__(self, path: Path):
        self.path = path
        self._sent = {(r["destination"], r["sop_instance_uid"]) for r in read_jsonl(path)
                      if "destination" in r and "sop_instance_uid" in r}
        self._lock = threading.Lock()
        self._f = open(path, "a", encoding="utf-8")

    def __contains__(self, key: tuple[str, str]) -> bool:
        with self._lock:
            return key in self._sent

    def record(self, destination: str, sop_instance_uid: str) -> None:
        line = strict_json({"destination": destination, "sop_instance_uid": sop_instance_uid, "time": utc_stamp()})
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
            self._sent.add((destination, sop_instance_uid))

    def close(self) -> None:
        with self._lock:
            self._f.close()


class WorkDir:
    """The folders and files of one node (see the module doc)."""

    def __init__(self, root: Path, destinations: tuple[str, ...]):
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.spool = self.root / "spool"
        self.failed = self.root / "failed"
        self.outbox_root = self.root / "outbox"
        self.destinations = destinations
        for d in (self.incoming, self.spool, self.failed, *(self.outbox(n) for n in destinations)):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.iterdir():  # partial writes of a crashed run; never acknowledged
            stale.unlink(missing_ok=True)

    def outbox(self, destination: str) -> Path:
        return self.outbox_root / destination

    @property
    def audit_jsonl(self) -> Path:
        """The audit log (:class:`AuditLog`)."""
        return self.root / "audit.jsonl"

    @property
    def sent_jsonl(self) -> Path:
        """The ledger of results sent (:class:`SentLedger`)."""
        return self.root / "sent.jsonl"

    # -----------------------------------------------------------------------------------------
    def _commit(self, write: Callable[[Path], None], dest: Path) -> Path:
        """Write via ``write(tmp)`` in ``incoming/``, fsync, rename onto ``dest``, fsync its folder."""
        tmp = self.incoming / f"{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(dest.parent)
        return dest

    @staticmethod
    def new_seq() -> str:
        return f"{time.time_ns():020d}"

    def spool_file(self, received: Path, sop_instance_uid: str) -> Path:
        """Copy a received file into the spool durably; returns its spool path."""
        dest = self.spool / f"{self.new_seq()}_{safe_uid(sop_instance_uid)}.dcm"
        return self._commit(lambda tmp: shutil.copyfile(received, tmp), dest)

    def spool_bytes(self, data: bytes, sop_instance_uid: str) -> Path:
        dest = self.spool / f"{self.new_seq()}_{safe_uid(sop_instance_uid)}.dcm"
        return self._commit(lambda tmp: tmp.write_bytes(data), dest)

    def spooled(self) -> list[Path]:
        """Spool files in arrival order."""
        return sorted(self.spool.glob("*.dcm"))

    def queue_result(self, destination: str, seq: str, n: int, kind: str, ds: Any) -> Path:
        """Write result ``ds`` (a pydicom Dataset) into ``outbox/<destination>`` durably. The name is fixed by the
        source's spool sequence, the result's index and its SOP Instance UID, so reprocessing after a crash
        overwrites rather than adds."""
        dest = self.outbox(destination) / f"{seq}_{n}_{kind}_{safe_uid(ds.SOPInstanceUID)}.dcm"
        return self._commit(lambda tmp: ds.save_as(tmp, enforce_file_format=True), dest)

    def pending(self, destination: str) -> list[Path]:
        return sorted(self.outbox(destination).glob("*.dcm"))

    @staticmethod
    def result_uid_of(path: Path) -> str:
        """The SOP Instance UID an outbox file name carries."""
        return path.stem.split("_", 3)[3]

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def fail(self, path: Path, reason: str, **facts: Any) -> Path:
        """Move ``path`` into ``failed/`` with ``<name>.json`` = ``{"reason", "time", ...facts}``."""
        dest = self.failed / path.name
        k = 1
        while dest.exists():
            dest = self.failed / f"{path.stem}.{k}{path.suffix}"
            k += 1
        info = strict_json({"reason": reason, "time": utc_stamp(), "file": path.name, **facts}) + "\n"
        self._commit(lambda tmp: tmp.write_text(info, encoding="utf-8"), dest.with_suffix(".json"))
        os.replace(path, dest)
        fsync_dir(self.failed)
        fsync_dir(path.parent)
        return dest

    def failures(self) -> Iterator[dict]:
        for p in sorted(self.failed.glob("*.json")):
            yield json.loads(p.read_text(encoding="utf-8"))
