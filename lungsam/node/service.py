"""The DICOM node behind ``lungsam node``: a pynetdicom Storage SCP that spools chest radiographs durably, one
worker that segments the spool in arrival order, and one sender per destination (C-STORE / STOW-RS) that drains
its persistent outbox with backoff. Torch-free (uses :mod:`lungsam.runtime`).

Guarantees (tests/test_node_orthanc.py checks them against a real Orthanc):

* Success goes back to a C-STORE only after the object is in ``spool/`` (fsync + rename + fsync of the folder).
* Results are derived deterministically from the source (:func:`lungsam.runtime.dicom_out.result_uid`) and are in
  the outbox before the spool file is removed, so a restart after ``kill -9`` redoes at most the object in hand and
  produces the same instances.
* A send is recorded in ``sent.jsonl`` (fsync) before its outbox file is removed; anything in the ledger is never
  sent again. (A crash between the destination's acknowledgement and the ledger write can resend that one object,
  with the same SOP Instance UID, which a PACS stores once.)
"""
from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .config import CHEST_SOP_CLASSES, Destination, ModelConfig, NodeConfig
from .store import AuditLog, SentLedger, WorkDir

_LOG = logging.getLogger(__name__)
Log = Callable[[str], None]

#: C-STORE statuses (PS3.4 Annex B, PS3.7 C.4.2).
SUCCESS = 0x0000
REFUSED_OUT_OF_RESOURCES = 0xA700
REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
ERROR_CANNOT_UNDERSTAND = 0xC000
#: Statuses a destination answers when it has stored the object (success and the storage warnings).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
#: The SOP classes of lungsam's results (SEG, Comprehensive 3D SR, Secondary Capture).
RESULT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7")
CHEST_BODY_PARTS = {"", "CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS"}


class UnusableObject(ValueError):
    """A received object the node cannot segment (the reason names what is wrong)."""


def check_radiograph(ds: Any, accepted_sop_classes: tuple[str, ...]) -> None:
    """Refuse what is not a single-frame grayscale chest radiograph, naming the reason."""
    sop = str(ds.get("SOPClassUID", ""))
    if sop not in accepted_sop_classes:
        raise UnusableObject(f"SOP class {sop or '(none)'} is not a chest radiograph class this node accepts")
    if "PixelData" not in ds:
        raise UnusableObject("no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2") and sop in CHEST_SOP_CLASSES:
        raise UnusableObject(f"photometric interpretation {photometric or '(none)'} (a radiograph is MONOCHROME1/2)")
    body = str(ds.get("BodyPartExamined", "")).upper().strip()
    if body not in CHEST_BODY_PARTS:
        raise UnusableObject(f"not a chest image (BodyPartExamined {body})")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        raise UnusableObject(f"{frames} frames (a chest radiograph has one)")


def backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): ``initial_s * 2**(attempt-1)``, capped."""
    return min(max_s, initial_s * (2 ** max(0, attempt - 1)))


class Sender:
    """Sends one destination's outbox in order; stops at the first failure and reports it."""

    def __init__(self, dest: Destination, calling_ae_title: str):
        self.dest = dest
        self.calling_ae_title = calling_ae_title

    def send(self, paths: list[Path], on_sent) -> None:
        """Send ``paths`` in order, calling ``on_sent(path)`` after each acknowledged one; raises on the first
        failure (``ConnectionError`` / ``RuntimeError`` with the reason)."""
        if self.dest.kind == "c-store":
            self._c_store(paths, on_sent)
        else:
            self._stow(paths, on_sent)

    def _c_store(self, paths: list[Path], on_sent) -> None:
        import pydicom
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # noqa: F401  (registers the UIDs)

        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout_s
        for uid in RESULT_SOP_CLASSES:
            ae.add_requested_context(uid)
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title)
        if not assoc.is_established:
            raise ConnectionError(f"association with {self.dest.describe()} "
                                  f"{'rejected' if assoc.is_rejected else 'failed'}")
        try:
            for p in paths:
                ds = pydicom.dcmread(p)
                status = assoc.send_c_store(ds)
                code = int(getattr(status, "Status", -1)) if status else -1
                if code not in STORED:
                    raise RuntimeError(f"C-STORE of {p.name} to {self.dest.describe()}: "
                                       + ("no response" if code < 0 else f"status 0x{code:04X}"))
                on_sent(p)
        finally:
            if assoc.is_established:
                assoc.release()

    def _stow(self, paths: list[Path], on_sent) -> None:
        import pydicom

        client = self._dicomweb()
        for p in paths:
            ds = pydicom.dcmread(p)
            try:
                resp = client.store_instances([ds])
            except Exception as e:  # requests / HTTPError: the destination is down or refused
                raise ConnectionError(f"STOW-RS of {p.name} to {self.dest.describe()}: {type(e).__name__}: {e}") from e
            failed = resp.get("FailedSOPSequence") if resp is not None else None
            if failed:
                reason = failed[0].get("FailureReason", "?")
                raise RuntimeError(f"STOW-RS of {p.name} to {self.dest.describe()}: failure reason {reason}")
            on_sent(p)

    def _dicomweb(self):
        """A DICOMweb client without its own retries: the outbox retries, with the configured backoff."""
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(url=self.dest.url, session=self._session())
        client.set_http_retry_params(retry=False)
        return client

    def _session(self):
        """A requests session with the destination's credentials and every request bounded by ``timeout_s``."""
        import requests

        session = requests.Session()
        if self.dest.username:
            session.auth = (self.dest.username, self.dest.password() or "")
        session.request = _with_timeout(session.request, self.dest.timeout_s)
        return session

    def check(self) -> str:
        """Reach the destination: C-ECHO, or a DICOMweb QIDO query for one study. Returns a line; raises on failure."""
        if self.dest.kind == "c-store":
            from pynetdicom import AE
            from pynetdicom.sop_class import Verification

            ae = AE(ae_title=self.calling_ae_title)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout_s
            ae.add_requested_context(Verification)
            assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title)
            if not assoc.is_established:
                raise ConnectionError(f"{self.dest.describe()}: association "
                                      f"{'rejected' if assoc.is_rejected else 'failed'}")
            try:
                status = assoc.send_c_echo()
            finally:
                assoc.release()
            code = int(getattr(status, "Status", -1)) if status else -1
            if code != SUCCESS:
                why = "no response" if code < 0 else f"status 0x{code:04X}"
                raise ConnectionError(f"{self.dest.describe()}: C-ECHO {why}")
            return f"{self.dest.describe()}: C-ECHO ok"
        client = self._dicomweb()
        try:
            client.search_for_studies(limit=1)
        except Exception as e:
            raise ConnectionError(f"{self.dest.describe()}: QIDO-RS query failed: {type(e).__name__}: {e}") from e
        return f"{self.dest.describe()}: QIDO-RS ok"


def _with_timeout(request, timeout_s: float):
    def call(*args, **kwargs):
        kwargs.setdefault("timeout", timeout_s)
        return request(*args, **kwargs)
    return call


def load_segmenter(m: ModelConfig):
    """Open ``[model]``'s bundle (sha256 verified) with its backend and, with ``qc_site``, the site's flag line; a
    bundle that needs a box per image is refused."""
    from ..runtime.segmenter import LungSegmenter

    seg = LungSegmenter.load(m.bundle, backend=m.backend, device=m.device, precision=m.precision, threads=m.threads)
    if m.qc_site is not None:
        seg.use_site_operating_point(m.qc_site)
    if seg.needs_box:
        raise ValueError(f"bundle {m.bundle} needs a lung box per image (prompt {seg.prompt.mode!r}); export it "
                         "with --box-from-first-pass or use a points / auto-box / auto-both bundle")
    return seg


class Node:
    """One running node: :meth:`start` (load the bundle, resume, listen), :meth:`stop`."""

    def __init__(self, config: NodeConfig, log: Log | None = None):
        self.config = config
        self.log = log or _LOG.info
        self.work = WorkDir(config.work_dir, tuple(d.name for d in config.destinations))
        self.audit = AuditLog(self.work.audit_jsonl)
        self.ledger = SentLedger(self.work.sent_jsonl)
        self.stop_event = threading.Event()
        self.spool_ready = threading.Event()
        self.outbox_ready = {d.name: threading.Event() for d in config.destinations}
        self.segmenter = None
        self.server = None
        self.threads: list[threading.Thread] = []

    # -----------------------------------------------------------------------------------------
    def load_model(self):
        self.segmenter = load_segmenter(self.config.model)
        return self.segmenter

    def start(self) -> None:
        """Load the bundle, start the worker and senders (they resume the spool and outbox), then listen."""
        from ..runtime.dicom_out import bundle_digest

        seg = self.load_model()
        d = seg.describe()
        self.audit.write("node_started", ae_title=self.config.listen.ae_title, port=self.config.listen.port,
                         bundle=str(self.config.model.bundle), bundle_sha256=bundle_digest(seg.bundle),
                         backend=d["backend"], device=d["device"], precision=d["precision"],
                         qc_operating_point=d["qc_operating_point"], spooled=len(self.work.spooled()),
                         pending={n: len(self.work.pending(n)) for n in self.work.destinations})
        self.threads.append(threading.Thread(target=self._work_loop, name="lungsam-node-worker", daemon=True))
        for dest in self.config.destinations:
            self.threads.append(threading.Thread(target=self._send_loop, args=(dest,),
                                                 name=f"lungsam-node-send-{dest.name}", daemon=True))
        for t in self.threads:
            t.start()
        self.server = self._start_server()
        lc = self.config.listen
        self.log(f"lungsam node {lc.ae_title} listening on {lc.host}:{lc.port}"
                 f"{' (TLS)' if lc.tls else ''}; {d['backend']} on {d['device']} ({d['precision']}); destinations: "
                 + ", ".join(x.describe() for x in self.config.destinations))

    def stop(self) -> None:
        self.stop_event.set()
        self.spool_ready.set()
        for e in self.outbox_ready.values():
            e.set()
        if self.server is not None:
            self.server.shutdown()
        for t in self.threads:
            t.join(timeout=30)
        self.audit.write("node_stopped")
        self.audit.close()
        self.ledger.close()

    # -----------------------------------------------------------------------------------------
    # Storage SCP
    # -----------------------------------------------------------------------------------------
    def _start_server(self):
        from pynetdicom import AE, _config, evt
        from pynetdicom.sop_class import Verification

        _config.STORE_RECV_CHUNKED_DATASET = True  # received objects go to a temporary file, not memory
        lc = self.config.listen
        ae = AE(ae_title=lc.ae_title)
        ae.maximum_associations = 8
        ae.add_supported_context(Verification)
        for uid in lc.sop_classes:
            ae.add_supported_context(uid)
        ssl_context = None
        if lc.tls is not None:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(str(lc.tls.certificate), str(lc.tls.private_key))
            if lc.tls.ca_certificates is not None:
                ssl_context.verify_mode = ssl.CERT_REQUIRED
                ssl_context.load_verify_locations(str(lc.tls.ca_certificates))
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_C_ECHO, lambda event: SUCCESS), (evt.EVT_RELEASED, self._on_released),
                    (evt.EVT_ABORTED, self._on_aborted)]
        return ae.start_server((lc.host, lc.port), block=False, ssl_context=ssl_context, evt_handlers=handlers)

    @staticmethod
    def _peer(event) -> dict:
        r = event.assoc.requestor
        return {"calling_ae_title": str(r.ae_title).strip(), "address": r.address, "peer_port": r.port}

    def _on_requested(self, event) -> None:
        lc = self.config.listen
        peer = self._peer(event)
        peer["calling_ae_title"] = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        if lc.allowed_addresses and peer["address"] not in lc.allowed_addresses:
            self.audit.write("association_rejected", reason="address not allowed", **peer)
            self._reject(event, 0x01)  # rejected permanent, service user, no reason given
            return
        if lc.allowed_calling_ae_titles and peer["calling_ae_title"] not in lc.allowed_calling_ae_titles:
            self.audit.write("association_rejected", reason="calling AE title not allowed", **peer)
            self._reject(event, 0x03)  # rejected permanent, service user, calling AE title not recognised
            return
        self.audit.write("association_accepted", **peer)

    @staticmethod
    def _reject(event, diagnostic: int) -> None:
        """A-ASSOCIATE-RJ (permanent, by the service user) as pynetdicom's own negotiation sends it: the reject,
        then the association is killed, which lets the DUL deliver the PDU before the socket closes."""
        event.assoc.acse.send_reject(0x01, 0x01, diagnostic)
        event.assoc.kill()

    def _on_released(self, event) -> None:
        self.audit.write("association_released", **self._peer(event))

    def _on_aborted(self, event) -> None:
        self.audit.write("association_aborted", **self._peer(event))

    def _on_store(self, event) -> int:
        req = event.request
        sop_class, uid = str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID)
        peer = self._peer(event)
        if sop_class not in self.config.listen.sop_classes:
            self.audit.write("store_refused", reason="SOP class not supported", sop_class_uid=sop_class,
                             sop_instance_uid=uid, **peer)
            return REFUSED_SOP_CLASS_NOT_SUPPORTED
        try:
            path = Path(event.dataset_path)
            size = path.stat().st_size
        except (AttributeError, OSError) as e:
            self.audit.write("store_refused", reason=f"cannot read the received data: {e}", sop_instance_uid=uid,
                             **peer)
            return ERROR_CANNOT_UNDERSTAND
        if size > self.config.listen.max_object_bytes:
            self.audit.write("store_refused", reason=f"object of {size} bytes exceeds listen.max_object_mb",
                             sop_instance_uid=uid, bytes=size, **peer)
            return REFUSED_OUT_OF_RESOURCES
        try:
            spooled = self.work.spool_file(path, uid)
        except OSError as e:  # disk full, permissions: the sender must keep its copy
            self.audit.write("store_refused", reason=f"cannot spool: {e}", sop_instance_uid=uid, **peer)
            return REFUSED_OUT_OF_RESOURCES
        self.audit.write("received", sop_instance_uid=uid, sop_class_uid=sop_class, bytes=size, spool=spooled.name,
                         **peer)
        self.spool_ready.set()
        return SUCCESS

    # -----------------------------------------------------------------------------------------
    # worker: spool -> results -> outboxes
    # -----------------------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while not self.stop_event.is_set():
            self.spool_ready.clear()
            items = self.work.spooled()
            for path in items:
                if self.stop_event.is_set():
                    return
                try:
                    self.process(path)
                except OSError as e:  # the work folder itself (disk full): keep the spool file, retry later
                    self.audit.write("worker_error", spool=path.name, reason=f"{type(e).__name__}: {e}")
                    self.stop_event.wait(5.0)
                    break
            if not items:
                self.spool_ready.wait(timeout=1.0)

    def process(self, path: Path) -> None:
        """Segment one spool file; its results go to every destination's outbox, then the spool file goes.
        An unusable object goes to ``failed/`` with its reason."""
        import pydicom

        seq = path.name.split("_", 1)[0]
        t0 = time.perf_counter()
        uid = None
        try:
            try:
                ds = pydicom.dcmread(path)
            except Exception as e:  # pydicom raises many types for damaged files
                raise UnusableObject(f"unreadable DICOM ({type(e).__name__}: {e})") from e
            uid = str(ds.get("SOPInstanceUID", "")) or None
            check_radiograph(ds, self.config.listen.sop_classes)
            m = self.config.model
            made = self.segmenter.segment_dicom(ds, fractional=m.fractional, sr=m.sr,
                                                secondary_capture=m.secondary_capture)
        except Exception as e:  # one bad object never stops the node
            reason = str(e) if isinstance(e, ValueError) and str(e) else f"{type(e).__name__}: {e}"
            self.work.fail(path, reason, sop_instance_uid=uid)
            self.audit.write("failed", stage="segment", sop_instance_uid=uid, spool=path.name, reason=reason)
            return
        results = made.datasets()
        for dest in self.config.destinations:
            for n, ds_out in enumerate(results):
                kind = str(ds_out.Modality).lower()
                self.work.queue_result(dest.name, seq, n, kind, ds_out)
        self.work.remove(path)
        self.audit.write("processed", sop_instance_uid=uid, seconds=round(time.perf_counter() - t0, 3),
                         score=round(float(made.quality["score"]), 6), laterality=made.rule.basis,
                         results=[{"modality": str(d.Modality), "sop_instance_uid": str(d.SOPInstanceUID)}
                                  for d in results])
        for e in self.outbox_ready.values():
            e.set()

    # -----------------------------------------------------------------------------------------
    # senders: outbox -> destination
    # -----------------------------------------------------------------------------------------
    def _send_loop(self, dest: Destination) -> None:
        sender = Sender(dest, self.config.listen.ae_title)
        ready = self.outbox_ready[dest.name]
        attempt = 0
        retry = self.config.retry
        while not self.stop_event.is_set():
            ready.clear()
            todo = []
            for p in self.work.pending(dest.name):
                uid = self.work.result_uid_of(p)
                if (dest.name, uid) in self.ledger:  # acknowledged before a crash: never send twice
                    self.work.remove(p)
                    self.audit.write("already_sent", destination=dest.name, sop_instance_uid=uid)
                else:
                    todo.append(p)
            if not todo:
                ready.wait(timeout=1.0)
                continue

            def on_sent(p: Path) -> None:
                uid = self.work.result_uid_of(p)
                self.ledger.record(dest.name, uid)
                self.work.remove(p)
                self.audit.write("sent", destination=dest.name, sop_instance_uid=uid)

            try:
                sender.send(todo, on_sent)
                attempt = 0
            except Exception as e:  # down, refused, timed out: keep the outbox, back off, retry
                attempt += 1
                wait = backoff_s(attempt, retry.initial_s, retry.max_s)
                head = next((p for p in self.work.pending(dest.name)), None)
                self.audit.write("send_failed", destination=dest.name, attempt=attempt, retry_in_s=wait,
                                 reason=f"{type(e).__name__}: {e}")
                if retry.max_attempts and attempt >= retry.max_attempts and head is not None:
                    self.work.fail(head, f"not accepted by {dest.describe()} after {attempt} attempts: {e}",
                                   destination=dest.name)
                    self.audit.write("failed", stage="send", destination=dest.name,
                                     sop_instance_uid=self.work.result_uid_of(head), reason=str(e))
                    attempt = 0
                self.stop_event.wait(wait)


def run_check(config: NodeConfig, log: Log | None = None) -> bool:
    """``lungsam node --check``: the config is valid (already parsed), the bundle opens (sha256 verified) and every
    destination answers. Returns whether all passed; each step logs one line (``log``; default this module's
    logger at INFO)."""
    log = log or _LOG.info
    ok = True
    log(f"config {config.source}: ok ({len(config.destinations)} destinations, work_dir {config.work_dir})")
    try:
        d = load_segmenter(config.model).describe()
        log(f"bundle {config.model.bundle}: ok ({d['backbone']}, {d['backend']} on {d['device']}, {d['precision']})")
    except Exception as e:
        ok = False
        log(f"bundle {config.model.bundle}: FAILED: {e}")
    for dest in config.destinations:
        try:
            log(Sender(dest, config.listen.ae_title).check())
        except Exception as e:
            ok = False
            log(f"FAILED: {e}")
    return ok


def run_node(config: NodeConfig, log: Log | None = None) -> None:
    """Run until SIGINT / SIGTERM (``log``: where the node's lines go; default this module's logger at INFO)."""
    import signal

    log = log or _LOG.info
    node = Node(config, log=log)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        node.start()
        while not stop.wait(0.5):
            pass
        log("stopping")
    finally:
        node.stop()
        for s, h in old.items():
            signal.signal(s, h)
