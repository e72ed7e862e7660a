"""A contact sheet of a batch's overlays, flagged images first (``lungsam predict --overlay``). Torch-free (Pillow).

Memory is bounded: each overlay is kept as a thumbnail (``THUMB`` px on its longer side) and at most
``MAX_TILES`` tiles are drawn (flagged ones first, then by quality score, lowest first); the sheet says how many
were left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..artifacts import atomic_path

THUMB = 160
MAX_TILES = 240
COLUMNS = 8
FLAG_COLOR = (230, 40, 40)


def flag_frame(rgb: np.ndarray, color: tuple[int, int, int] = FLAG_COLOR) -> np.ndarray:
    """``(H, W, 3)`` uint8 with a solid frame (2 % of the shorter side, at least 3 px) marking a flagged image."""
    out = np.array(rgb, np.uint8, copy=True)
    w = max(3, round(0.02 * min(out.shape[:2])))
    out[:w], out[-w:], out[:, :w], out[:, -w:] = color, color, color, color
    return out


@dataclass
class ContactSheet:
    """Collects overlays (:meth:`add`) and writes them as one PNG (:meth:`write`)."""

    tiles: list[tuple[bool, float, str, Image.Image]] = field(default_factory=list)
    left_out: int = 0

    def add(self, overlay: np.ndarray, name: str, qc: dict | None) -> None:
        """One image's ``(H, W, 3)`` uint8 overlay and its quality flag (``SegmentationResult.qc`` or ``None``)."""
        flagged = bool(qc and qc.get("flag"))
        score = float(qc["score"]) if qc else 1.0
        im = Image.fromarray(overlay)
        im.thumbnail((THUMB, THUMB))
        self.tiles.append((flagged, score, name, im))
        self.tiles.sort(key=lambda t: (not t[0], t[1]))  # flagged first, then the lowest scores
        if len(self.tiles) > MAX_TILES:
            self.tiles.pop()
            self.left_out += 1

    def write(self, path: Path) -> Path | None:
        """The sheet as PNG at ``path`` (atomic); ``None`` (nothing written) when no overlay was added."""
        if not self.tiles:
            return None
        cols = min(COLUMNS, len(self.tiles))
        rows = -(-len(self.tiles) // cols)
        label_h = 14
        header = 18
        sheet = Image.new("RGB", (cols * THUMB, header + rows * (THUMB + label_h)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        n_flag = sum(t[0] for t in self.tiles)
        more = f"; {self.left_out} more not shown" if self.left_out else ""
        draw.text((4, 3), f"{len(self.tiles)} images, {n_flag} flagged (red frame, first){more}", fill=(0, 0, 0))
        for i, (flagged, score, name, im) in enumerate(self.tiles):
            x, y = (i % cols) * THUMB, header + (i // cols) * (THUMB + label_h)
            sheet.paste(im, (x + (THUMB - im.width) // 2, y + (THUMB - im.height) // 2))
            draw.text((x + 2, y + THUMB), f"{name[:18]} q{score:.2f}",
                      fill=FLAG_COLOR if flagged else (0, 0, 0))
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="PNG")
        return path
