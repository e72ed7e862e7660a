"""Reading radiographs: PNG/JPEG/TIFF (8/16-bit, grayscale or RGB) and DICOM. Torch-free.

Every reader returns an array in the **original** frame plus metadata; errors are
:class:`ImageReadError` with the file named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from .errors import LungsamError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageReadError(LungsamError, ValueError):
    """An input that cannot be used, with the reason and the file."""


@dataclass
class LoadedImage:
    """An image in its original frame.

    Attributes:
        pixels: ``(H, W)`` or ``(H, W, 3)`` array (uint8, uint16 or float32 for DICOM after rescale/VOI).
        path: where it came from.
        pixel_spacing_mm: ``(row, col)`` spacing in millimetres when the file states it, else ``None``.
        meta: format-specific facts (photometric interpretation, bits, ...).
    """

    pixels: np.ndarray
    path: Path
    pixel_spacing_mm: tuple[float, float] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def read_raster(path: Path) -> LoadedImage:
    """PNG/JPEG/TIFF -> pixels as stored (uint8 / uint16 / float), grayscale or RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                arr = np.asarray(im, dtype=np.uint16)
            elif mode in ("I", "F"):
                arr = np.asarray(im)
            elif mode in ("L", "RGB"):
                arr = np.asarray(im)
            elif mode == "1":
                arr = np.asarray(im.convert("L"))
            else:
                arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: cannot read image ({e})") from e
    if arr.size == 0 or min(arr.shape[:2]) == 0:
        raise ImageReadError(f"{path}: image has zero size")
    return LoadedImage(pixels=arr, path=path, meta={"mode": mode})


def read_dicom(path: Path) -> LoadedImage:
    """DICOM -> float32 pixels with rescale slope/intercept and VOI LUT/window applied, and
    MONOCHROME1 inverted so that bright means dense, as in MONOCHROME2. Needs ``lungsam[dicom]``."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as e:
        raise ImageReadError(f"{path}: DICOM input needs pydicom: pip install 'lungsam[dicom]'") from e
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for truncated/invalid files
        raise ImageReadError(f"{path}: cannot read DICOM ({type(e).__name__}: {e})") from e
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 and photometric.startswith("MONOCHROME"):
        arr = arr[0]  # multi-frame: first frame
    data = apply_modality_lut(arr, ds).astype(np.float32)
    if photometric.startswith("MONOCHROME"):
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            data = apply_voi_lut(data, ds).astype(np.float32)
        if photometric == "MONOCHROME1":
            data = data.max() + data.min() - data
    spacing = None
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        if tag in ds and ds.get(tag):
            v = [float(x) for x in ds.get(tag)]
            spacing = (v[0], v[1])
            break
    if data.size == 0 or min(data.shape[:2]) == 0:
        raise ImageReadError(f"{path}: DICOM has zero size")
    return LoadedImage(pixels=data, path=path, pixel_spacing_mm=spacing,
                       meta={"photometric": photometric, "bits_stored": int(getattr(ds, "BitsStored", 0) or 0)})


def read_image(path: str | Path) -> LoadedImage:
    """Read any supported input; raises :class:`ImageReadError` naming the file."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p}: file is empty (0 bytes)")
    return read_dicom(p) if is_dicom(p) else read_raster(p)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask image -> ``(H, W)`` bool (any non-zero pixel is foreground; RGB masks use all channels)."""
    img = read_image(path).pixels
    if img.ndim == 3:
        img = img.max(axis=2)
    return np.asarray(img) > 0


def list_inputs(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (sorted, non-recursive) to supported input files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES))
        else:
            out.append(p)
    return out
