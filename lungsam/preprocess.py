"""The one preprocessing path: numpy/Pillow only, shared by train, export and runtime.

Coordinate frames used throughout lungsam:

* **original**: the image as read from disk, ``(H0, W0)``.
* **working**: the image resized (aspect not kept, as in the paper) to ``(S, S)`` where ``S`` is the
  run's working resolution (default 256). Masks, metrics and learned prompts live here.
* **model**: SAM's input frame: the working image resized so its longest side is ``spec.img_size``
  (SAM's ``ResizeLongestSide``), then padded bottom/right to ``img_size x img_size``.
* **low-res**: the decoder's logits, ``(4 * E, 4 * E)`` for an ``E x E`` embedding, covering the
  padded model frame.

Prompt coordinates are ``(x, y)`` pixels, float32. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from PIL import Image

Normalization = Literal["mean_std", "minmax"]


@dataclass(frozen=True)
class PreprocessSpec:
    """How a backbone wants its input; travels with runs and exported bundles.

    Attributes:
        img_size: side of SAM's square model frame (1024 for SAM/MobileSAM, 256 for LiteMedSAM).
        normalization: ``mean_std``: ``(x - pixel_mean) / pixel_std`` per RGB channel on 0..255 values;
            ``minmax``: ``(x - min) / (max - min)`` over the resized image (LiteMedSAM's rule).
        pixel_mean, pixel_std: RGB, on the 0..255 scale (used by ``mean_std``).
        embedding_size: side E of the encoder's output grid; the low-res mask is ``4E x 4E``.
        mask_threshold_logit: SAM's logit threshold (0.0), used only for zero-shot defaults.
    """

    img_size: int
    normalization: Normalization = "mean_std"
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    embedding_size: int = 64
    resize: str = "longest_side_bilinear"
    pad: str = "bottom_right"

    @property
    def low_res_size(self) -> int:
        return 4 * self.embedding_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        d = dict(d)
        d["pixel_mean"] = tuple(d["pixel_mean"])
        d["pixel_std"] = tuple(d["pixel_std"])
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def to_uint8(image: np.ndarray) -> np.ndarray:
    """Any grayscale/RGB(A) array (uint8, uint16, int, float) -> ``(H, W)`` (grey) or ``(H, W, 3)``
    uint8, keeping a grey image one plane.

    8-bit data is kept as is. Wider integer or float data is min-max scaled to 0..255 (per image),
    since 12/16-bit radiographs rarely use the full 16-bit range.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"expected a (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image has zero size {a.shape}")
    if a.dtype != np.uint8:
        lo, hi = float(a.min()), float(a.max())  # == the float64 copy's min/max (conversion is monotonic)
        out = np.zeros(a.shape, np.uint8)
        if hi > lo:
            rows = max(1, (1 << 22) // max(1, a[0].size))  # float64 work in ~32 MB row blocks: bounded memory
            for r in range(0, a.shape[0], rows):
                f = (a[r:r + rows].astype(np.float64) - lo) * (255.0 / (hi - lo))
                out[r:r + rows] = np.clip(np.rint(f), 0, 255).astype(np.uint8)
        a = out
    return np.ascontiguousarray(a)


def grey_to_rgb(plane: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 -> ``(H, W, 3)`` uint8 with three equal channels."""
    return np.repeat(plane[:, :, None], 3, axis=2)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any grayscale/RGB(A) array (uint8, uint16, int, float) -> ``(H, W, 3)`` uint8 (see :func:`to_uint8`)."""
    a = to_uint8(image)
    return grey_to_rgb(a) if a.ndim == 2 else a


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``(H, W, 3)`` or ``(H, W)`` uint8 image to ``size_hw`` with Pillow (as SAM does).

    Pillow resizes each channel independently with the same weights, so a grey plane resized alone equals
    any channel of its RGB form resized (tested)."""
    h, w = size_hw
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a ``(H, W)`` bool/uint8 mask; returns bool."""
    h, w = size_hw
    m = np.asarray(mask).astype(np.uint8) * 255 if np.asarray(mask).dtype == bool else np.asarray(mask)
    if m.shape[:2] != (h, w):
        m = np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST))
    return m > 0


def to_working(image: np.ndarray, size: int) -> np.ndarray:
    """Original image (any dtype/channels) -> working frame ``(size, size, 3)`` uint8.

    A grey image is resized as one plane and then repeated (:func:`resize_image`): equal to resizing its
    RGB form, at a third of the cost.
    """
    a = resize_image(to_uint8(image), (size, size))
    return a if a.ndim == 3 else grey_to_rgb(a)


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Size after resizing so the longest side is ``long_side`` (SAM's rounding: ``int(x + 0.5)``)."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(h', w', 3)`` uint8 with ``max(h', w') == long_side``."""
    return resize_image(image, preprocess_shape(image.shape[0], image.shape[1], long_side))


def normalize(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """``(h, w, 3)`` uint8 -> ``(h, w, 3)`` float32 normalised per ``spec.normalization``."""
    x = image.astype(np.float32)
    if spec.normalization == "mean_std":
        return (x - np.asarray(spec.pixel_mean, np.float32)) / np.asarray(spec.pixel_std, np.float32)
    if spec.normalization == "minmax":
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / max(hi - lo, 1e-8)
    raise ValueError(f"unknown normalization {spec.normalization!r}")


def pad_fill_value(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The raw pixel value whose normalised value is 0, per channel (float32, shape ``(3,)``).

    Padding with it before normalising equals SAM's zero-padding after normalising; this lets
    exported encoders carry normalisation inside the graph.
    """
    if spec.normalization == "mean_std":
        return np.asarray(spec.pixel_mean, np.float32)
    return np.full(3, float(image.min()), np.float32)


def resized_planes(working_image: np.ndarray, spec: PreprocessSpec) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Working image ``(S, S, 3)`` uint8 -> its three channels resized to the longest side
    ``spec.img_size`` (three ``(h', w')`` uint8 planes) and ``(h', w')``.

    A grey image (three equal channels, every radiograph read by :func:`to_rgb_uint8`) is resized once
    and its plane shared (:func:`resize_image`): equal to :func:`resize_longest_side`, at a third of the cost.
    """
    hw = preprocess_shape(working_image.shape[0], working_image.shape[1], spec.img_size)
    c0 = working_image[..., 0]
    if np.array_equal(c0, working_image[..., 1]) and np.array_equal(c0, working_image[..., 2]):
        plane = resize_image(np.ascontiguousarray(c0), hw)
        return [plane, plane, plane], hw
    resized = resize_image(working_image, hw)
    return [resized[..., c] for c in range(3)], hw


def normalization_affine(planes: list[np.ndarray], spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 ``(offset (3,), divisor (3,))`` with ``normalised = (raw - offset) / divisor``,
    the same float32 operands :func:`normalize_model_input` uses (``planes``: the resized uint8 channels).
    ``offset`` is also the raw value that normalises to 0, i.e. :func:`pad_fill_value`."""
    if spec.normalization == "mean_std":
        return np.asarray(spec.pixel_mean, np.float32), np.asarray(spec.pixel_std, np.float32)
    if spec.normalization != "minmax":
        raise ValueError(f"unknown normalization {spec.normalization!r}")
    distinct = {id(p): p for p in planes}.values()  # a grey image's three planes are one array
    lo = np.float32(min(int(p.min()) for p in distinct))
    hi = np.float32(max(int(p.max()) for p in distinct))
    return np.full(3, lo, np.float32), np.full(3, np.maximum(hi - lo, np.float32(1e-8)), np.float32)


def model_input(working_image: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """Working image ``(S, S, 3)`` uint8 -> raw model input ``(3, img, img)`` float32 (0..255, padded
    with :func:`pad_fill_value`, not yet normalised) and the resized size ``(h', w')`` before padding.
    """
    planes, (h, w) = resized_planes(working_image, spec)
    fill, _ = normalization_affine(planes, spec)  # the raw value that normalises to 0 (pad_fill_value)
    out = np.empty((3, spec.img_size, spec.img_size), np.float32)
    for c, plane in enumerate(planes):
        out[c, :h, :w] = plane
        out[c, :h, w:] = fill[c]
        out[c, h:, :] = fill[c]
    return out, (h, w)


def normalize_model_input(raw: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Normalise a raw model input ``(..., 3, img, img)`` float32 (the step exported encoders do in-graph)."""
    if spec.normalization == "mean_std":
        mean = np.asarray(spec.pixel_mean, np.float32).reshape(3, 1, 1)
        std = np.asarray(spec.pixel_std, np.float32).reshape(3, 1, 1)
        return ((raw - mean) / std).astype(np.float32)
    lo = raw.min(axis=(-3, -2, -1), keepdims=True)
    hi = raw.max(axis=(-3, -2, -1), keepdims=True)
    return ((raw - lo) / np.maximum(hi - lo, 1e-8)).astype(np.float32)


def encoder_input(working_image: np.ndarray, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Working image -> normalised, padded ``(3, img, img)`` float32, exactly SAM's ``preprocess``
    (bit-equal to ``normalize_model_input(model_input(...))``; the padding is 0).

    ``out``: an optional ``(3, img, img)`` float32 array to write into (e.g. one row of a pinned
    host batch), returned; without it a new array is allocated.
    """
    planes, (h, w) = resized_planes(working_image, spec)
    offset, divisor = normalization_affine(planes, spec)
    shape = (3, spec.img_size, spec.img_size)
    if out is None:
        out = np.zeros(shape, np.float32)
    else:
        if out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"out must be a {shape} float32 array, got {out.shape} {out.dtype}")
        out[:, h:, :] = 0.0
        out[:, :h, w:] = 0.0
    for c, plane in enumerate(planes):
        region = out[c, :h, :w]
        region[...] = plane
        np.subtract(region, offset[c], out=region)
        np.divide(region, divisor[c], out=region)
    return out


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------

def scale_coords(coords: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Scale ``(..., 2)`` ``(x, y)`` pixel coordinates from one frame size to another (float32)."""
    c = np.asarray(coords, np.float32).copy()
    c[..., 0] *= to_hw[1] / from_hw[1]
    c[..., 1] *= to_hw[0] / from_hw[0]
    return c


def coords_to_model(coords: np.ndarray, image_hw: tuple[int, int], spec: PreprocessSpec) -> np.ndarray:
    """``(x, y)`` in an image of size ``image_hw`` -> model frame (SAM's ``apply_coords``)."""
    return scale_coords(coords, image_hw, preprocess_shape(*image_hw, spec.img_size))


def boxes_to_model(boxes: np.ndarray, image_hw: tuple[int, int], spec: PreprocessSpec) -> np.ndarray:
    """``(..., 4)`` ``x0, y0, x1, y1`` boxes -> model frame (SAM's ``apply_boxes``)."""
    b = np.asarray(boxes, np.float32)
    return coords_to_model(b.reshape(*b.shape[:-1], 2, 2), image_hw, spec).reshape(b.shape)


def fractions_to_pixels(frac: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """``(..., 2)`` coordinates as fractions of width/height -> pixel ``(x, y)`` in ``image_hw``."""
    f = np.asarray(frac, np.float32)
    return f * np.asarray([image_hw[1], image_hw[0]], np.float32)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------

def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float64 matrix of 1-D bilinear interpolation with half-pixel centres,
    identical to ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    return m


def postprocess_matrices(spec: PreprocessSpec, input_hw: tuple[int, int],
                         out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column matrices ``(A_y, A_x)`` so that ``A_y @ low_res @ A_x.T`` equals SAM's
    ``postprocess_masks`` (upsample to ``img_size``, crop to ``input_hw``, resize to ``out_hw``).

    ``input_hw`` is the resized size before padding (see :func:`model_input`); float32 results.
    """
    lr, full = spec.low_res_size, spec.img_size
    up = bilinear_matrix(lr, full)
    ay = bilinear_matrix(input_hw[0], out_hw[0]) @ up[: input_hw[0]]
    ax = bilinear_matrix(input_hw[1], out_hw[1]) @ up[: input_hw[1]]
    return ay.astype(np.float32), ax.astype(np.float32)


def postprocess_logits(low_res: np.ndarray, spec: PreprocessSpec, input_hw: tuple[int, int],
                       out_hw: tuple[int, int]) -> np.ndarray:
    """Low-res logits ``(..., L, L)`` float -> logits ``(..., H, W)`` float32 at ``out_hw``."""
    ay, ax = postprocess_matrices(spec, input_hw, out_hw)
    return (ay @ np.asarray(low_res, np.float32) @ ax.T).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float32."""
    y = np.array(x, np.float32)  # one new array, the rest in place (bounded memory for large masks)
    y *= np.float32(0.5)
    np.tanh(y, out=y)
    y += np.float32(1.0)
    y *= np.float32(0.5)
    return y if y.ndim else y[()]

