"""Text, tubes and ECG electrodes burnt into a radiograph, the mask unchanged (torch-free; Pillow ImageDraw).

Other hospitals' images carry what the training sets rarely do: burnt-in annotations (side markers,
dates, technologist initials) and lines and devices over the chest (nasogastric and endotracheal tubes,
central lines, ECG leads and electrodes). Drawn over the lung they must not change what is lung, so only
the image is drawn on. Drawn with ``PIL.ImageDraw`` from ``numpy.random.default_rng(seed)``; sizes scale
with the side S (given for S = 256).
"""
from __future__ import annotations

import string
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BurnInSpec:
    """How many of each item to draw (``(lo, hi)`` inclusive) and their brightness (0-255)."""

    texts: tuple[int, int] = (0, 3)
    tubes: tuple[int, int] = (0, 2)
    electrodes: tuple[int, int] = (0, 4)
    brightness: tuple[int, int] = (190, 255)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _count(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    return int(rng.integers(lo_hi[0], lo_hi[1] + 1))


def _value(rng: np.random.Generator, spec: BurnInSpec) -> int:
    return int(rng.integers(spec.brightness[0], spec.brightness[1] + 1))


def _draw_texts(draw, rng: np.random.Generator, side: int, spec: BurnInSpec) -> None:
    """Short strings (letters, digits) in the image margins, as side markers and annotations are."""
    from PIL import ImageFont

    for _ in range(_count(rng, spec.texts)):
        size = max(6, int(side * rng.uniform(0.03, 0.07)))
        text = "".join(rng.choice(list(string.ascii_uppercase + string.digits), size=int(rng.integers(1, 9))))
        x = rng.uniform(0.0, 0.75) * side
        y = (rng.uniform(0.0, 0.12) if rng.random() < 0.5 else rng.uniform(0.85, 0.95)) * side
        draw.text((x, y), text, fill=_value(rng, spec), font=ImageFont.load_default(size=size))


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 32) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    return [(float(x), float(y)) for x, y in pts]


def _draw_tubes(draw, rng: np.random.Generator, side: int, spec: BurnInSpec) -> None:
    """Smooth curves from the top of the image down across the chest (tubes, lines, leads)."""
    for _ in range(_count(rng, spec.tubes)):
        p0 = np.array([rng.uniform(0.3, 0.7), 0.0]) * side
        p1 = rng.uniform(0.2, 0.8, size=2) * side
        p2 = np.array([rng.uniform(0.1, 0.9), rng.uniform(0.5, 1.0)]) * side
        width = max(1, int(round(side / 256 * rng.uniform(1.0, 4.0))))
        draw.line(_bezier(p0, p1, p2), fill=_value(rng, spec), width=width, joint="curve")


def _draw_electrodes(draw, rng: np.random.Generator, side: int, spec: BurnInSpec) -> None:
    """Small bright discs with a darker centre (ECG electrodes), anywhere over the chest."""
    for _ in range(_count(rng, spec.electrodes)):
        cx, cy = rng.uniform(0.1, 0.9, size=2) * side
        r = side / 256 * rng.uniform(3.0, 6.0)
        v = _value(rng, spec)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=v)
        draw.ellipse((cx - r / 3, cy - r / 3, cx + r / 3, cy + r / 3), fill=v // 2)


def burn_in(image: np.ndarray, seed: int, spec: BurnInSpec = BurnInSpec()) -> np.ndarray:
    """The image with text, tubes and electrodes drawn on it (the mask is not touched).

    Args:
        image: ``(S, S, 3)`` uint8 working-frame image with three equal channels; seed: drawing seed.
    Returns:
        ``(S, S, 3)`` uint8, three equal channels.
    """
    from PIL import Image, ImageDraw

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (S, S, 3) image, got {image.shape}")
    rng = np.random.default_rng(seed)
    canvas = Image.fromarray(np.ascontiguousarray(image[..., 0]), mode="L")
    draw = ImageDraw.Draw(canvas)
    side = image.shape[0]
    _draw_tubes(draw, rng, side, spec)
    _draw_electrodes(draw, rng, side, spec)
    _draw_texts(draw, rng, side, spec)
    out = np.asarray(canvas, dtype=np.uint8)
    return np.repeat(out[..., None], 3, axis=2)
