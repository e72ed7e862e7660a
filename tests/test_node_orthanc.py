"""The DICOM node against a real Orthanc (Lua routing, DICOMweb plugin), dcmtk's storescu/echoscu and a real
bundle: the hospital flow end to end, and its faults. Skipped with the reason where the tools are absent."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
pytest.importorskip("pynetdicom")

from lungsam.node.commands import node as node_cmd
from lungsam.node.store import read_jsonl
from lungsam.runtime import dicom_out as do
from lungsam.runtime.bundle import Bundle
from lungsam.runtime.commands import predict

from .conftest import MONTGOMERY, need
from .dicom_samples import CT, chest_dataset, write_chest_dicom
from .pacs_harness import ECHOSCU, NodeProcess, Orthanc, free_port, missing_tools, node_toml, storescu, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))]


def images(n: int, start: int = 0) -> list[Path]:
    return sorted(need(MONTGOMERY / "images").glob("*.png"))[start:start + n]


def c_store_to(orthanc: Orthanc) -> dict:
    return {"name": "pacs", "kind": "c-store", "host": "127.0.0.1", "port": orthanc.dicom_port,
            "ae_title": orthanc.aet}


@pytest.fixture(scope="module")
def digest(tiny_bundle) -> str:
    return do.bundle_digest(Bundle.load(tiny_bundle))


@pytest.fixture(scope="module")
def stack(tiny_bundle, tmp_path_factory):
    """Orthanc that routes chest radiographs to a running node, which sends its results back by C-STORE."""
    root = tmp_path_factory.mktemp("pacs")
    node_port = free_port()
    orthanc = Orthanc(root / "orthanc", node_port).start()
    cfg = node_toml(root / "node.toml", work_dir=root / "work", port=node_port, bundle=tiny_bundle,
                    destinations=[c_store_to(orthanc)], allowed=["ORTHANC", "MODALITY"])
    node = NodeProcess(cfg, node_port, root / "node.log")
    try:
        node.start()
        yield orthanc, node, root
    finally:
        node.stop()
        orthanc.stop()


def seg_uid(ds, digest: str) -> str:
    return do.result_uid(ds.SOPInstanceUID, digest, "seg")


def wait_in_orthanc(orthanc: Orthanc, uids: list[str], timeout_s: float) -> dict[str, str]:
    def found():
        ids = {u: orthanc.lookup(u) for u in uids}
        return ids if all(ids.values()) else None
    return wait_until(found, timeout_s, f"{len(uids)} results in Orthanc", 0.3)


# ---------------------------------------------------------------------------------------------
# the flow
# ---------------------------------------------------------------------------------------------

def test_radiograph_sent_to_orthanc_comes_back_as_seg_and_sr_equal_to_lungsam_predict(stack, tiny_bundle, digest,
                                                                                      tmp_path):
    orthanc, node, root = stack
    src = write_chest_dicom(images(1)[0], tmp_path / "in" / "chest.dcm", index=100)
    ds = pydicom.dcmread(src)
    r = storescu([src], orthanc.dicom_port, orthanc.aet)
    assert r.returncode == 0, r.stderr
    sr_uid = do.result_uid(ds.SOPInstanceUID, digest, "sr")
    ids = wait_in_orthanc(orthanc, [seg_uid(ds, digest), sr_uid], 60)

    seg = pydicom.dcmread(io.BytesIO(orthanc.file(ids[seg_uid(ds, digest)])))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == ds.StudyInstanceUID
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (ds.SOPClassUID, ds.SOPInstanceUID)
    assert seg.FrameOfReferenceUID == ds.FrameOfReferenceUID
    sr = pydicom.dcmread(io.BytesIO(orthanc.file(ids[sr_uid])))
    evidence = {i.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                for s in e.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert evidence == {ds.SOPInstanceUID, seg.SOPInstanceUID}

    # the SEG from the PACS decodes (highdicom) to exactly what `lungsam predict` gives on the same file
    lungs = do.read_seg_masks(seg)
    res = CliRunner().invoke(predict, [str(tiny_bundle), str(src), "--out", str(tmp_path / "pred"), "--no-progress"])
    assert res.exit_code == 0, res.output
    mask = np.asarray(Image.open(tmp_path / "pred" / "chest_mask.png")) > 0
    np.testing.assert_array_equal(lungs["right"] | lungs["left"], mask)
    assert not (lungs["right"] & lungs["left"]).any()

    audit = (root / "work" / "audit.jsonl").read_text()
    events = [json.loads(line) for line in audit.splitlines()]
    assert any(e["event"] == "received" and e["sop_instance_uid"] == ds.SOPInstanceUID
               and e["calling_ae_title"] == "ORTHANC" for e in events)
    assert {e["sop_instance_uid"] for e in events if e["event"] == "sent"} >= {seg.SOPInstanceUID, sr_uid}
    assert "Test^Chest" not in audit and str(ds.PatientName) not in audit  # no patient names


def test_disallowed_calling_ae_title_and_non_chest_sop_class_are_refused(stack, tmp_path):
    orthanc, node, root = stack
    r = subprocess.run([ECHOSCU, "-aet", "INTRUDER", "-aec", "LUNGSAM", "-to", "5", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode != 0 and "Association Rejected" in r.stdout + r.stderr
    rejected = [e for e in read_jsonl(root / "work" / "audit.jsonl") if e["event"] == "association_rejected"]
    assert rejected and rejected[-1]["calling_ae_title"] == "INTRUDER"
    assert node.echo("MODALITY")  # an allowed title still gets in

    # a CT image: its storage presentation context is rejected (abstract syntax not supported)
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT)
    ae.add_requested_context(chest_dataset(images(1)[0]).SOPClassUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LUNGSAM")
    try:
        assert assoc.is_established
        ct = [c for c in assoc.rejected_contexts if c.abstract_syntax == CT]
        assert ct and ct[0].result == 0x03  # abstract syntax not supported
        assert CT not in {c.abstract_syntax for c in assoc.accepted_contexts}
    finally:
        assoc.release()


def test_corrupt_and_non_chest_objects_fail_with_reasons_and_good_ones_arrive(stack, digest, tmp_path):
    orthanc, node, root = stack
    good = [write_chest_dicom(p, tmp_path / f"good{i}.dcm", index=200 + i) for i, p in enumerate(images(2, 1))]
    truncated = chest_dataset(images(1, 3)[0], index=210)
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 3]  # Rows x Columns do not fit
    truncated.save_as(tmp_path / "truncated.dcm", enforce_file_format=True)
    knee = write_chest_dicom(images(1, 4)[0], tmp_path / "knee.dcm", index=211, body_part="KNEE")
    files = [good[0], tmp_path / "truncated.dcm", knee, good[1]]
    r = storescu(files, node.port, "LUNGSAM", calling="MODALITY")  # straight to the node
    assert r.returncode == 0, r.stderr
    wait_in_orthanc(orthanc, [seg_uid(pydicom.dcmread(p), digest) for p in good], 60)
    failures = {}
    for f in wait_until(lambda: len(list((root / "work" / "failed").glob("*.json"))) >= 2 and
                        list((root / "work" / "failed").glob("*.json")), 30, "2 failures"):
        info = json.loads(f.read_text())
        failures[info["sop_instance_uid"]] = info["reason"]
        assert f.with_suffix(".dcm").exists()  # the object itself is kept beside its reason
    assert "not a chest image (BodyPartExamined KNEE)" in failures[pydicom.dcmread(knee).SOPInstanceUID]
    assert "pixel" in failures[truncated.SOPInstanceUID].lower()
    assert node.proc.poll() is None and node.echo()  # the node keeps serving


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------

def test_results_wait_for_a_stopped_pacs_and_arrive_by_stow_rs_after_restart(stack, tiny_bundle, digest, tmp_path):
    orthanc, _, _ = stack
    port = free_port()
    cfg = node_toml(tmp_path / "node.toml", work_dir=tmp_path / "work", port=port, bundle=tiny_bundle,
                    destinations=[{"name": "web", "kind": "stow-rs", "url": orthanc.dicomweb, "timeout_s": 5}],
                    allowed=["MODALITY", "ORTHANC"], sr=False)
    node = NodeProcess(cfg, port, tmp_path / "node.log").start()
    try:
        files = [write_chest_dicom(p, tmp_path / f"{i}.dcm", index=300 + i) for i, p in enumerate(images(2, 5))]
        orthanc.stop()
        r = storescu(files, port, "LUNGSAM", calling="MODALITY")
        assert r.returncode == 0, r.stderr
        audit = tmp_path / "work" / "audit.jsonl"
        wait_until(lambda: sum(e["event"] == "send_failed" for e in read_jsonl(audit)) >= 2, 30, "failed sends")
        assert len(list((tmp_path / "work" / "outbox" / "web").glob("*.dcm"))) == 2  # kept in the outbox
        orthanc.start()
        wait_in_orthanc(orthanc, [seg_uid(pydicom.dcmread(p), digest) for p in files], 40)
        wait_until(lambda: not list((tmp_path / "work" / "outbox" / "web").glob("*.dcm")), 10, "an empty outbox")
    finally:
        node.stop()
        if orthanc.proc is None:
            orthanc.start()


def test_node_killed_mid_batch_completes_after_restart_without_duplicates(stack, tiny_bundle, digest, tmp_path):
    orthanc, _, _ = stack
    port = free_port()
    cfg = node_toml(tmp_path / "node.toml", work_dir=tmp_path / "work", port=port, bundle=tiny_bundle,
                    destinations=[c_store_to(orthanc)], allowed=["MODALITY", "ORTHANC"])
    node = NodeProcess(cfg, port, tmp_path / "node.log").start()
    audit = tmp_path / "work" / "audit.jsonl"
    files = [write_chest_dicom(p, tmp_path / f"{i}.dcm", index=400 + i) for i, p in enumerate(images(8, 10))]
    expected = [seg_uid(pydicom.dcmread(p), digest) for p in files]
    try:
        r = storescu(files, port, "LUNGSAM", calling="MODALITY")
        assert r.returncode == 0, r.stderr  # all 8 acknowledged: from now on none may be lost
        wait_until(lambda: any(e["event"] == "sent" for e in read_jsonl(audit)), 30, "a first result sent", 0.05)
        node.kill()  # kill -9 mid-batch
        sent_before = {e["sop_instance_uid"] for e in read_jsonl(audit) if e["event"] == "sent"}
        assert not set(expected) <= sent_before, "the batch finished before the kill; nothing was tested"
        node.start()
        wait_in_orthanc(orthanc, expected, 60)
        wait_until(lambda: not list((tmp_path / "work" / "outbox" / "pacs").glob("*.dcm")), 20, "an empty outbox")
    finally:
        node.stop()
    started = [e for e in read_jsonl(audit) if e["event"] == "node_started"]
    assert len(started) == 2 and (started[1]["spooled"] or started[1]["pending"]["pacs"])  # it resumed work
    assert started[0]["qc_operating_point"]["source"] == "bundle"  # the flag line the node ran with, audited
    ledger = [(e["destination"], e["sop_instance_uid"]) for e in read_jsonl(tmp_path / "work" / "sent.jsonl")]
    assert len(ledger) == len(set(ledger)) == 16  # SEG + SR for each of 8 images, each sent once
    sent = [e["sop_instance_uid"] for e in read_jsonl(audit) if e["event"] == "sent"]
    assert len(sent) == len(set(sent)) == 16
    assert set(expected) <= set(sent)


def test_node_check_reaches_destinations_and_reports_failures(stack, tiny_bundle, tmp_path):
    orthanc, _, _ = stack
    ok_cfg = node_toml(tmp_path / "ok.toml", work_dir=tmp_path / "w", port=free_port(), bundle=tiny_bundle,
                       destinations=[c_store_to(orthanc),
                                     {"name": "web", "kind": "stow-rs", "url": orthanc.dicomweb}])
    res = CliRunner().invoke(node_cmd, ["--config", str(ok_cfg), "--check"])
    assert res.exit_code == 0, res.output
    assert "C-ECHO ok" in res.output and "QIDO-RS ok" in res.output and "bundle" in res.output
    dead = {"name": "gone", "kind": "c-store", "host": "127.0.0.1", "port": free_port(), "ae_title": "NOBODY",
            "timeout_s": 3}
    bad_cfg = node_toml(tmp_path / "bad.toml", work_dir=tmp_path / "w2", port=free_port(), bundle=tiny_bundle,
                        destinations=[dead])
    res = CliRunner().invoke(node_cmd, ["--config", str(bad_cfg), "--check"])
    assert res.exit_code == 1 and "FAILED: gone (C-STORE NOBODY@127.0.0.1" in res.output


def tls_echo(port: int, ca: Path) -> bool:
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGSAM", tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed (makes the test certificate)")
def test_tls_listener_serves_tls_and_refuses_plain_connections(tiny_bundle, tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True,
                   timeout=60)
    port = free_port()
    cfg = node_toml(tmp_path / "node.toml", work_dir=tmp_path / "work", port=port, bundle=tiny_bundle,
                    destinations=[{"name": "pacs", "kind": "c-store", "host": "127.0.0.1", "port": free_port(),
                                   "ae_title": "PACS"}], allowed=["MODALITY", "ORTHANC"])
    text = cfg.read_text().replace("[model]", f'[listen.tls]\ncertificate = "{tmp_path / "cert.pem"}"\n'
                                              f'private_key = "{tmp_path / "key.pem"}"\n\n[model]')
    cfg.write_text(text)
    node = NodeProcess(cfg, port, tmp_path / "node.log").start(ready=lambda: tls_echo(port, tmp_path / "cert.pem"))
    try:
        assert tls_echo(port, tmp_path / "cert.pem")
        assert not node.echo()  # plain DICOM (dcmtk's echoscu without TLS) gets nowhere
    finally:
        node.stop()


def test_object_over_the_size_limit_is_refused_and_not_spooled(tiny_bundle, tmp_path):
    port = free_port()
    cfg = node_toml(tmp_path / "node.toml", work_dir=tmp_path / "work", port=port, bundle=tiny_bundle,
                    destinations=[{"name": "pacs", "kind": "c-store", "host": "127.0.0.1", "port": free_port(),
                                   "ae_title": "PACS"}], allowed=["MODALITY", "ORTHANC"], max_object_mb=0.1)
    node = NodeProcess(cfg, port, tmp_path / "node.log").start()
    try:
        big = write_chest_dicom(images(1)[0], tmp_path / "big.dcm", index=500)  # 512 x 512 bytes > 0.1 MiB
        r = storescu([big], port, "LUNGSAM", calling="MODALITY")
        assert r.returncode != 0  # the sender keeps its copy: Refused, Out of Resources (A700)
    finally:
        node.stop()
    refused = [e for e in read_jsonl(tmp_path / "work" / "audit.jsonl") if e["event"] == "store_refused"]
    assert len(refused) == 1 and "exceeds listen.max_object_mb" in refused[0]["reason"]
    assert not list((tmp_path / "work" / "spool").iterdir())
