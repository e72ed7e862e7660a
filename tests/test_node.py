"""lungsam node without servers: node.toml validation, the durable work folder, the radiograph checks, backoff."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")

from lungsam.node.config import CHEST_SOP_CLASSES, SECONDARY_CAPTURE, ConfigError, load_config
from lungsam.node.service import UnusableObject, backoff_s, check_radiograph
from lungsam.node.store import SentLedger, WorkDir, read_jsonl

from .conftest import REPO
from .dicom_samples import CT, chest_dataset

GOOD = """
work_dir = "work"
[listen]
ae_title = "LUNGSAM"
port = 11112
allowed_calling_ae_titles = ["ORTHANC"]
[model]
bundle = "bundles/lite"
[[destinations]]
name = "pacs"
kind = "c-store"
host = "10.0.0.5"
port = 4242
ae_title = "ORTHANC"
[[destinations]]
name = "web"
kind = "stow-rs"
url = "https://pacs.example/dicom-web/"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_config_parses_with_defaults_and_relative_paths(tmp_path):
    c = load_config(write(tmp_path, GOOD))
    assert c.work_dir == tmp_path / "work" and c.model.bundle == tmp_path / "bundles" / "lite"
    assert c.listen.sop_classes == CHEST_SOP_CLASSES and c.model.sr and not c.model.fractional
    assert [d.describe() for d in c.destinations] == ["pacs (C-STORE ORTHANC@10.0.0.5:4242)",
                                                      "web (STOW-RS https://pacs.example/dicom-web)"]
    sc = load_config(write(tmp_path, GOOD.replace("port = 11112", "port = 11112\naccept_secondary_capture = true")))
    assert SECONDARY_CAPTURE in sc.listen.sop_classes


def test_config_reads_qc_site_beside_the_config_and_refuses_a_missing_one(tmp_path):
    (tmp_path / "site.json").write_text("{}")  # read (and validated) when the node loads the bundle
    site = GOOD.replace('bundle = "bundles/lite"', 'bundle = "bundles/lite"\nqc_site = "site.json"')
    c = load_config(write(tmp_path, site))
    assert c.model.qc_site == tmp_path / "site.json"
    assert load_config(write(tmp_path, GOOD)).model.qc_site is None
    with pytest.raises(ConfigError, match="model.qc_site: .*missing.json: no such file"):
        load_config(write(tmp_path, GOOD.replace('bundle = "bundles/lite"',
                                                 'bundle = "bundles/lite"\nqc_site = "missing.json"')))


@pytest.mark.parametrize("change, message", [
    (("port = 11112", "port = 70000"), "listen.port: 70000 is not a TCP port"),
    (("port = 11112", "prot = 11112"), "listen.prot: unknown key"),
    (('ae_title = "LUNGSAM"', 'ae_title = "A_VERY_LONG_AE_TITLE"'), "listen.ae_title"),
    (('kind = "stow-rs"', 'kind = "ftp"'), "destinations[1].kind: 'ftp' is not one of"),
    (('url = "https://pacs.example/dicom-web/"', 'url = "pacs"'), "destinations[1].url"),
    (('host = "10.0.0.5"\n', ""), "destinations[0].host: missing"),
    (('bundle = "bundles/lite"', 'bundle = 3'), "model.bundle: expected str"),
    (('name = "web"', 'name = "pacs"'), "name 'pacs' is used twice"),
    (('work_dir = "work"', ""), "work_dir: missing"),
    (('ae_title = "ORTHANC"\n[[destinations]]', 'ae_title = "ORTHANC"\nurl = "http://x"\n[[destinations]]'),
     "destinations[0].url: only for kind stow-rs"),
    (('url = "https://pacs.example/dicom-web/"', 'url = "https://pacs.example/dicom-web/"\nport = 80'),
     "destinations[1].port: only for kind c-store"),
    (('url = "https://pacs.example/dicom-web/"', 'url = "https://pacs.example/dicom-web/"\nusername = "u"'),
     "destinations[1].password_env: username and password_env go together"),
    (('url = "https://pacs.example/dicom-web/"\n', ""), "destinations[1].url: missing (needed for kind stow-rs"),
])
def test_config_errors_name_the_file_and_key(tmp_path, change, message):
    p = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and message in str(e.value)


def test_config_refuses_bad_toml_and_tls_without_files(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "work_dir = "))
    with pytest.raises(ConfigError, match=r"listen\.tls\.certificate: .*no such file"):
        load_config(write(tmp_path, GOOD.replace("[model]", '[listen.tls]\ncertificate = "c.pem"\n'
                                                           'private_key = "k.pem"\n[model]')))


def test_work_dir_spools_durably_in_order_and_ledger_survives_restart(tmp_path):
    w = WorkDir(tmp_path / "w", ("pacs",))
    (w.incoming / "partial.tmp").write_bytes(b"x")
    src = tmp_path / "obj.dcm"
    src.write_bytes(b"data")
    a = w.spool_file(src, "1.2.3")
    b = w.spool_file(src, "1.2/../4")  # a hostile UID cannot escape the folder
    assert w.spooled() == [a, b] and b.parent == w.spool and "/" not in b.name[20:]
    assert [p.name for p in w.incoming.iterdir()] == ["partial.tmp"]  # spooling leaves nothing behind
    WorkDir(tmp_path / "w", ("pacs",))  # a restart clears partial writes only
    assert w.spooled() == [a, b] and not any(w.incoming.iterdir())
    moved = w.fail(a, "unreadable DICOM", sop_instance_uid="1.2.3")
    assert moved.exists() and json.loads(moved.with_suffix(".json").read_text())["reason"] == "unreadable DICOM"

    ledger = SentLedger(tmp_path / "w" / "sent.jsonl")
    ledger.record("pacs", "2.25.1")
    ledger.close()
    with open(tmp_path / "w" / "sent.jsonl", "a") as f:
        f.write('{"destination": "pacs", "sop_in')  # a torn last line from a crash
    again = SentLedger(tmp_path / "w" / "sent.jsonl")
    assert ("pacs", "2.25.1") in again and ("pacs", "2.25.2") not in again
    assert len(read_jsonl(tmp_path / "w" / "sent.jsonl")) == 1


def test_radiograph_checks_and_backoff(tmp_path):
    from .conftest import MONTGOMERY, need

    png = sorted(need(MONTGOMERY / "images").glob("*.png"))[0]
    check_radiograph(chest_dataset(png), CHEST_SOP_CLASSES)
    with pytest.raises(UnusableObject, match="not a chest image"):
        check_radiograph(chest_dataset(png, body_part="KNEE"), CHEST_SOP_CLASSES)
    with pytest.raises(UnusableObject, match="SOP class .* is not a chest radiograph class"):
        check_radiograph(chest_dataset(png, sop_class=CT), CHEST_SOP_CLASSES)
    ds = chest_dataset(png)
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(UnusableObject, match="photometric interpretation RGB"):
        check_radiograph(ds, CHEST_SOP_CLASSES)
    del ds.PixelData
    with pytest.raises(UnusableObject, match="no pixel data"):
        check_radiograph(ds, CHEST_SOP_CLASSES)
    assert [backoff_s(a, 2, 30) for a in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]


def test_node_package_imports_without_torch():
    code = ("import sys, lungsam.node.commands, lungsam.node.service, lungsam.node.config, lungsam.runtime.dicom_out\n"
            "bad = [m for m in ('torch', 'lungsam.train', 'lungsam.export') if m in sys.modules]\n"
            "assert not bad, bad\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
