"""Seeded fuzzing of :func:`lungsam.imageio.read_image` with mutated PNG/JPEG/TIFF/BMP/DICOM bytes.

The seeds are real demo radiographs (``lungsam/demo_data``) cropped small and written in every format the
readers take (8/16-bit PNG, JPEG, TIFF raw and deflate, BMP, DICOM explicit/implicit VR and deflated). Each
input is one seed with a few random mutations (bit flips, interesting bytes, header-region edits, block
deletion/duplication, truncation), written to a file (DICOM also without a suffix) and read. The promise
checked: :class:`~lungsam.imageio.ImageReadError` or a :class:`~lungsam.imageio.LoadedImage`, nothing else,
within a time bound per input.

Run the long campaign from the repository root::

    python -m tests.fuzz_inputs --n 10000 --seed 0 [--max-pixels 64000000]
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "lungsam" / "demo_data" / "montgomery" / "images"
INTERESTING = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE, 0x10, 0x40)


def _dicom_bytes(gray16: np.ndarray, syntax: str) -> bytes:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["lungsam-fuzz", syntax])
    meta.TransferSyntaxUID = syntax
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = gray16.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1.5, -10
    ds.WindowCenter, ds.WindowWidth = 2048, 4000
    ds.PixelSpacing = [0.175, 0.175]
    ds.PixelData = gray16.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=syntax == pydicom.uid.ImplicitVRLittleEndian, enforce_file_format=True)
    return buf.getvalue()


def seed_corpus(side: int = 48) -> list[tuple[str, bytes]]:
    """``(suffix, bytes)`` seeds made from the first demo radiographs, ``side`` x ``side`` pixels."""
    import pydicom.uid as uid

    seeds: list[tuple[str, bytes]] = []
    for path in sorted(DEMO.glob("*.png"))[:2]:
        g = Image.open(path).convert("L").resize((side, side), Image.BILINEAR)
        g16 = (np.asarray(g, np.uint16) * 16)
        for suffix, im, kw in ((".png", g, {}), (".png", Image.fromarray(g16 * 4), {}),
                               (".jpg", g.convert("RGB"), {"quality": 90}), (".tif", g, {}),
                               (".tif", Image.fromarray(g16), {"compression": "tiff_adobe_deflate"}),
                               (".bmp", g.convert("RGB"), {})):
            b = io.BytesIO()
            im.save(b, format={"jpg": "JPEG", "tif": "TIFF"}.get(suffix[1:], suffix[1:].upper()), **kw)
            seeds.append((suffix, b.getvalue()))
        for syntax in (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian):
            data = _dicom_bytes(g16, syntax)
            seeds.append((".dcm", data))
            seeds.append(("", data))  # no suffix: recognised by the DICM marker
    return seeds


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """1-4 random edits of ``data``; header bytes (the first 512) are picked more often."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        if not b:
            break
        n = len(b)
        pos = int(rng.integers(0, min(n, 512))) if rng.random() < 0.6 else int(rng.integers(0, n))
        op = int(rng.integers(0, 7))
        if op == 0:  # bit flip
            b[pos] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:  # interesting byte
            b[pos] = INTERESTING[int(rng.integers(0, len(INTERESTING)))]
        elif op == 2:  # random bytes over a short run
            k = int(rng.integers(1, 9))
            b[pos:pos + k] = rng.integers(0, 256, k, dtype=np.uint8).tobytes()
        elif op == 3:  # delete a block
            del b[pos:pos + int(rng.integers(1, 65))]
        elif op == 4:  # duplicate a block
            k = int(rng.integers(1, 65))
            b[pos:pos] = b[pos:pos + k]
        elif op == 5:  # truncate
            del b[max(1, pos):]
        else:  # a large 16/32-bit value (sizes, lengths)
            k = 2 if rng.random() < 0.5 else 4
            b[pos:pos + k] = int(rng.integers(0, 2 ** (8 * k))).to_bytes(k, "little" if rng.random() < 0.5 else "big")
    return bytes(b)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fuzz(n: int, seed: int = 0, max_pixels: int | None = 1_000_000, workdir: Path | None = None) -> dict:
    """Read ``n`` mutated inputs; returns counts: ``inputs``, ``read_ok``, ``image_read_error``, ``other``
    (``{exception type: count}``), ``other_examples``, ``max_seconds`` (slowest input) and its file kind,
    ``peak_rss_mb`` before/after."""
    from lungsam.imageio import ImageReadError, read_image

    rng = np.random.default_rng(seed)
    seeds = seed_corpus()
    rss0 = peak_rss_mb()
    counts: Counter = Counter()
    other: Counter = Counter()
    examples: list[str] = []
    slowest = (0.0, "")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i in range(n):
            suffix, data = seeds[int(rng.integers(0, len(seeds)))]
            path = Path(tmp) / f"in{i % 64}{suffix}"
            path.write_bytes(mutate(data, rng))
            t0 = time.perf_counter()
            try:
                read_image(path, max_pixels=max_pixels)
                counts["read_ok"] += 1
            except ImageReadError:
                counts["image_read_error"] += 1
            except Exception as e:  # what the test forbids
                other[type(e).__name__] += 1
                if len(examples) < 10:
                    examples.append(f"{i} {suffix or 'no suffix'}: {type(e).__name__}: {e}"[:300])
            dt = time.perf_counter() - t0
            if dt > slowest[0]:
                slowest = (dt, suffix or "dicom, no suffix")
    return {"inputs": n, "seed": seed, "max_pixels": max_pixels, "read_ok": counts["read_ok"],
            "image_read_error": counts["image_read_error"], "other": dict(other), "other_examples": examples,
            "max_seconds": round(slowest[0], 4), "slowest_kind": slowest[1],
            "peak_rss_mb_before": round(rss0, 1), "peak_rss_mb_after": round(peak_rss_mb(), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-pixels", type=int, default=64_000_000)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    r = fuzz(a.n, a.seed, a.max_pixels)
    r["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(r, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 1 if r["other"] else 0


if __name__ == "__main__":
    sys.exit(main())
