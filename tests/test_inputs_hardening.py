"""Inputs and outputs of the runtime (issue 21): a pixel limit checked from the header, garbage refused with a
reason, strict JSON, ImageReadError only (fuzzed), folder inputs with skipped files listed, exact ground-truth
names, output folders a later reader can trust (refused unless empty / --overwrite, run marker, records
appended as they complete, write errors named), and no onnxruntime telemetry files outside --out."""
from __future__ import annotations

import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lungsam.artifacts import dumps_json, loads_json_strict, write_json_atomic
from lungsam.imageio import ImageReadError, read_image, scan_inputs
from lungsam.runtime.commands import predict

from .conftest import REPO
from .test_runtime import write_dicom

DEMO = REPO / "lungsam" / "demo_data" / "montgomery" / "images"


def demo_images(n: int) -> list[Path]:
    return sorted(DEMO.glob("*.png"))[:n]


def run_predict(bundle: Path, *args: str):
    return CliRunner().invoke(predict, [str(bundle), *map(str, args), "--threads", "1", "--no-progress"])


def records(out: Path) -> list[dict]:
    return [loads_json_strict(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def by_name(out: Path) -> dict[str, dict]:
    return {Path(r["file"]).name: r for r in records(out)}


def png_header_only(path: Path, width: int, height: int, bit_depth: int = 16) -> Path:
    """A PNG whose IHDR states ``width x height`` (grey, ``bit_depth``) followed by one tiny IDAT: the size
    is known after opening; decoding would need the full image buffer."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def set_raw(ds, tag: int, vr: str, value: bytes) -> None:
    """Put an element's raw bytes into a pydicom data set (values pydicom would refuse to write)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    if len(value) % 2:
        value += b" "
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def dicom_with(tmp_path: Path, name: str, stored: np.ndarray, **raw: tuple[int, str, bytes]) -> Path:
    import pydicom

    p = write_dicom(tmp_path / name, stored)
    ds = pydicom.dcmread(p)
    for tag, vr, value in raw.values():
        set_raw(ds, tag, vr, value)
    ds.save_as(p)
    return p


def gray16(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), np.uint16) * 16


# ---------------------------------------------------------------------------------------------
# 1. pixel limit from the header, bounded memory
# ---------------------------------------------------------------------------------------------

def test_pixel_limit_is_checked_from_the_png_header_before_decoding(tmp_path):
    big = png_header_only(tmp_path / "big16.png", 13000, 13000)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError, match=r"big16\.png: image is 13000x13000 \(169\.0 megapixels\), above the "
                                             r"pixel limit of 64 megapixels"):
        read_image(big)
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100 * 1024  # KiB: nothing decoded
    small = tmp_path / "small.png"
    Image.open(demo_images(1)[0]).save(small)
    with pytest.raises(ImageReadError, match="above the pixel limit of 0.01 megapixels"):
        read_image(small, max_pixels=10_000)
    assert read_image(small, max_pixels=256 * 256).hw == (256, 256)
    with pytest.raises(ValueError, match="max_pixels"):
        read_image(small, max_pixels=0)
    # Pillow's own bomb error, past its limit when the caller lifts ours, is an ImageReadError too
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(png_header_only(tmp_path / "bomb.png", 20000, 20000), max_pixels=None)


def test_dicom_pixel_limit_from_rows_columns_frames_before_pixel_data(tmp_path):
    stored = np.zeros((64, 64), np.uint16)
    big = dicom_with(tmp_path, "big.dcm", stored, rows=(0x00280010, "US", struct.pack("<H", 16384)),
                     cols=(0x00280011, "US", struct.pack("<H", 16384)))
    with pytest.raises(ImageReadError, match=r"big\.dcm: image is 16384x16384 \(268\.4 megapixels\), above the pixel "
                                             r"limit"):
        read_image(big)
    frames = dicom_with(tmp_path, "frames.dcm", stored, frames=(0x00280008, "IS", b"40000"))
    with pytest.raises(ImageReadError, match=r"frames\.dcm: DICOM pixel data \(40000 frame\(s\) of 64x64x1, 16 bits\)"):
        read_image(frames, max_pixels=10_000)


def test_deflated_dicom_is_inflated_in_counted_chunks_and_refused_past_the_limit(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    src = write_dicom(tmp_path / "src.dcm", gray16(demo_images(1)[0]))
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ok = tmp_path / "deflated_ok.dcm"
    ds.save_as(ok, enforce_file_format=True)
    np.testing.assert_array_equal(read_image(ok).pixels, read_image(src).pixels)  # a normal deflated file reads
    # 4096 x 2560 16-bit = 20 MiB inflated, from a file of a few KB
    ds.Rows, ds.Columns = 4096, 2560
    ds.PixelData = bytes(4096 * 2560 * 2)
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb, enforce_file_format=True)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageReadError, match=r"bomb\.dcm: deflated DICOM inflates to more than 16 MiB"):
        read_image(bomb, max_pixels=1000)
    assert read_image(bomb, max_pixels=None).hw == (4096, 2560)  # no limit: read as before


def test_overlay_in_row_blocks_equals_the_whole_image_blend():
    from lungsam.preprocess import to_rgb_uint8
    from lungsam.runtime.predict import OVERLAY_ALPHA, OVERLAY_COLOR, overlay_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (300, 200)).astype(np.uint16)
    mask = rng.random((300, 200)) > 0.5
    rgb = to_rgb_uint8(pixels).astype(np.float32)  # the former whole-image implementation
    c = np.asarray(OVERLAY_COLOR, np.float32)
    rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * c
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    rgb[edge] = c
    ref = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(overlay_image(pixels, mask, rows_per_block=7), ref)


# ---------------------------------------------------------------------------------------------
# 2. garbage refused with a reason; implausible spacing ignored with a warning
# ---------------------------------------------------------------------------------------------

def test_garbage_inputs_fail_with_a_reason_and_the_batch_goes_on(tiny_bundle, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    good = demo_images(2)
    for p in good:
        shutil.copy(p, d / p.name)
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(d / "blank.png")
    Image.fromarray(np.full((300, 200), 128, np.uint8)).save(d / "constant.png")
    Image.fromarray(np.full((1, 1), 7, np.uint8)).save(d / "one.png")
    Image.fromarray(np.asarray(Image.open(good[0]))[:20, :]).save(d / "strip.png")  # 256 x 20
    f = np.asarray(Image.open(good[0]).convert("L"), np.float32)
    f[10, 10] = np.nan
    Image.fromarray(f).save(d / "nan.tif")
    stored = gray16(good[0])
    icpt = (0x00281052, "DS", b"0")
    dicom_with(d, "inf_rescale.dcm", stored, slope=(0x00281053, "DS", b"1e39"), icpt=icpt)  # float32 overflow -> inf
    dicom_with(d, "nan_rescale.dcm", stored, slope=(0x00281053, "DS", b"NaN"), icpt=icpt)
    out = tmp_path / "out"
    r = run_predict(tiny_bundle, d, "--out", out)
    assert r.exit_code == 1, r.output
    assert "2 ok, 7 failed" in r.output and "Traceback" not in r.output
    recs = by_name(out)
    reasons = {"blank.png": "constant", "constant.png": "constant", "one.png": "1x1, below the minimum of 32",
               "strip.png": "256x20, below the minimum of 32", "nan.tif": "NaN or infinite",
               "inf_rescale.dcm": "NaN or infinite", "nan_rescale.dcm": "NaN or infinite"}
    for name, why in reasons.items():
        rec = recs[name]
        assert rec["status"] == "error" and rec["stage"] == "validate" and why in rec["error"], rec
        assert name in rec["error"]
        assert not (out / f"{Path(name).stem}_mask.png").exists()
    for p in good:
        assert recs[p.name]["status"] == "ok" and (out / f"{p.stem}_mask.png").exists()


def test_implausible_pixel_spacing_is_ignored_with_a_warning(tiny_bundle, tmp_path):
    stored = gray16(demo_images(1)[0])
    d = tmp_path / "in"
    d.mkdir()
    cases = {"one_value": b"0.2", "zero": b"0\\0.2", "negative": b"-0.1\\0.1", "huge": b"1e9\\1e9",
             "nan": b"NaN\\NaN", "inf": b"inf\\0.1", "text": b"abc\\def", "tiny": b"0.001\\0.001"}
    for name, value in cases.items():
        dicom_with(d, f"{name}.dcm", stored, spacing=(0x00280030, "DS", value))
    write_dicom(d / "fine.dcm", stored, spacing=(0.2, 0.15))
    out = tmp_path / "out"
    r = run_predict(tiny_bundle, d, "--out", out)
    assert r.exit_code == 0, r.output
    recs = by_name(out)
    for name in cases:
        rec = recs[f"{name}.dcm"]
        assert rec["status"] == "ok" and rec["area_mm2"] is None and rec["pixel_spacing_mm"] is None, rec
        assert rec["warnings"] and "PixelSpacing" in rec["warnings"][0] and "ignored" in rec["warnings"][0]
        assert f"warning: {d / (name + '.dcm')}: PixelSpacing" in r.output
    assert recs["fine.dcm"]["area_mm2"] == pytest.approx(recs["fine.dcm"]["area_px"] * 0.2 * 0.15, rel=1e-4)
    assert recs["fine.dcm"]["warnings"] == []
    # the Python API: a caller's implausible spacing for an array is ignored the same way
    from lungsam.runtime import LungSegmenter

    res = LungSegmenter.load(tiny_bundle, threads=1).segment(stored, pixel_spacing_mm=(float("nan"), 0.2))
    assert res.area_mm2 is None and "implausible" in res.warnings[0]


# ---------------------------------------------------------------------------------------------
# 3. strict JSON everywhere
# ---------------------------------------------------------------------------------------------

def test_json_writer_is_strict(tmp_path):
    p = tmp_path / "r.json"
    write_json_atomic(p, {"f1": float("nan"), "a": np.float32(np.inf), "v": np.array([1.0, -np.inf]), "n": np.int64(3)})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert loads_json_strict(text) == {"f1": None, "a": None, "v": [1.0, None], "n": 3}
    with pytest.raises(ValueError, match=r"non-finite value nan at \$\.x\[1\]"):
        dumps_json({"x": [1, float("nan")]}, nonfinite="error")
    with pytest.raises(ValueError, match="non-standard JSON token 'NaN'"):
        loads_json_strict('{"a": NaN}')


def test_every_json_a_predict_export_and_bench_run_writes_is_strict(tiny_run, tiny_bundle, tmp_path):
    from lungsam.benchmarks.bench import run_bench

    out = tmp_path / "pred"
    d = tmp_path / "in"
    d.mkdir()
    write_dicom(d / "s.dcm", gray16(demo_images(1)[0]), spacing=(0.2, 0.2))
    dicom_with(d, "nan_spacing.dcm", gray16(demo_images(1)[0]), spacing=(0x00280030, "DS", b"NaN\\NaN"))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(d / "blank.png")
    (d / "notes.txt").write_text("x")
    r = run_predict(tiny_bundle, d, demo_images(1)[0], "--out", out, "--ground-truth", DEMO.parent / "masks")
    assert r.exit_code == 1, r.output
    run_bench(tiny_bundle, tmp_path / "bench", run_dir=str(tiny_run), backends=["onnxruntime"], precisions=["fp32"],
              warmup=0, repeats=1, limit=2)
    files = [p for root in (out, tmp_path / "bench", tiny_bundle, tiny_run) for p in root.rglob("*.json*")
             if p.suffix in (".json", ".jsonl")]  # not manifest.json.sha256 (the digest, sha256sum's format)
    assert {"predict.json", "predictions.jsonl", "metrics.json", "manifest.json", "results.json", "run.json"} <= \
        {p.name for p in files}
    for p in files:
        for line in (p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]):
            loads_json_strict(line)  # raises on NaN / Infinity


# ---------------------------------------------------------------------------------------------
# 4. reader exceptions: ImageReadError only
# ---------------------------------------------------------------------------------------------

def test_reader_errors_are_image_read_errors(tmp_path):
    stored = gray16(demo_images(1)[0])
    p = write_dicom(tmp_path / "a.dcm", stored)
    raw = p.read_bytes()
    i = raw.find(b"\x28\x00\x04\x00CS")  # PhotometricInterpretation, VR CS -> an unknown VR
    (tmp_path / "vr.dcm").write_bytes(raw[:i + 4] + b"ZZ" + raw[i + 6:])
    with pytest.raises(ImageReadError, match=r"vr\.dcm: cannot read DICOM \(NotImplementedError"):
        read_image(tmp_path / "vr.dcm")
    for name, ww in (("w0.dcm", b"0"), ("wtext.dcm", b"abc")):
        q = dicom_with(tmp_path, name, stored, wc=(0x00281050, "DS", b"2048"), ww=(0x00281051, "DS", ww))
        with pytest.raises(ImageReadError, match=name.replace(".", r"\.") + ": cannot apply the DICOM rescale/window"):
            read_image(q)
    q = dicom_with(tmp_path, "slope.dcm", stored, slope=(0x00281053, "DS", b"abc"), icpt=(0x00281052, "DS", b"0"))
    with pytest.raises(ImageReadError, match=r"slope\.dcm"):
        read_image(q)
    q = dicom_with(tmp_path, "one.dcm", stored, spacing=(0x00280030, "DS", b"0.2"))  # a one-value spacing reads
    img = read_image(q)
    assert img.pixel_spacing_mm is None and "1 value(s)" in img.warnings[0]
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path / "folder.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ImageReadError, match="dangling symbolic link"):
        read_image(tmp_path / "dangling.png")


def test_fuzzed_inputs_raise_only_image_read_error(tmp_path):
    """3,000 mutated PNG/JPEG/TIFF/BMP/DICOM inputs from real demo images (seeded): ImageReadError or an
    image, never another exception, each within 5 s, peak memory growing by < 300 MB. Before the fix this
    seed gave DecompressionBombError, TypeError and UFuncTypeError (tests/fuzz_inputs.py for 10,000+)."""
    from .fuzz_inputs import fuzz

    r = fuzz(3000, seed=0, max_pixels=1_000_000, workdir=tmp_path)
    assert r["other"] == {}, r["other_examples"]
    assert r["read_ok"] > 100 and r["image_read_error"] > 1000
    assert r["max_seconds"] < 5.0, r
    assert r["peak_rss_mb_after"] - r["peak_rss_mb_before"] < 300, r


# ---------------------------------------------------------------------------------------------
# 5. folder inputs
# ---------------------------------------------------------------------------------------------

def test_folder_inputs_are_recursive_and_every_skipped_file_is_listed(tiny_bundle, tmp_path):
    root = tmp_path / "export"
    series = root / "DICOM" / "ST000001" / "SE000001"
    series.mkdir(parents=True)
    write_dicom(series / "IM000001", gray16(demo_images(1)[0]))  # no suffix: the DICM marker
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    shutil.copy(demo_images(2)[1], root / "a.png")
    (root / "README.txt").write_text("exported by a PACS")
    (root / "broken_link.png").symlink_to(root / "gone.png")
    (root / ".DS_Store").write_bytes(b"\0\0")
    out = root / "predictions"  # the output folder inside the input folder is never read
    r = run_predict(tiny_bundle, root, "--out", out)
    assert r.exit_code == 0, r.output
    assert "2 ok, 0 failed, 4 skipped" in r.output
    recs = records(out)
    skipped = {Path(x["file"]).name: x["reason"] for x in recs if x["status"] == "skipped"}
    assert skipped == {".DS_Store": "hidden file", "DICOMDIR": "DICOMDIR (a DICOM media index, not an image)",
                       "README.txt": "not an image (suffix .txt, no DICM marker)",
                       "broken_link.png": f"dangling symbolic link (to {root / 'gone.png'})"}
    assert {Path(x["file"]).name for x in recs if x["status"] == "ok"} == {"a.png", "IM000001"}
    assert f"skipped: {root / 'README.txt'}: not an image" in r.output
    run = loads_json_strict((out / "predict.json").read_text())
    assert run["skipped"] == 4 and {Path(s["file"]).name for s in run["skipped_files"]} == set(skipped)
    # a second run into a fresh folder beside the first never reads the first one's masks
    out2 = root / "predictions2"
    r = run_predict(tiny_bundle, root, "--out", out2)
    assert "2 ok, 0 failed, 5 skipped" in r.output  # the first output folder is skipped, not read
    assert not [x for x in records(out2) if "predictions/" in x["file"] and x["status"] != "skipped"]
    listing = scan_inputs([root], exclude=[out, out2])
    assert all(out not in f.parents for f in listing.files)


# ---------------------------------------------------------------------------------------------
# 6. ground truth by exact name
# ---------------------------------------------------------------------------------------------

def test_ground_truth_matches_names_exactly(tiny_bundle, tmp_path):
    img, other = demo_images(2)
    d, gt = tmp_path / "in", tmp_path / "gt"
    d.mkdir()
    gt.mkdir()
    shutil.copy(img, d / "x[1].png")
    shutil.copy(DEMO.parent / "masks" / other.name, gt / "x1.png")  # what glob("x[1].*") would match
    r = run_predict(tiny_bundle, d, "--out", tmp_path / "o", "--ground-truth", gt)
    assert r.exit_code == 0, r.output
    rec = records(tmp_path / "o")[0]
    assert rec["ground_truth"] is None and "no mask named x[1].*" in rec["score_error"]
    shutil.copy(DEMO.parent / "masks" / img.name, gt / "x[1].png")
    r = run_predict(tiny_bundle, d, "--out", tmp_path / "o2", "--ground-truth", gt)
    assert records(tmp_path / "o2")[0]["ground_truth"] == str(gt / "x[1].png")


# ---------------------------------------------------------------------------------------------
# 7. outputs a later reader can trust
# ---------------------------------------------------------------------------------------------

def test_non_empty_out_is_refused_and_overwrite_replaces_only_a_previous_run(tiny_bundle, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for p in demo_images(2):
        shutil.copy(p, d / p.name)
    out = tmp_path / "out"
    assert run_predict(tiny_bundle, d, "--out", out, "--overlay").exit_code == 0
    first = loads_json_strict((out / "predict.json").read_text())
    assert first["status"] == "complete" and first["format"] == "lungsam-predict/1"
    r = run_predict(tiny_bundle, d, "--out", out)
    assert r.exit_code == 1 and "is not empty" in r.output and "--overwrite" in r.output
    # one input goes bad; --overwrite removes the previous run's files, so no old mask or overlay is left
    stem = demo_images(1)[0].stem
    (d / f"{stem}.png").write_bytes(b"broken")
    r = run_predict(tiny_bundle, d, "--out", out, "--overwrite")
    assert r.exit_code == 1 and "1 ok, 1 failed" in r.output
    assert not (out / f"{stem}_mask.png").exists() and not (out / f"{stem}_overlay.png").exists()
    assert len(records(out)) == 2
    assert loads_json_strict((out / "predict.json").read_text())["status"] == "complete"
    # a file no previous run wrote is never removed
    (out / "notes.txt").write_text("mine")
    r = run_predict(tiny_bundle, d, "--out", out, "--overwrite")
    assert r.exit_code == 1 and "notes.txt" in r.output and "choose an empty folder" in r.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "predictions.jsonl").exists()
    # --out equal to the input folder: refused (it holds the inputs), with or without --overwrite
    for extra in ((), ("--overwrite",)):
        r = run_predict(tiny_bundle, d, "--out", d, *extra)
        assert r.exit_code == 1 and "--out" in r.output and "Traceback" not in r.output


def test_killed_predict_keeps_every_completed_record_and_says_incomplete(tiny_bundle, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    src = demo_images(16)
    for i in range(400):
        shutil.copy(src[i % len(src)], d / f"img{i:03d}.png")
    out = tmp_path / "out"
    code = ("import sys; from lungsam.runtime.commands import predict; "
            f"predict.main([{str(tiny_bundle)!r}, {str(d)!r}, '--out', {str(out)!r}, '--no-progress', "
            "'--threads', '1'])")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        jsonl = out / "predictions.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if jsonl.exists() and jsonl.read_text().count("\n") >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "predict finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = jsonl.read_text()
    lines = text.splitlines()
    assert 5 <= len(lines) < 400 and text.endswith("\n")
    for rec in map(loads_json_strict, lines):  # every line complete, every mask it names complete
        assert rec["status"] == "ok"
        assert Image.open(out / rec["mask"]).size == (256, 256)
    run = loads_json_strict((out / "predict.json").read_text())
    assert run["status"] == "incomplete" and run["finished"] is None
    r = run_predict(tiny_bundle, d, "--out", out)  # a rerun is refused without --overwrite ...
    assert r.exit_code == 1 and "is not empty" in r.output
    leftover = [p for p in out.iterdir() if p.name.startswith(".")]
    r = run_predict(tiny_bundle, *src[:2], "--out", out, "--overwrite")  # ... and with it, replaces the run
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["predict.json", "predictions.jsonl"] + [f"{p.stem}_mask.png" for p in src[:2]])
    assert all(not p.exists() for p in leftover)


def test_a_full_disk_stops_with_the_path_named_and_what_completed_recorded(tiny_bundle, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past 16 KiB per file (EFBIG): predictions.jsonl fills up
    part-way through, as on a full disk."""
    d = tmp_path / "in"
    d.mkdir()
    for i in range(60):
        shutil.copy(demo_images(1)[0], d / f"img{i:02d}.png")
    out = tmp_path / "out"
    code = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384)); "
            "from lungsam.runtime.commands import predict; "
            f"predict.main([{str(tiny_bundle)!r}, {str(d)!r}, '--out', {str(out)!r}, '--no-progress', "
            "'--threads', '1'])")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert f"cannot write {out / 'predictions.jsonl'}: File too large" in r.stderr
    assert "stopped after" in r.stderr
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert 0 < len(lines) < 60
    for rec in map(loads_json_strict, lines):  # no partial last line
        assert rec["status"] == "ok" and (out / rec["mask"]).exists()
    run = loads_json_strict((out / "predict.json").read_text())
    assert run["status"] == "incomplete" and "File too large" in run["error"]


# ---------------------------------------------------------------------------------------------
# 8. quieter runtime
# ---------------------------------------------------------------------------------------------

def test_predict_writes_nothing_outside_out_and_the_cache(tiny_bundle, tmp_path):
    home, cwd, tmp, cache, out = (tmp_path / n for n in ("home", "cwd", "tmp", "cache", "out"))
    for p in (home, cwd, tmp, cache):
        p.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "ORT_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), LUNGSAM_CACHE=str(cache), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", "from lungsam.cli import main; main()", "predict", str(tiny_bundle),
                        str(demo_images(1)[0]), "--out", str(out), "--no-progress"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for p in (home, cwd, tmp):
        assert sorted(str(q.relative_to(p)) for q in p.rglob("*")) == [], p
    assert (out / "predict.json").exists()


def test_a_full_and_a_read_only_file_system_give_one_clear_error(tiny_bundle, tmp_path):
    """A real 300 KiB tmpfs (needs root and mount rights; skipped elsewhere): ENOSPC part-way through the run,
    then EROFS before it starts."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        d = tmp_path / "in"
        d.mkdir()
        for i in range(30):
            shutil.copy(demo_images(1)[0], d / f"img{i:02d}.png")
        r = run_predict(tiny_bundle, d, "--out", mnt / "out", "--overlay")
        assert r.exit_code == 1 and "No space left on device" in r.output and "stopped after" in r.output
        assert "Traceback" not in r.output
        *recs, last = records(mnt / "out")
        assert recs and all(rec["status"] == "ok" for rec in recs)
        assert last["status"] == "error" and last["stage"] == "write" and "No space left" in last["error"]
        made = {p.name for p in (mnt / "out").iterdir()}
        assert made == {"predict.json", "predictions.jsonl"} | {rec["mask"] for rec in recs} | \
            {rec["overlay"] for rec in recs}  # the failed input keeps no mask, no temporary file is left
        run = loads_json_strict((mnt / "out" / "predict.json").read_text())
        assert run["status"] == "incomplete" and "No space left on device" in run["error"]
        shutil.rmtree(mnt / "out")
        (mnt / "ro").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        r = run_predict(tiny_bundle, d, "--out", mnt / "ro")
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert f"--out {mnt / 'ro'} is not writable: cannot write {mnt / 'ro' / 'predict.json'}: Read-only" in r.output
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
