"""Reading radiographs: PNG/JPEG/TIFF/BMP (8/16-bit, grayscale or RGB) and DICOM, and listing input folders.
Torch-free.

Every reader returns an array in the **original** frame plus metadata. Whatever is wrong with a file
(missing, truncated, malformed, too large, an unknown DICOM encoding, ...), :func:`read_image` raises
:class:`ImageReadError` with the file named, and nothing else. Memory is bounded by a pixel limit
(``max_pixels``, default :data:`DEFAULT_MAX_PIXELS`) checked from the header before any pixel is decoded.
"""
from __future__ import annotations

import math
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import LungsamError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest image (rows x columns) any reader decodes: 64 megapixels (8000 x 8000), above every radiograph
detector in use (43 x 43 cm at 0.1 mm is 4300 x 4300)."""
PIXEL_SPACING_RANGE_MM = (0.01, 10.0)
"""Plausible pixel spacing (mm); a stated spacing outside it is ignored with a warning."""
DEFLATE_HEADER_ALLOWANCE = 16 << 20
"""Bytes of a deflated DICOM data set allowed beyond the pixel data (``max_pixels`` x 4 bytes)."""


class ImageReadError(LungsamError, ValueError):
    """An input that cannot be used, with the reason and the file."""


@dataclass
class LoadedImage:
    """An image in its original frame.

    Attributes:
        pixels: ``(H, W)`` or ``(H, W, 3)`` array (uint8, uint16 or float32 for DICOM after rescale/VOI).
        path: where it came from.
        pixel_spacing_mm: ``(row, col)`` spacing in millimetres when the file states a plausible one, else ``None``.
        meta: format-specific facts (photometric interpretation, bits, ...).
        warnings: what was ignored while reading (e.g. an implausible pixel spacing), one sentence each.
    """

    pixels: np.ndarray
    path: Path
    pixel_spacing_mm: tuple[float, float] | None = None
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


# ---------------------------------------------------------------------------------------------
# limits and plausibility
# ---------------------------------------------------------------------------------------------

def check_max_pixels(max_pixels: int | None) -> int | None:
    """Validate a pixel limit (``None``: no limit); raises ``ValueError``."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer))
                                   or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    return None if max_pixels is None else int(max_pixels)


def check_pixel_limit(source: object, rows: int, cols: int, max_pixels: int | None) -> None:
    """Raise :class:`ImageReadError` when a ``cols x rows`` image exceeds ``max_pixels``."""
    if max_pixels is not None and rows * cols > max_pixels:
        raise ImageReadError(
            f"{source}: image is {cols}x{rows} ({rows * cols / 1e6:.1f} megapixels), above the pixel limit of "
            f"{max_pixels / 1e6:g} megapixels (raise it with --max-pixels / max_pixels= if this is intended)")


def plausible_spacing(values: object, what: str = "pixel spacing") -> tuple[tuple[float, float] | None, str | None]:
    """``(row, col)`` mm from a stated spacing, or ``(None, reason)`` when it is unusable: not two numbers,
    non-finite, or outside :data:`PIXEL_SPACING_RANGE_MM`. ``values=None`` gives ``(None, None)``."""
    if values is None:
        return None, None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        values = [values]  # one value (a DS of multiplicity 1, or a bare number)
    try:
        v = [float(x) for x in values]  # type: ignore[union-attr]
    except (TypeError, ValueError) as e:
        return None, f"{what} {values!r} is not a pair of numbers ({e}); ignored, no area in mm²"
    if len(v) != 2:
        return None, f"{what} has {len(v)} value(s) {v}, expected 2 (row, column); ignored, no area in mm²"
    lo, hi = PIXEL_SPACING_RANGE_MM
    if not all(math.isfinite(x) and lo <= x <= hi for x in v):
        return None, (f"{what} {v} mm is implausible (each must be finite, within {lo}-{hi} mm); ignored, "
                      "no area in mm²")
    return (v[0], v[1]), None


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------

def is_dicom(path: Path) -> bool:
    """A ``.dcm``/``.dicom`` suffix or the ``DICM`` marker at byte 128 (PS3.10 file format)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    return has_dicm_marker(path)


def has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def read_raster(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """PNG/JPEG/TIFF/BMP -> pixels as stored (uint8 / uint16 / float), grayscale or RGB. The size is checked
    against ``max_pixels`` from the header (after ``Image.open``, before decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning (our own limit decides, below), corrupt EXIF ...
            with Image.open(path) as im:
                w, h = im.size
                check_pixel_limit(path, h, w, max_pixels)
                im.load()
                mode = im.mode
                if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                    arr = np.asarray(im, dtype=np.uint16)
                elif mode in ("I", "F", "L", "RGB"):
                    arr = np.asarray(im)
                elif mode == "1":
                    arr = np.asarray(im.convert("L"))
                else:
                    arr = np.asarray(im.convert("RGB"))
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: image refused as a decompression bomb by Pillow ({e})") from e
    except MemoryError as e:
        raise ImageReadError(f"{path}: not enough memory to decode the image") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: cannot read image ({e})") from e
    except Exception as e:  # Pillow's plugins raise many types on malformed files
        raise ImageReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    if arr.size == 0 or min(arr.shape[:2]) == 0:
        raise ImageReadError(f"{path}: image has zero size")
    return LoadedImage(pixels=arr, path=path, meta={"mode": mode})


def _check_deflated_size(path: Path, max_pixels: int | None) -> None:
    """A deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99) is inflated whole by pydicom before its
    header can be read: inflate it here first, in bounded chunks that are counted and dropped, and refuse
    one that inflates beyond ``max_pixels x 4`` bytes plus :data:`DEFLATE_HEADER_ALLOWANCE`."""
    import pydicom
    from pydicom.filereader import read_file_meta_info

    if max_pixels is None:
        return
    try:
        meta = read_file_meta_info(path)
        syntax = str(meta.get("TransferSyntaxUID", ""))
        start = 132 + 12 + int(meta.FileMetaInformationGroupLength)  # preamble + DICM, (0002,0000), the group
    except Exception:  # no usable file meta: pydicom's own reading reports it
        return
    if syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return
    with open(path, "rb") as f:
        f.seek(start)
        cap = 4 * max_pixels + DEFLATE_HEADER_ALLOWANCE
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := f.read(1 << 20):
            data = inflater.decompress(chunk, 1 << 24)
            while True:
                total += len(data)
                if total > cap:
                    raise ImageReadError(
                        f"{path}: deflated DICOM inflates to more than {cap / 2**20:.0f} MiB, beyond the pixel limit "
                        f"of {max_pixels / 1e6:g} megapixels (raise it with --max-pixels / max_pixels=)")
                if not inflater.unconsumed_tail:
                    break
                data = inflater.decompress(inflater.unconsumed_tail, 1 << 24)


def _dicom_geometry(path: Path, ds, max_pixels: int | None) -> int:
    """Check rows/columns/samples/frames/bits from the header against ``max_pixels``; returns the frame count."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = str(ds.get("SOPClassUID", "unknown"))
        raise ImageReadError(f"{path}: DICOM has no pixel data (SOP class {sop}): not an image")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
    except Exception as e:  # missing or malformed header elements
        raise ImageReadError(f"{path}: DICOM image header is incomplete or malformed ({type(e).__name__}: {e})") from e
    if min(rows, cols, samples, frames, bits) < 1:
        raise ImageReadError(f"{path}: DICOM states an empty image (rows {rows}, columns {cols}, samples {samples}, "
                             f"frames {frames}, bits allocated {bits})")
    check_pixel_limit(path, rows, cols, max_pixels)
    if max_pixels is not None and rows * cols * samples * frames * math.ceil(bits / 8) > 4 * max_pixels:
        raise ImageReadError(
            f"{path}: DICOM pixel data ({frames} frame(s) of {cols}x{rows}x{samples}, {bits} bits) is above the "
            f"limit of {4 * max_pixels / 2**20:.0f} MiB for --max-pixels {max_pixels}")
    return frames


def read_dicom(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """DICOM -> float32 pixels with rescale slope/intercept and VOI LUT/window applied, and
    MONOCHROME1 inverted so that bright means dense, as in MONOCHROME2. The first frame of a multi-frame
    image. Rows/Columns/SamplesPerPixel/NumberOfFrames/BitsAllocated are checked against ``max_pixels``
    before the pixel data is read or decoded. Needs ``lungsam[dicom]``."""
    try:
        import pydicom
    except ImportError as e:
        raise ImageReadError(f"{path}: DICOM input needs pydicom: pip install 'lungsam[dicom]'") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's conformance warnings; what matters raises below
        try:
            _check_deflated_size(path, max_pixels)
            ds = pydicom.dcmread(path, defer_size="1 MB")  # large values (the pixel data) read only when used
        except ImageReadError:
            raise
        except Exception as e:  # pydicom raises many types for truncated/invalid files
            raise ImageReadError(f"{path}: cannot read DICOM ({type(e).__name__}: {e})") from e
    return read_dicom_dataset(ds, path, max_pixels)


def read_dicom_dataset(ds, path: Path | str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """A pydicom Dataset -> :class:`LoadedImage`, as :func:`read_dicom` (``path`` names it in errors); the
    header is checked against ``max_pixels`` before the pixel data is decoded."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    from pydicom.pixels import pixel_array as decode_pixels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = _dicom_geometry(path, ds, max_pixels)
        try:
            arr = decode_pixels(ds, index=0) if frames > 1 else ds.pixel_array
        except MemoryError as e:
            raise ImageReadError(f"{path}: not enough memory to decode the DICOM pixel data") from e
        except Exception as e:
            raise ImageReadError(f"{path}: cannot read DICOM ({type(e).__name__}: {e})") from e
        try:
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
            if arr.ndim == 3 and photometric.startswith("MONOCHROME"):
                arr = arr[0]
            data = apply_modality_lut(arr, ds).astype(np.float32)
            if photometric.startswith("MONOCHROME"):
                if "WindowCenter" in ds or "VOILUTSequence" in ds:
                    data = apply_voi_lut(data, ds).astype(np.float32)
                if photometric == "MONOCHROME1":
                    data = data.max() + data.min() - data
            bits_stored = int(ds.get("BitsStored", 0) or 0)
        except MemoryError as e:
            raise ImageReadError(f"{path}: not enough memory for the DICOM rescale/VOI LUT") from e
        except Exception as e:  # malformed rescale, window or LUT values
            raise ImageReadError(f"{path}: cannot apply the DICOM rescale/window/VOI LUT "
                                 f"({type(e).__name__}: {e})") from e
        spacing, notes = None, []
        for tag in ("PixelSpacing", "ImagerPixelSpacing"):
            try:
                value = ds.get(tag) if tag in ds else None
            except Exception as e:  # an undecodable value
                value = f"<undecodable: {type(e).__name__}>"
            if value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0):
                continue
            spacing, why = plausible_spacing(value, tag)
            if spacing is not None:
                break
            notes.append(why)
    if data.ndim < 2 or data.size == 0 or min(data.shape[:2]) == 0:
        raise ImageReadError(f"{path}: DICOM has zero size")
    return LoadedImage(pixels=data, path=path, pixel_spacing_mm=spacing, warnings=notes,
                       meta={"photometric": photometric, "bits_stored": bits_stored})


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read any supported input; raises :class:`ImageReadError` naming the file, and nothing else.

    Args:
        path: a PNG/JPEG/TIFF/BMP file, or DICOM (``.dcm``/``.dicom`` or the ``DICM`` marker).
        max_pixels: largest rows x columns decoded (``None``: no limit), checked from the header.
    """
    max_pixels = check_max_pixels(max_pixels)
    p = Path(path)
    try:
        if not p.exists():
            if p.is_symlink():
                raise ImageReadError(f"{p}: dangling symbolic link (to {os.readlink(p)})")
            raise ImageReadError(f"{p}: no such file")
        if p.is_dir():
            raise ImageReadError(f"{p}: is a folder, not an image file")
        if p.stat().st_size == 0:
            raise ImageReadError(f"{p}: file is empty (0 bytes)")
        return read_dicom(p, max_pixels) if is_dicom(p) else read_raster(p, max_pixels)
    except ImageReadError:
        raise
    except OSError as e:
        raise ImageReadError(f"{p}: cannot read ({e.strerror or e})") from e
    except Exception as e:  # the promise: ImageReadError only
        raise ImageReadError(f"{p}: cannot read ({type(e).__name__}: {e})") from e


def read_mask(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A mask image -> ``(H, W)`` bool (any non-zero pixel is foreground; RGB masks use all channels)."""
    img = read_image(path, max_pixels).pixels
    if img.ndim == 3:
        img = img.max(axis=2)
    return np.asarray(img) > 0


# ---------------------------------------------------------------------------------------------
# folder inputs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SkippedInput:
    """A file found in an input folder and not read, with the reason (one sentence)."""

    path: Path
    reason: str


@dataclass
class InputListing:
    """What :func:`scan_inputs` found: files to read (in order) and files skipped with their reasons."""

    files: list[Path] = field(default_factory=list)
    skipped: list[SkippedInput] = field(default_factory=list)


OUTPUT_FOLDER_REASON = "inside the output folder (--out), which is never read as input"


def _inside(path: Path, folders: list[Path]) -> bool:
    try:
        r = path.resolve()
    except (OSError, RuntimeError):
        return False
    return any(r == f or f in r.parents for f in folders)


def classify_file(path: Path) -> str | None:
    """``None`` when ``path`` (found in a folder) is an input to read, else why it is skipped."""
    name = path.name
    if path.is_symlink() and not path.exists():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"dangling symbolic link (to {target})"
    if name.startswith("."):
        return "hidden file"
    if not path.is_file():
        return "not a regular file"
    if name.upper() == "DICOMDIR":
        return "DICOMDIR (a DICOM media index, not an image)"
    if not os.access(path, os.R_OK):
        return "cannot read (permission denied)"
    if path.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    if len(head) == 132 and head[128:132] == b"DICM":
        return None
    return f"not an image (suffix {path.suffix or 'none'}, no DICM marker)"


def _walk(root: Path, exclude: list[Path], skip_folder: Callable[[Path], str | None] | None
          ) -> Iterator[tuple[Path, str | None]]:
    """Every entry under ``root`` (recursively, sorted, symbolic links to folders not followed) with the
    reason it is skipped, or ``None``."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            yield folder, f"cannot list folder ({e.strerror or e})"
            continue
        subdirs = []
        for entry in entries:
            q = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                if _inside(q, exclude):
                    yield q, OUTPUT_FOLDER_REASON
                elif entry.name.startswith("."):
                    yield q, "hidden folder"
                elif skip_folder is not None and (why := skip_folder(q)):
                    yield q, why
                else:
                    subdirs.append(q)
                continue
            if entry.is_symlink() and q.is_dir():
                yield q, "symbolic link to a folder (not followed)"
                continue
            if _inside(q, exclude):
                yield q, OUTPUT_FOLDER_REASON
                continue
            yield q, classify_file(q)
        stack.extend(reversed(subdirs))  # depth-first, in sorted order


def scan_inputs(paths: Iterable[str | Path], *, exclude: Iterable[str | Path] = (),
                skip_folder: Callable[[Path], str | None] | None = None) -> InputListing:
    """Expand files and folders into the inputs to read and the files skipped, each with its reason.

    Folders are read recursively (as PACS exports lay them out: ``DICOM/.../IM000001`` without suffix), in
    sorted order; a file in a folder is an input when it has an image/DICOM suffix or, without one, the
    ``DICM`` marker. Skipped (listed with the reason): dangling symbolic links, hidden files, non-images,
    unreadable files, ``DICOMDIR``, symbolic links to folders (not followed). Files named explicitly are
    always inputs (a bad one fails when read), except inside an ``exclude`` folder (the run's output
    folder), which is never read. A file skipped in a folder but also named explicitly is read, not skipped.
    ``skip_folder(folder)`` may give a reason to skip a sub-folder (e.g. an earlier run's outputs).
    """
    ex = []
    for e in exclude:
        try:
            ex.append(Path(e).resolve())
        except (OSError, RuntimeError):
            continue
    out = InputListing()
    for p in map(Path, paths):
        if p.is_dir():
            if _inside(p, ex):
                out.skipped.append(SkippedInput(p, OUTPUT_FOLDER_REASON))
                continue
            for q, reason in _walk(p, ex, skip_folder):
                if reason is None:
                    out.files.append(q)
                else:
                    out.skipped.append(SkippedInput(q, reason))
        elif ex and _inside(p, ex):
            out.skipped.append(SkippedInput(p, OUTPUT_FOLDER_REASON))
        else:
            out.files.append(p)
    explicit = {str(f) for f in out.files}
    out.skipped = [s for s in out.skipped if str(s.path) not in explicit]
    return out


def list_inputs(paths: Iterable[str | Path], *, exclude: Iterable[str | Path] = (),
                skip_folder: Callable[[Path], str | None] | None = None) -> list[Path]:
    """The input files of :func:`scan_inputs` (folders recursive; skipped files left out)."""
    return scan_inputs(paths, exclude=exclude, skip_folder=skip_folder).files
