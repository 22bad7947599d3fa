"""Converting between float image tensors, uint8 arrays, tiles and PNG bytes."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8 tensor (torch ops only: traceable)."""
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8."""
    return to_pixels(images).cpu().numpy()


def tile(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows*H + pad..., C) mosaic, row-major, `pad` black pixels apart."""
    B, H, W, C = images.shape
    cols = cols or math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    out = np.zeros((rows * (H + pad) - pad, cols * (W + pad) - pad, C), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        out[r * (H + pad): r * (H + pad) + H, c * (W + pad): c * (W + pad) + W] = images[i]
    return out


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """(H, W, C) uint8 -> PNG bytes, C in {1, 3, 4}.

    Written directly (IHDR, one zlib IDAT with filter 0 on every row, IEND): for these tiny
    images PIL's encoder spends ~200 us per image in its own machinery, this ~30 us.
    """
    h, w, c = image.shape
    if image.dtype != np.uint8 or c not in _COLOR_TYPE:
        raise ValueError(f"expected (H, W, 1|3|4) uint8, got {image.shape} {image.dtype}")
    rows = np.zeros((h, 1 + w * c), dtype=np.uint8)  # a leading 0 per row: filter "None"
    rows[:, 1:] = image.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[c], 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)) + _chunk(b"IEND", b""))


# chunks that change nothing in the decoded pixels (PIL applies none of them either)
_INERT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"pHYs", b"tIME", b"gAMA", b"cHRM",
                           b"sRGB", b"iCCP"})


def simple_png_pixels(data: bytes, channels: int, size: tuple[int, int]) -> np.ndarray | None:
    """The pixels (H, W, C) uint8 of a plain PNG already at `size` (H, W) and `channels`;
    None for anything else, which then takes the general (PIL) path.

    Plain: 8-bit grey or RGB, not interlaced, every chunk's CRC intact, no transparency, EXIF
    or animation, and rows filtered None, Sub or Up (what this server's writer and most
    array-to-PNG writers produce). For a 28x28 upload this costs ~25 us; PIL's open, checks
    and conversions cost ~190 us of event-loop time.
    """
    H, W = size
    if channels not in (1, 3) or len(data) < 45 or data[:8] != PNG_SIGNATURE:
        return None
    if data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        return None
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if (w, h, depth, ctype, comp, filt, interlace) != (W, H, 8, _COLOR_TYPE[channels], 0, 0, 0):
        return None
    idat, pos, end = [], 8, len(data)
    while True:
        if pos + 12 > end:
            return None  # truncated
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        body_end = pos + 8 + n
        if body_end + 4 > end or zlib.crc32(data[pos + 4:body_end]) != int.from_bytes(
                data[body_end:body_end + 4], "big"):
            return None
        if kind == b"IDAT":
            idat.append(data[pos + 8:body_end])
        elif kind == b"IEND":
            break
        elif kind != b"IHDR" and kind not in _INERT_CHUNKS:
            return None
        pos = body_end + 4
    stride = W * channels
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error:
        return None
    if len(raw) != H * (stride + 1):
        return None
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(H, stride + 1)
    kinds = rows[:, 0]
    if kinds.max() > 2:
        return None  # Average or Paeth rows: sequential per byte, PIL is faster at them
    out = rows[:, 1:].copy()
    for y in np.flatnonzero(kinds):
        if kinds[y] == 1:  # Sub: add the reconstructed pixel to the left (running sum mod 256)
            out[y] = np.cumsum(out[y].reshape(W, channels), axis=0, dtype=np.uint8).reshape(-1)
        elif y:  # Up: add the reconstructed row above (none above the first row)
            out[y] += out[y - 1]
    return out.reshape(H, W, channels)
