"""Editing a user's image: which cells of a canvas are kept (the source's tokens) and which
are sampled (the mask, and every cell of a larger canvas outside the source).

A source is a token grid, or an image that the model's tokenizer encodes first. An image of
whole tokens (each side a multiple of the tokenizer's patch, within the model's max_grid) is
encoded at its own size; any other is fitted to the model's image size as /encode fits it
(padded with black to its aspect ratio, then resized), and its PNG mask goes through the
same geometry. A mask is a PNG at the image's size, whose transparent pixels (alpha < 128,
when it has an alpha channel) or else black ones (luma < 128) mark the region to sample, or
a boolean grid of the source's cells (true: sample). A cell is sampled when any pixel of it
is marked. Everything here checks its input and raises a 4xx ServiceError before any work
is queued; `FREE` cells of the result are what the sampler picks.

The async glue at the bottom runs the decoding on the I/O pool and the encoding in the
tokenizer's batches, through the same admission as /encode.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from PIL import Image, ImageOps

from models.sampling import FREE

from .errors import ServiceError, invalid
from .imaging import convert, fit, header_pixels, open_checked
from .registry import ModelEntry

MARK = 128  # alpha below it: transparent; luma below it: black


@dataclass
class Source:
    """What a request edits: its tokens, the cells to sample, and where it sits."""

    tokens: np.ndarray  # (h, w) int64
    mask: np.ndarray  # (h, w) bool, True: sampled
    grid: tuple[int, int]  # the canvas
    offset: tuple[int, int]  # [row, col] of the source's top-left cell in the canvas

    def cells(self) -> np.ndarray:
        """Raster-order codes of the canvas: the kept source cells, FREE everywhere else."""
        out = np.full(self.grid, FREE, dtype=np.int64)
        r, c = self.offset
        h, w = self.tokens.shape
        out[r:r + h, c:c + w] = np.where(self.mask, FREE, self.tokens)
        return out.reshape(-1)


# ---- bytes and grids in -------------------------------------------------------------------
def b64_bytes(text: str, field: str) -> bytes:
    """Base64 (optionally a data: URL) -> bytes; 422 when it is not base64."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise invalid(f"{field}: a data URL must be base64 (data:<type>;base64,...)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{field}: not valid base64") from None
    if not data:
        raise invalid(f"{field}: empty")
    return data


def token_grid(rows: list[list[int]], entry: ModelEntry) -> np.ndarray:
    """A rectangular grid of ids in [0, K) within max_grid -> int64 (h, w)."""
    if not rows or not rows[0]:
        raise invalid("tokens: the grid is empty")
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise invalid(f"tokens: row {i} has {len(row)} ids, row 0 has {width}: the grid "
                          "must be rectangular")
    K = entry.bundle.gpt.config.codebook_size
    if not all(0 <= t < K for row in rows for t in row):  # Python ints: no int64 overflow
        raise invalid(f"tokens: ids must lie in [0, {K})")
    grid = np.asarray(rows, dtype=np.int64)
    _within(entry, grid.shape, "tokens")
    return grid


def _within(entry: ModelEntry, shape: tuple[int, ...], field: str) -> None:
    mr, mc = entry.max_grid
    if shape[0] > mr or shape[1] > mc:
        raise invalid(f"{field}: a source of {shape[0]}x{shape[1]} cells exceeds model "
                      f"{entry.name!r}'s max_grid [{mr}, {mc}]")


def grid_mask(rows: list[list[bool]], shape: tuple[int, int]) -> np.ndarray:
    """A boolean cell grid of exactly the source's shape (true: sample)."""
    if len(rows) != shape[0] or any(len(r) != shape[1] for r in rows):
        got = f"{len(rows)} rows of {sorted({len(r) for r in rows})} cells" if rows else "no rows"
        raise invalid(f"mask: a cell grid must be {shape[0]} rows of {shape[1]} booleans (the "
                      f"source's cells), got {got}")
    return np.asarray(rows, dtype=bool)


def marked_pixels(im: Image.Image) -> np.ndarray:
    """(H, W) bool: the pixels a mask image marks for sampling."""
    im = ImageOps.exif_transpose(im) or im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if has_alpha(im):
        return np.asarray(im.convert("RGBA"))[..., 3] < MARK
    return np.asarray(convert(im, 1)) < MARK


def png_mask(blob: bytes, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """A mask image that must be `size` (H, W) -> its marked pixels; 422 otherwise."""
    try:
        im = open_checked(blob, max_pixels)
    except ServiceError as e:
        e.message = f"mask: {e.message}"
        raise
    marked = marked_pixels(im)
    if marked.shape != tuple(size):
        raise invalid(f"mask: the mask is {marked.shape[1]}x{marked.shape[0]} pixels, the image "
                      f"{size[1]}x{size[0]}: they must be the same size")
    return marked


def cell_mask(marked: np.ndarray, target: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Marked pixels of an image that `imaging.fit` turns into `target` (H, W) pixels of
    `grid` cells -> (rows, cols) bool: a cell is sampled when any pixel under it is marked."""
    h, w = marked.shape
    H, W = target
    cw, ch = max(w, round(h * W / H)), max(h, round(w * H / W))  # fit's padded canvas
    padded = np.zeros((ch, cw), dtype=bool)
    top, left = (ch - h) // 2, (cw - w) // 2
    padded[top:top + h, left:left + w] = marked
    rows, cols = grid
    out = np.zeros(grid, dtype=bool)
    for i in range(rows):
        r0, r1 = i * ch // rows, math.ceil((i + 1) * ch / rows)
        band = padded[r0:r1].any(axis=0)
        for j in range(cols):
            out[i, j] = band[j * cw // cols: math.ceil((j + 1) * cw / cols)].any()
    return out


def image_target(entry: ModelEntry, size: tuple[int, int]) -> tuple[int, int]:
    """The pixels an uploaded image of `size` (H, W) is encoded at: its own when it is whole
    tokens within max_grid, else the model's image size."""
    f = entry.image_size[0] // entry.grid[0]
    H, W = size
    mr, mc = entry.max_grid
    if H % f == 0 and W % f == 0 and H // f <= mr and W // f <= mc:
        return H, W
    return tuple(entry.image_size)


def decode_source(blob: bytes, entry: ModelEntry, max_pixels: int
                  ) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> uint8 pixels (1, H, W, C) for the tokenizer, and the upload's own
    size (H, W) after its EXIF orientation (the size its PNG mask must have)."""
    im = open_checked(blob, max_pixels)
    im = ImageOps.exif_transpose(im) or im
    own = (im.size[1], im.size[0])
    im = fit(convert(im, entry.channels), image_target(entry, own))
    a = np.array(im, dtype=np.uint8)  # a writable copy: the tokenizer's batch takes it
    return (a[..., None] if a.ndim == 2 else a)[None], own


def place(entry: ModelEntry, shape: tuple[int, int], grid: list[int] | None,
          offset: list[int] | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """The canvas (default: the source's grid, at least the model's) and the source's offset
    in it (default: centred); 422 when the canvas is out of bounds or the source does not
    lie inside it."""
    mr, mc = entry.grid
    h, w = shape
    R, C = (max(h, mr), max(w, mc)) if grid is None else (grid[0], grid[1])
    if grid is not None and (h > R or w > C):
        raise invalid(f"grid [{R}, {C}] is smaller than the source's {h}x{w} cells")
    if offset is None:
        return (R, C), ((R - h) // 2, (C - w) // 2)
    r, c = offset
    if r < 0 or c < 0 or r + h > R or c + w > C:
        raise invalid(f"offset [{r}, {c}] puts the source's {h}x{w} cells outside the canvas "
                      f"[{R}, {C}]: it needs 0 <= row <= {R - h} and 0 <= col <= {C - w}")
    return (R, C), (r, c)


# ---- the async glue -------------------------------------------------------------------------
def cells_of(entry: ModelEntry, pixels: np.ndarray) -> tuple[int, int]:
    """The token grid of pixels (1, H, W, C) the tokenizer encodes."""
    f = entry.image_size[0] // entry.grid[0]
    return pixels.shape[1] // f, pixels.shape[2] // f


async def decode_image(svc, entry: ModelEntry, blob: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_source` on the I/O pool."""
    return await svc.offload(decode_source, blob, entry, svc.settings.max_image_pixels,
                             pixels=header_pixels([blob]))


async def image_mask(svc, entry: ModelEntry, mask: bytes | list[list[bool]] | None,
                     own: tuple[int, int], pixels: np.ndarray,
                     alpha_of: bytes | None = None) -> np.ndarray:
    """The cells of a decoded image source to sample: from a PNG at its own size `own`, a
    cell grid, or (with `alpha_of`, OpenAI's convention when no mask is sent) the image's
    own transparent pixels; none when there is no mask."""
    limit = svc.settings.max_image_pixels
    target, shape = pixels.shape[1:3], cells_of(entry, pixels)
    if isinstance(mask, bytes):
        marked = await svc.offload(png_mask, mask, own, limit, pixels=header_pixels([mask]))
    elif mask is not None:
        return grid_mask(mask, shape)
    elif alpha_of is not None:
        marked = await svc.offload(_own_alpha, alpha_of, limit, pixels=header_pixels([alpha_of]))
    else:
        return np.zeros(shape, dtype=bool)
    return cell_mask(marked, target, shape)


async def encode_pixels(request: Request, svc, entry: ModelEntry, pixels: np.ndarray
                        ) -> np.ndarray:
    """Tokens (h, w) of one decoded source, in the tokenizer's batches (those of /encode
    when it is the model's size)."""
    svc.check_room(entry, "encode")
    target = tuple(pixels.shape[1:3])
    key = None if target == tuple(entry.image_size) else target
    out = await svc.run(request, entry, "encode", key, pixels, 1)
    return out["tokens"][0].astype(np.int64)


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in im.info


def alpha_checked(blob: bytes, max_pixels: int, field: str) -> bool:
    """Whether an upload has an alpha channel (its upload policy checked)."""
    try:
        return has_alpha(open_checked(blob, max_pixels))
    except ServiceError as e:
        e.message = f"{field}: {e.message}"
        raise


def _own_alpha(blob: bytes, max_pixels: int) -> np.ndarray:
    """An image's transparent pixels (none when it has no alpha channel)."""
    im = ImageOps.exif_transpose(open_checked(blob, max_pixels))
    return marked_pixels(im) if has_alpha(im) else np.zeros((im.size[1], im.size[0]), dtype=bool)


def token_mask(entry: ModelEntry, tokens: np.ndarray, mask: bytes | list[list[bool]] | None,
               max_pixels: int) -> np.ndarray:
    """The mask of a token-grid source: a cell grid, or a PNG at the grid's pixel size."""
    shape = tokens.shape
    if mask is None:
        return np.zeros(shape, dtype=bool)
    if not isinstance(mask, bytes):
        return grid_mask(mask, shape)
    f = entry.image_size[0] // entry.grid[0]
    size = (shape[0] * f, shape[1] * f)
    return cell_mask(png_mask(mask, size, max_pixels), size, shape)
