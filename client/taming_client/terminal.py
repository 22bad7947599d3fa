"""Drawing streamed rows in a terminal: each completed token row is printed as the band of
pixels it covers, all images side by side, so the picture grows down the screen as it is
sampled. Colour terminals get half-block characters in 24-bit colour (two pixel rows per
line); anything else gets an ASCII ramp."""

from __future__ import annotations

import os
from typing import TextIO

import numpy as np
from PIL import Image

from .types import RowEvent

RAMP = " .:-=+*#%@"
GAP = "  "


def wants_colour(out: TextIO) -> bool:
    return (hasattr(out, "isatty") and out.isatty() and "NO_COLOR" not in os.environ
            and os.environ.get("TERM") != "dumb")


def _rgb(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def band_lines(pixels: list[np.ndarray], colour: bool) -> list[str]:
    """Pixel rows (H, W, 3) of several images, of one height -> terminal lines."""
    h = pixels[0].shape[0]
    lines = []
    for y in range(0, h, 2):
        parts = []
        for px in pixels:
            top = px[y]
            bottom = px[y + 1] if y + 1 < h else np.zeros_like(top)
            if colour:
                cells = [f"\x1b[38;2;{t[0]};{t[1]};{t[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m\u2580"
                         for t, b in zip(top.tolist(), bottom.tolist(), strict=True)]
                parts.append("".join(cells) + "\x1b[0m")
            else:
                luma = (top.astype(np.float32).mean(1) + bottom.astype(np.float32).mean(1)) / 2
                idx = np.minimum((luma / 256 * len(RAMP)).astype(int), len(RAMP) - 1)
                parts.append("".join(RAMP[i] for i in idx))
        lines.append(GAP.join(parts))
    return lines


class RowPainter:
    """Prints token row r once every image has finished it (images are sampled together, so
    rows arrive in step), from the newest preview of each image."""

    def __init__(self, out: TextIO, n: int, colour: bool | None = None) -> None:
        self.out, self.n = out, n
        self.colour = wants_colour(out) if colour is None else colour
        self.previews: dict[int, Image.Image] = {}
        self.strips: dict[tuple[int, int], Image.Image] = {}
        self.finished: dict[int, set[int]] = {}
        self.next_row = 0
        self.cell = 0  # pixels per token, from the first event

    def add(self, event: RowEvent) -> None:
        if event.top is None:
            self.previews[event.image] = event.preview
        else:  # a canvas: the row's own strip, kept until every image has that row
            self.strips[event.image, event.row] = event.preview
        self.finished.setdefault(event.row, set()).add(event.image)
        self.cell = self.cell or max(1, event.preview.width // max(1, len(event.tokens)))
        while len(self.finished.get(self.next_row, ())) >= self.n:
            y0 = self.next_row * self.cell
            if self.strips:
                band = [_rgb(self.strips.pop((i, self.next_row))) for i in range(self.n)]
            else:
                band = [_rgb(self.previews[i])[y0:y0 + self.cell] for i in sorted(self.previews)]
            if band and band[0].shape[0]:
                self._print(band_lines(band, self.colour))
            self.next_row += 1

    def whole(self, images: list[Image.Image]) -> None:
        """Draw finished images at once (a server that does not stream sends no rows)."""
        self._print(band_lines([_rgb(im) for im in images], self.colour))

    def _print(self, lines: list[str]) -> None:
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
