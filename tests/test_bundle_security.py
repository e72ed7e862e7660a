"""A bundle is trusted only as far as it is checked (issue 21): the manifest is validated against its
schema before anything runs, the bundle digest pins the exact bundle, listed files are regular files
inside it, malformed manifests give a BundleError naming the key, and the manifest ships no host names,
local paths or held-out image ids unless the export asked for provenance."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lungsam.artifacts import sha256_file
from lungsam.cli import main
from lungsam.export.config import ExportOptions
from lungsam.manifest import DIGEST_FILE, Manifest, manifest_digest, parse_manifest
from lungsam.runtime import Bundle, BundleError, BundleIntegrityError, LungSegmenter

from .conftest import TINY_JITTER_SHIFT

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGE = REPO / "lungsam" / "demo_data" / "montgomery" / "images" / "MCUCXR_0001_0.png"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def bundle(tiny_bundle, tmp_path) -> Path:
    """A private copy of the session's tiny bundle (exported by the real ``export_bundle``)."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def read_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def write_manifest(root: Path, m: dict, *, digest_file: bool = False) -> None:
    """Rewrite ``manifest.json``; ``digest_file``: as a careful attacker would, update its digest file too."""
    (root / "manifest.json").write_text(json.dumps(m, indent=2))
    if digest_file:
        digest = manifest_digest((root / "manifest.json").read_bytes())
        (root / DIGEST_FILE).write_text(f"{digest}  manifest.json\n")


def rehash(root: Path, m: dict, rel: str) -> None:
    m["files"][rel] = {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}


def predict_cli(root: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["predict", str(root), str(DEMO_IMAGE), "--out", str(out), "--no-progress",
                                     *extra])


def no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# the schema: values that would take the host down or change results
# ---------------------------------------------------------------------------------------------

def test_working_size_1000000_is_refused_before_anything_runs(bundle, tmp_path):
    m = read_manifest(bundle)
    m["working_size"] = 1000000
    write_manifest(bundle, m, digest_file=True)  # a consistent digest file: the schema alone must refuse it
    with pytest.raises(BundleError, match=r"manifest\.working_size: 1000000 is outside 32\.\.2048"):
        Bundle.load(bundle)
    with pytest.raises(BundleError, match=r"manifest\.working_size"):
        LungSegmenter.load(bundle)
    r = predict_cli(bundle, tmp_path / "out")
    assert r.exit_code == 1 and "manifest.working_size" in r.output
    no_traceback(r)
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_unknown_prompt_mode_is_refused(bundle):
    m = read_manifest(bundle)
    m["prompt"]["mode"] = "telepathy"
    write_manifest(bundle, m, digest_file=True)
    with pytest.raises(BundleError, match=r"manifest\.prompt\.mode: unknown value 'telepathy'"):
        Bundle.load(bundle)


@pytest.mark.parametrize("edit, key", [
    (lambda m: m.update(threshold=1.5), r"manifest\.threshold: 1\.5 is outside \(0\.0, 1\.0\)"),
    (lambda m: m["prompt"]["points"][0].__setitem__(0, 1.7), r"manifest\.prompt\.points\[0\]\[0\]: 1\.7 is outside"),
    (lambda m: m["preprocess"].update(img_size=4096), r"manifest\.preprocess\.img_size: 4096 is outside"),
    (lambda m: m["preprocess"].update(embedding_size=7), r"manifest\.preprocess\.img_size: 128 is not a multiple"),
    (lambda m: m["models"]["encoder"]["fp32"]["outputs"][0].update(shape=["batch", 32, 16, 16]),
     r"manifest\.models\.encoder\.fp32\.outputs\[0\]\.shape: embeddings has shape"),
    (lambda m: m["models"]["decoder"]["fp32"]["inputs"][1].update(name="coords"),
     r"manifest\.models\.decoder\.fp32\.inputs: names"),
    (lambda m: m["models"]["decoder"]["fp32"]["outputs"][0].update(dtype="float64"),
     r"manifest\.models\.decoder\.fp32\.outputs\[0\]\.dtype: unknown value 'float64'"),
    (lambda m: m["models"].update(encoder={"fp32": {"file": "/etc/passwd"}}), r"outside the bundle"),
    (lambda m: m["models"].update(openvino={"fp32": {"file": "encoder.onnx"}}),
     r"manifest\.models\.openvino: unknown value"),
    (lambda m: m.update(surprise=1), r"manifest\.surprise: unknown key"),
])
def test_values_outside_the_schema_are_refused_naming_the_key(bundle, edit, key):
    m = read_manifest(bundle)
    edit(m)
    write_manifest(bundle, m, digest_file=True)
    with pytest.raises(BundleError, match=key):
        Bundle.load(bundle)


def _points(text: str, i: int, value: str) -> str:
    m = json.loads(text)
    m["prompt"]["points"][i] = json.loads(value)
    return json.dumps(m)


def _set(text: str, key: str, value) -> str:
    m = json.loads(text)
    m[key] = value
    return json.dumps(m)


def _deep_qc(text: str) -> str:
    m = json.loads(text)
    nested: list = []
    for _ in range(100):
        nested = [nested]
    m["qc"] = {"calibration": nested}
    return json.dumps(m)


MALFORMED = [
    (lambda t: _set(t, "working_size", None), r"manifest\.working_size: expected an integer, got null"),
    (lambda t: _set(t, "threshold", "0.5"), r"manifest\.threshold: expected a number, got a string"),
    (lambda t: _set(t, "prompt", []), r"manifest\.prompt: expected an object, got an array"),
    (lambda t: _set(t, "models", [["encoder.onnx"]]), r"manifest\.models: expected an object, got an array"),
    (lambda t: _points(t, 3, '"lung"'), r"manifest\.prompt\.points\[3\]: expected an array, got a string"),
    (lambda t: _set(t, "files", {"encoder.onnx": None}), r"manifest\.files\['encoder\.onnx'\]: expected an object"),
    (_deep_qc, r"manifest\.qc\.calibration(\[0\])+: nested deeper than"),
]


@pytest.mark.parametrize("edit, key", MALFORMED)
def test_malformed_manifests_give_a_bundle_error_naming_the_key(bundle, tmp_path, edit, key):
    raw = (bundle / "manifest.json").read_text()
    new = edit(raw)
    assert new != raw
    (bundle / "manifest.json").write_text(new)
    with pytest.raises(BundleError, match=key):
        Bundle.load(bundle)
    r = predict_cli(bundle, tmp_path / "out")
    assert r.exit_code == 1 and "manifest" in r.output
    no_traceback(r)


@pytest.mark.parametrize("raw, key", [
    ("[" * 200000 + "]" * 200000, "nested too deeply"),
    ('{"format": "lungsam-bundle/1", "threshold": NaN}', "NaN is not JSON"),
    ('{"format": "lungsam-bundle/1", "working_size": 1' + "0" * 5000 + "}", "not valid strict JSON"),
    ('{"format": "lungsam-bundle/1", "threshold": 1e999}', r"manifest\.threshold: inf is not a finite number"),
    ("\xff\xfe", "not UTF-8"),
])
def test_hostile_json_gives_a_bundle_error(bundle, raw, key):
    (bundle / "manifest.json").write_bytes(raw.encode("latin-1") if raw.startswith("\xff") else raw.encode())
    with pytest.raises(BundleError, match=key):
        Bundle.load(bundle)


# ---------------------------------------------------------------------------------------------
# the digest pins the bundle
# ---------------------------------------------------------------------------------------------

def test_edited_threshold_and_working_size_are_caught_by_digest_and_verify(bundle, tmp_path):
    digest = Bundle.load(bundle).digest
    assert digest == manifest_digest((bundle / "manifest.json").read_bytes())
    assert (bundle / DIGEST_FILE).read_text() == f"{digest}  manifest.json\n"
    m = read_manifest(bundle)
    m["threshold"], m["working_size"] = 0.9, 128  # inside the schema's ranges: only the digest tells
    write_manifest(bundle, m)
    with pytest.raises(BundleIntegrityError, match="the manifest was edited"):
        Bundle.load(bundle)  # the digest recorded at export
    r = CliRunner().invoke(main, ["verify", str(bundle)])
    assert r.exit_code == 1 and "the manifest was edited" in r.output
    write_manifest(bundle, m, digest_file=True)  # a careful attacker rewrites the digest file too
    assert Bundle.load(bundle).threshold == 0.9  # schema-valid, self-consistent...
    with pytest.raises(BundleIntegrityError, match=f"is not the expected {digest}"):
        Bundle.load(bundle, expect_digest=digest)  # ...but not the bundle that was validated
    with pytest.raises(BundleIntegrityError, match="is not the expected"):
        LungSegmenter.load(bundle, expect_digest=digest)
    r = CliRunner().invoke(main, ["verify", str(bundle), "--expect-digest", digest])
    assert r.exit_code == 1 and "is not the expected" in r.output
    r = predict_cli(bundle, tmp_path / "out", "--expect-digest", digest)
    assert r.exit_code == 1 and "is not the expected" in r.output
    no_traceback(r)


def test_verify_prints_what_it_checked_and_the_digest(bundle, tmp_path):
    digest = Bundle.load(bundle).digest
    r = CliRunner().invoke(main, ["verify", str(bundle), "--expect-digest", f"sha256:{digest.upper()}"])
    assert r.exit_code == 0, r.output
    for what in ("schema:", "digest: ", "digest file:", "files: 3 listed files"):
        assert what in r.output
    assert r.output.strip().endswith(f"digest sha256:{digest}")
    r = predict_cli(bundle, tmp_path / "out", "--expect-digest", digest)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "predict.json").read_text())  # ran


def test_other_decoder_weights_rehashed_into_the_manifest_pass_the_schema_but_not_the_digest(bundle):
    import onnx
    from onnx import numpy_helper

    digest = Bundle.load(bundle).digest
    path = bundle / "decoder_fixed.onnx"
    model = onnx.load(str(path))
    big = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # same architecture, other weights
    w = numpy_helper.to_array(big)
    big.CopyFrom(numpy_helper.from_array((w + 0.5).astype(w.dtype), big.name))
    onnx.save(model, str(path))
    m = read_manifest(bundle)
    rehash(bundle, m, "decoder_fixed.onnx")
    write_manifest(bundle, m, digest_file=True)
    b = Bundle.load(bundle)  # every hash matches the (rewritten) manifest: the schema cannot tell
    assert b.verified and b.digest != digest
    with pytest.raises(BundleIntegrityError, match="is not the expected"):
        Bundle.load(bundle, expect_digest=digest)
    assert CliRunner().invoke(main, ["verify", str(bundle), "--expect-digest", digest]).exit_code == 1


# ---------------------------------------------------------------------------------------------
# files: regular files inside the bundle only
# ---------------------------------------------------------------------------------------------

def test_symlink_out_of_the_bundle_is_refused_even_with_matching_bytes(bundle, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(bundle / "encoder.onnx", outside / "encoder.onnx")
    (bundle / "encoder.onnx").unlink()
    (bundle / "encoder.onnx").symlink_to(outside / "encoder.onnx")  # same bytes, same sha256
    with pytest.raises(BundleIntegrityError, match=r"encoder\.onnx: .*symlink"):
        Bundle.load(bundle)
    r = CliRunner().invoke(main, ["verify", str(bundle)])
    assert r.exit_code == 1 and "symlink" in r.output


def test_symlinked_folder_and_symlinked_manifest_are_refused(bundle, tmp_path):
    outside = tmp_path / "models"
    outside.mkdir()
    shutil.move(str(bundle / "decoder.onnx"), outside / "decoder.onnx")
    (bundle / "sub").symlink_to(outside, target_is_directory=True)
    m = read_manifest(bundle)
    m["files"]["sub/decoder.onnx"] = m["files"].pop("decoder.onnx")
    for entry in m["models"]["decoder"].values():
        entry["file"], entry["files"] = "sub/decoder.onnx", ["sub/decoder.onnx"]
    write_manifest(bundle, m, digest_file=True)
    with pytest.raises(BundleIntegrityError, match=r"sub/decoder\.onnx: .*symlinked folder"):
        Bundle.load(bundle)
    real = tmp_path / "manifest.json"
    shutil.move(str(bundle / "manifest.json"), real)
    (bundle / "manifest.json").symlink_to(real)
    with pytest.raises(BundleIntegrityError, match="not a regular file"):
        Bundle.load(bundle)


# ---------------------------------------------------------------------------------------------
# property: any mutation of a real manifest is a BundleError or the exported bundle itself
# ---------------------------------------------------------------------------------------------

def _paths(v, prefix=()):
    yield prefix
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, prefix + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, prefix + (i,))


def test_mutated_manifests_are_refused_or_identical_never_another_exception(tiny_bundle, tmp_path):
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    original = (tiny_bundle / "manifest.json").read_bytes()
    digest = manifest_digest(original)
    doc = json.loads(original)
    paths = list(_paths(doc))
    root = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    (root / DIGEST_FILE).unlink()  # the schema, not the digest file, must hold without --expect-digest
    values = st.recursive(
        st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 32, 2048, 2049, 10**9])
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
        | st.sampled_from(["points", "fp32", "encoder.onnx", "../x", "/etc/passwd", "batch", ".", "", "a/./b"]),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=8)

    def mutate(d, path, action, value):
        d = json.loads(json.dumps(d))
        if not path:
            return value if action == "set" else d
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        if action == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return d

    accepted = 0

    @seed(21)
    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.integers(0, len(paths) - 1), st.sampled_from(["set", "delete", "set"]), values, st.booleans())
    def check(i, action, value, as_bytes):
        nonlocal accepted
        if as_bytes:  # byte-level damage to the real text
            cut = i * 7 % len(original)
            data = original[:cut] + (json.dumps(value).encode() if action == "set" else b"") + original[cut + 1:]
        else:
            data = json.dumps(mutate(doc, paths[i], action, value)).encode()
        (root / "manifest.json").write_bytes(data)
        try:
            b = Bundle.load(root, expect_digest=digest, verify=False)
            assert data == original, "a changed manifest passed --expect-digest"
        except BundleError:
            pass
        try:
            b = Bundle.load(root, verify=False)
        except BundleError:
            return
        accepted += 1
        assert parse_manifest(b.meta.to_bytes()).to_dict() == b.meta.to_dict()  # what was accepted is valid

    check()
    assert accepted > 0  # some mutations (timestamps, metrics) are valid manifests, and loaded without error


def test_manifest_round_trips_through_the_typed_record(tiny_bundle):
    data = (tiny_bundle / "manifest.json").read_bytes()
    m = parse_manifest(data)
    assert isinstance(m, Manifest) and m.to_bytes() == data  # export writes exactly Manifest.to_bytes()
    assert m.models["encoder"]["fp32"].inputs[0].shape == ("batch", 3, 128, 128)
    assert m.run.fold == 0 and m.parity.min_agreement == 0.99 and m.provenance is False


def test_manifest_says_how_its_int8_encoder_was_made(tiny_bundle):
    from dataclasses import replace

    from lungsam.manifest import LEGACY_DYNAMIC_INT8_METHOD

    m = parse_manifest((tiny_bundle / "manifest.json").read_bytes())
    assert m.int8_method() is None  # exported without --int8
    for recorded, said in (("static", "static"), ("dynamic", "dynamic"), (LEGACY_DYNAMIC_INT8_METHOD, "dynamic")):
        assert replace(m, quantization={"int8": {"method": recorded}}).int8_method() == said


# ---------------------------------------------------------------------------------------------
# privacy
# ---------------------------------------------------------------------------------------------

def test_manifest_ships_no_host_paths_or_held_out_ids_by_default(tiny_bundle, tiny_run):
    text = (tiny_bundle / "manifest.json").read_text()
    m = json.loads(text)
    test_ids = json.loads((tiny_run / "folds" / "fold_0" / "split.json").read_text())["test"]
    leaks = [socket.gethostname(), str(tiny_run.resolve()), str(tiny_run.parent), str(Path.home()),
             str(Path.cwd()), *test_ids, *(i.split("/")[-1] for i in test_ids)]
    assert [x for x in leaks if x and x in text] == []
    assert "hostname" not in m["parity"]["machine"] and m["parity"]["machine"]["cpu"]  # the CPU model stays
    assert "ids" not in m["parity"]["source"] and m["parity"]["source"]["n"] == 3
    assert m["parity"]["source"]["data"] == ["demo:montgomery"] and m["run"]["name"] == tiny_run.name
    assert "source" not in m["run"] and m["provenance"] is False
    assert m["run"]["checkpoint"]["sha256"] and m["run"]["fold_metrics"]["test"]["f1"]["n"] == 3


# ---------------------------------------------------------------------------------------------
# export robustness
# ---------------------------------------------------------------------------------------------

def test_stale_export_temp_folders_are_swept_live_ones_kept(tmp_path):
    from lungsam.export.bundle import (
        FOREIGN_TEMP_MAX_AGE_S,
        _host_tag,
        make_temp_folder,
    )

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = int(done.stdout)  # a process that has exited
    host = _host_tag()
    stale = tmp_path / f".lungsam-export.{host}.{dead}.abc123.tmp"
    live = tmp_path / f".lungsam-export.{host}.{os.getpid()}.def456.tmp"
    foreign_young = tmp_path / ".lungsam-export.otherhost.1.x1.tmp"
    foreign_old = tmp_path / ".lungsam-export.otherhost.2.x2.tmp"
    for d in (stale, live, foreign_young, foreign_old):
        d.mkdir()
        (d / "encoder.onnx").write_bytes(b"x" * 1000)
    old = foreign_old.stat().st_mtime - FOREIGN_TEMP_MAX_AGE_S - 60
    os.utime(foreign_old, (old, old))
    logged: list[str] = []
    tmp = make_temp_folder(tmp_path / "bundle", logged.append)
    assert not stale.exists() and not foreign_old.exists()
    assert live.exists() and foreign_young.exists() and tmp.exists() and tmp.name.startswith(".lungsam-export.")
    assert len(logged) == 2


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")


@pytest.mark.parametrize("options, why", [("ro,size=1m", "Read-only file system"),
                                          ("size=300k", "No space left on device")])
def test_export_to_a_read_only_or_full_disk_is_a_clear_error(tiny_run, tmp_path, options, why):
    from lungsam.export.bundle import ExportError, export_bundle

    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, options)
    try:
        with pytest.raises(ExportError, match=f"cannot write the bundle .*{mnt}.*{why}"):
            export_bundle(tiny_run, mnt / "bundle", ExportOptions(max_jitter_log_odds_shift=TINY_JITTER_SHIFT),
                          parity_images=1, log=lambda m: None)
        assert not (mnt / "bundle").exists()
        assert [p.name for p in mnt.iterdir()] == []  # no temp folder left behind
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------------------------------------
# checkpoints and the run folder
# ---------------------------------------------------------------------------------------------

def _tiny_state(path: Path, drop: str | None = None) -> Path:
    import torch

    from lungsam.backbones import build_backbone

    state = build_backbone("tiny").state_dict()
    if drop:
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    torch.save(state, path)
    return path


@pytest.mark.parametrize("kind", ["random bytes", "text", "empty", "zip", "other architecture"])
def test_invalid_checkpoint_is_a_clear_error_and_leaves_no_run_folder(tmp_path, kind):
    bad = tmp_path / "weights.pt"
    if kind == "random bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        bad.write_text("not a checkpoint\n")
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "zip":
        import zipfile

        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("archive/data.pkl", b"garbage")
    else:
        _tiny_state(bad, drop="mask_decoder.")  # a state dict, but not all of tiny's keys
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--backbone", "tiny", "--checkpoint", str(bad), "--folds", "1",
                                  "--epochs", "1", "--out", str(out), "--quiet"])
    assert r.exit_code == 2, r.output
    assert f"--checkpoint {bad}: not a valid tiny checkpoint" in r.output
    no_traceback(r)
    assert not out.exists()


def test_train_into_a_read_only_folder_is_a_clear_error(tmp_path):
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "ro,size=1m")
    try:
        r = CliRunner().invoke(main, ["train", "--backbone", "tiny", "--folds", "1", "--epochs", "1",
                                      "--out", str(mnt / "run"), "--quiet"])
        assert r.exit_code == 1, r.output  # a failure (2 is for usage errors)
        assert f"cannot write the run folder {mnt / 'run'}" in r.output and "Read-only file system" in r.output
        no_traceback(r)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_run_records_its_checkpoint(tiny_run):
    run = json.loads((tiny_run / "run.json").read_text())
    assert run["checkpoint"] == {"path": None, "sha256": run["weights_sha256"], "official": None,
                                 "official_sha256": None}  # tiny: seeded weights, no official file


def test_non_official_checkpoint_is_warned_and_recorded_in_eval_metrics(tmp_path):
    import torch

    from .conftest import MOBILE_SAM, MONTGOMERY, need

    official = need(MOBILE_SAM)
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
        for p in sorted((need(MONTGOMERY) / sub).glob("*.png"))[:2]:
            shutil.copy(p, data / sub / p.name)
    resaved = tmp_path / "mobile_sam_resaved.pt"  # the same weights, other bytes
    torch.save(torch.load(official, map_location="cpu", weights_only=True), resaved)
    for ckpt, is_official in ((official, True), (resaved, False)):
        out = tmp_path / f"eval_{is_official}"
        r = CliRunner().invoke(main, ["eval", "--backbone", "mobile_sam", "--checkpoint", str(ckpt), "--encoder-size",
                                      "256", "--data", str(data), "--out", str(out), "--quiet"])
        assert r.exit_code == 0, r.output
        rec = json.loads((out / "metrics.json").read_text())["checkpoint"]
        assert rec["path"] == str(Path(ckpt).resolve()) and rec["sha256"] == sha256_file(ckpt)
        assert rec["official"] is is_official
        assert ("is not the official mobile_sam weights" in r.output) is not is_official


def test_eval_into_a_read_only_folder_is_a_clear_error(tiny_run, tmp_path):
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "ro,size=1m")
    try:
        r = CliRunner().invoke(main, ["eval", str(tiny_run), "--data", "demo:montgomery", "--split", "test",
                                      "--out", str(mnt / "eval"), "--quiet"])
        assert r.exit_code == 1, r.output  # a failure (2 is for usage errors)
        assert f"cannot write the evaluation folder {mnt / 'eval'}" in r.output and "Read-only" in r.output
        no_traceback(r)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
