"""Issue 21 acceptance: a mixed batch of good and bad files through `lungsam predict`.

    python results/inputs/mixed_batch.py BUNDLE WORK_DIR [--big-dir DIR]

Builds WORK_DIR/in (recursive): 20 real Montgomery radiographs (512x512 PNG; two also as DICOM, one without a
suffix in a PACS-like sub-folder, one with an implausible PixelSpacing), and bad files of every kind the issue
lists (truncated, empty, not an image, blank, constant, 1x1, 20-pixel strip, NaN after rescale, a dangling
symbolic link, a DICOMDIR, and with --big-dir the 13000x13000 16-bit PNG and the 16384x16384 deflated DICOM of
make_big_inputs.py). Runs predict once on everything (peak RSS by /usr/bin/time) and once on the good images
alone, and checks: every good output written and equal to the good-only run, every bad file failed or skipped
with a reason, 0 tracebacks, every JSON strict. Prints the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lungsam.artifacts import loads_json_strict  # noqa: E402
from tests.test_inputs_hardening import dicom_with  # noqa: E402
from tests.test_runtime import write_dicom  # noqa: E402

MC = REPO.parent / "shared" / "data" / "montgomery"


def predict(bundle: Path, out: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> tuple[int, str, int]:
    """(exit code, stderr+stdout, peak RSS KiB) of one `lungsam predict` run."""
    timing = out.parent / f"{out.name}.time"
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(timing), sys.executable, "-c", "from lungsam.cli import main; main()",
           "predict", str(bundle), *map(str, inputs), "--out", str(out), "--no-progress", "--threads", "2", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return r.returncode, r.stdout + r.stderr, int(timing.read_text().split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--big-dir", type=Path, default=None)
    a = ap.parse_args()
    work = a.work
    shutil.rmtree(work, ignore_errors=True)
    inp, good_dir, gt = work / "in", work / "good", work / "gt"
    for d in (inp, good_dir, gt):
        d.mkdir(parents=True)
    imgs = sorted((MC / "images").glob("*.png"))[:20]
    for p in imgs:
        shutil.copy(p, inp / p.name)
        shutil.copy(p, good_dir / p.name)
        shutil.copy(MC / "masks" / p.name, gt / p.name)
    g16 = np.asarray(Image.open(imgs[0]).convert("L"), np.uint16) * 16
    pacs = inp / "DICOM" / "ST000001" / "SE000001"
    pacs.mkdir(parents=True)
    write_dicom(pacs / "IM000001", g16, spacing=(0.35, 0.35))
    dicom_with(inp, "bad_spacing.dcm", g16, spacing=(0x00280030, "DS", b"NaN\\0"))
    for q in (pacs / "IM000001", inp / "bad_spacing.dcm"):
        shutil.copy(q, good_dir / q.name)
    bad: dict[str, str] = {}  # name -> expected status
    raw = imgs[1].read_bytes()
    (inp / "truncated.png").write_bytes(raw[: len(raw) // 3]); bad["truncated.png"] = "error"
    (inp / "zero.png").write_bytes(b""); bad["zero.png"] = "error"
    (inp / "garbage.jpg").write_bytes(os.urandom(5000)); bad["garbage.jpg"] = "error"
    (inp / "notes.txt").write_text("not an image"); bad["notes.txt"] = "skipped"
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(inp / "blank.png"); bad["blank.png"] = "error"
    Image.fromarray(np.full((400, 300), 77, np.uint16)).save(inp / "constant16.png"); bad["constant16.png"] = "error"
    Image.fromarray(np.full((1, 1), 9, np.uint8)).save(inp / "one_pixel.png"); bad["one_pixel.png"] = "error"
    Image.fromarray(np.asarray(Image.open(imgs[2]))[:20]).save(inp / "strip.png"); bad["strip.png"] = "error"
    dicom_with(inp, "nan_rescale.dcm", g16, slope=(0x00281053, "DS", b"NaN"), icpt=(0x00281052, "DS", b"0"))
    bad["nan_rescale.dcm"] = "error"
    (inp / "dangling.png").symlink_to(inp / "gone.png"); bad["dangling.png"] = "skipped"
    (inp / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 32); bad["DICOMDIR"] = "skipped"
    if a.big_dir:
        for name in ("big16_13000.png", "big_deflated_16384.dcm"):
            shutil.copy(a.big_dir / name, inp / name)
            bad[name] = "error"
    out_all, out_good = work / "out_all", work / "out_good"
    rc, log, kib = predict(a.bundle, out_all, inp, extra=("--overlay", "--ground-truth", str(gt)))
    _, log_g, kib_g = predict(a.bundle, out_good, good_dir, extra=("--overlay",))
    recs = {Path(r["file"]).name: r for r in map(loads_json_strict, (out_all / "predictions.jsonl").read_text().splitlines())}
    good_recs = {Path(r["file"]).name: r for r in map(loads_json_strict, (out_good / "predictions.jsonl").read_text().splitlines())}
    problems = []
    for name, rg in good_recs.items():
        r = recs.get(name)
        if r is None or r["status"] != "ok":
            problems.append(f"good {name}: {r}")
            continue
        m_all = np.asarray(Image.open(out_all / r["mask"]))
        m_good = np.asarray(Image.open(out_good / rg["mask"]))
        if not np.array_equal(m_all, m_good) or not (out_all / r["overlay"]).exists():
            problems.append(f"good {name}: mask differs from the good-only run")
    for name, status in bad.items():
        r = recs.get(name)
        why = None if r is None else (r.get("error") or r.get("reason"))
        if r is None or r["status"] != status or not why:
            problems.append(f"bad {name}: {r}")
    for p in out_all.rglob("*.json*"):
        for line in (p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]):
            loads_json_strict(line)
    metrics = loads_json_strict((out_all / "metrics.json").read_text())
    run = loads_json_strict((out_all / "predict.json").read_text())
    print(json.dumps({
        "inputs_read": run["inputs"], "ok": run["ok"], "failed": run["failed"], "skipped": run["skipped"],
        "status": run["status"], "exit_code": rc, "tracebacks": log.count("Traceback") + log_g.count("Traceback"),
        "good_outputs_equal_to_good_only_run": len(good_recs) - sum(p.startswith("good") for p in problems),
        "good_images": len(good_recs), "bad_files_with_reason": len(bad) - sum(p.startswith("bad") for p in problems),
        "bad_files": len(bad), "problems": problems, "f1_vs_ground_truth": metrics["f1"], "n_scored": metrics["n"],
        "peak_rss_mb_mixed": round(kib / 1024), "peak_rss_mb_good_only": round(kib_g / 1024),
        "reasons": {n: (recs[n].get("error") or recs[n].get("reason")) for n in bad if n in recs},
        "warnings": {n: r["warnings"] for n, r in recs.items() if r.get("warnings")},
    }, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
