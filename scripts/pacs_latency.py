"""Time from dcmtk's storescu sending chest radiographs to Orthanc until their DICOM-SEG is in Orthanc (routed by
Orthanc's Lua to a `lungsam node`, results back by C-STORE), for one image and a batch; and dciodvfy's error counts
on a SEG, SR and SC of the same bundle. Writes results/pacs/latency.json.

    PYTHONPATH=. python scripts/pacs_latency.py BUNDLE --batch 50 --out results/pacs/latency.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lungsam.artifacts import machine_record, package_versions, utc_now, write_json_atomic  # noqa: E402
from lungsam.runtime import LungSegmenter  # noqa: E402
from lungsam.runtime import dicom_out as do  # noqa: E402
from tests.dicom_samples import chest_dataset, write_chest_dicom  # noqa: E402
from tests.pacs_harness import NodeProcess, Orthanc, free_port, missing_tools, node_toml, storescu  # noqa: E402


def wait_for(orthanc: Orthanc, uids: list[str], timeout_s: float) -> float:
    """Seconds (monotonic clock) at which the last of ``uids`` was found in Orthanc."""
    left = list(uids)
    end = time.monotonic() + timeout_s
    while left:
        left = [u for u in left if orthanc.lookup(u) is None]
        if left:
            if time.monotonic() > end:
                raise TimeoutError(f"{len(left)} of {len(uids)} SEGs not in Orthanc after {timeout_s} s")
            time.sleep(0.05)
    return time.monotonic()


def send_and_time(orthanc: Orthanc, files: list[Path], digest: str) -> dict:
    import pydicom

    uids = [do.result_uid(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID, digest, "seg") for f in files]
    t0 = time.monotonic()
    r = storescu(files, orthanc.dicom_port, orthanc.aet, timeout_s=600)
    t_sent = time.monotonic()
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr[-2000:]}")
    t_done = wait_for(orthanc, uids, 60 + 30 * len(files))
    return {"images": len(files), "storescu_s": round(t_sent - t0, 3), "send_to_last_seg_s": round(t_done - t0, 3),
            "images_per_s": round(len(files) / (t_done - t0), 3)}


def dciodvfy_counts(seg: LungSegmenter, png: Path, out: Path) -> dict:
    made = seg.segment_dicom(chest_dataset(png, index=99999), sr=True, secondary_capture=True)
    names = do.write_dicom_results(made, out, "check")
    counts = {}
    for kind, name in names.items():
        r = subprocess.run(["dciodvfy", str(out / name)], capture_output=True, text=True, check=False)
        lines = (r.stdout + r.stderr).splitlines()
        counts[kind] = {"errors": sum(x.startswith("Error") for x in lines),
                        "warnings": sum(x.startswith("Warning") for x in lines)}
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "montgomery" / "images")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "pacs" / "latency.json")
    args = ap.parse_args()
    if missing_tools():
        sys.exit(missing_tools())
    pngs = sorted(args.data.glob("*.png"))
    if len(pngs) < args.batch + 1:
        sys.exit(f"{args.data}: need {args.batch + 1} images, found {len(pngs)}")
    load_before = os.getloadavg()
    seg = LungSegmenter.load(args.bundle, threads=args.threads)
    digest = do.bundle_digest(seg.bundle)
    root = Path(tempfile.mkdtemp(prefix="lungsam_pacs_"))
    try:
        node_port = free_port()
        orthanc = Orthanc(root / "orthanc", node_port).start()
        cfg = node_toml(root / "node.toml", work_dir=root / "work", port=node_port, bundle=args.bundle,
                        destinations=[{"name": "pacs", "kind": "c-store", "host": "127.0.0.1",
                                       "port": orthanc.dicom_port, "ae_title": orthanc.aet}],
                        allowed=["ORTHANC"], threads=args.threads)
        node = NodeProcess(cfg, node_port, root / "node.log").start()
        try:
            one = [write_chest_dicom(pngs[0], root / "in1" / "0.dcm", index=0)]
            batch = [write_chest_dicom(p, root / "inN" / f"{i}.dcm", index=1000 + i)
                     for i, p in enumerate(pngs[1:args.batch + 1])]
            single = send_and_time(orthanc, one, digest)
            print(f"1 image: {single}", flush=True)
            many = send_and_time(orthanc, batch, digest)
            print(f"{args.batch} images: {many}", flush=True)
        finally:
            node.stop()
            orthanc.stop()
        processed = [json.loads(x) for x in (root / "work" / "audit.jsonl").read_text().splitlines()]
        seg_s = sorted(e["seconds"] for e in processed if e["event"] == "processed")
        validation = dciodvfy_counts(seg, pngs[0], root / "check")
        print(f"dciodvfy: {validation}")
        d = seg.describe()
        write_json_atomic(args.out, {
            "created": utc_now(), "bundle": str(args.bundle), "bundle_sha256": digest, "backbone": d["backbone"],
            "backend": d["backend"], "device": d["device"], "precision": d["precision"], "threads": args.threads,
            "image_size": "512x512 8-bit DX (Montgomery)", "single": single, "batch": many,
            "node_seconds_per_image_median": seg_s[len(seg_s) // 2] if seg_s else None,
            "dciodvfy": validation, "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                                            "after": [round(x, 2) for x in os.getloadavg()]},
            "machine": machine_record(), "versions": package_versions()})
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
