"""Write the issue-21 memory cases without holding them in memory: a 16-bit grey PNG and a deflated DICOM
of any size, streamed row by row through zlib (a real radiograph's rows, tiled, so the image is not constant).

    python results/inputs/make_big_inputs.py OUT_DIR [--png-side 13000] [--dicom-side 16384] [--good-side 7900]

Writes OUT_DIR/big16_<side>.png, OUT_DIR/big_deflated_<side>.dcm and OUT_DIR/good16_<side>.png (a size under
the default 64-megapixel limit).
"""
from __future__ import annotations

import argparse
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DEMO = sorted((REPO / "lungsam" / "demo_data" / "montgomery" / "images").glob("*.png"))[0]


def rows16(side: int):
    """``side`` rows of ``side`` uint16 values: the demo radiograph (x 256) resized to side x 256, tiled."""
    g = np.asarray(Image.open(DEMO).convert("L"))
    base = np.asarray(Image.fromarray(g).resize((256, side), Image.BILINEAR), np.uint16) * 256
    reps = -(-side // 256)
    for r in range(side):
        yield np.tile(base[r], reps)[:side]


def write_png16(path: Path, side: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)))
        buf = bytearray()
        for row in rows16(side):
            buf += comp.compress(b"\0" + row.astype(">u2").tobytes())
            if len(buf) > 1 << 20:
                f.write(chunk(b"IDAT", bytes(buf)))
                buf.clear()
        buf += comp.flush()
        f.write(chunk(b"IDAT", bytes(buf)) + chunk(b"IEND", b""))


def write_deflated_dicom(path: Path, side: int) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    nbytes = side * side * 2
    pixel_tag = struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<I", nbytes)
    meta_io = DicomBytesIO()
    meta_io.is_little_endian, meta_io.is_implicit_VR = True, False
    write_file_meta_info(meta_io, meta)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta_io.getvalue())
        f.write(comp.compress(head.getvalue() + pixel_tag))
        for row in rows16(side):
            f.write(comp.compress(row.astype("<u2").tobytes()))
        f.write(comp.flush())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--png-side", type=int, default=13000)
    ap.add_argument("--dicom-side", type=int, default=16384)
    ap.add_argument("--good-side", type=int, default=7900)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    write_png16(a.out / f"big16_{a.png_side}.png", a.png_side)
    write_deflated_dicom(a.out / f"big_deflated_{a.dicom_side}.dcm", a.dicom_side)
    write_png16(a.out / f"good16_{a.good_side}.png", a.good_side)
    for p in sorted(a.out.iterdir()):
        print(p, p.stat().st_size)


if __name__ == "__main__":
    main()
