"""PNG bytes in and out without PIL, for the small images this server reads and writes.

Every inflate here is bounded by what the header allows, so a small upload that claims a
small image cannot make the server inflate gigabytes (a decompression bomb).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)
# chunks that change nothing in the decoded pixels (PIL applies none of them either)
_INERT_CHUNKS = frozenset({b"tEXt", b"pHYs", b"tIME", b"gAMA", b"cHRM", b"sRGB"})
# metadata that PIL inflates (each up to its MAX_TEXT_CHUNK), but with no limit on how many
# chunks: past this many, the upload is refused before PIL sees it
COMPRESSED_CHUNKS = frozenset({b"zTXt", b"iTXt", b"iCCP"})
MAX_COMPRESSED_CHUNKS = 8
_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """(H, W, C) uint8 -> PNG bytes, C in {1, 3, 4}.

    Written directly (IHDR, one zlib IDAT with filter 0 on every row, IEND): PIL's encoder
    costs several times more per tiny image in its own machinery.
    """
    h, w, c = image.shape
    if image.dtype != np.uint8 or c not in _COLOR_TYPE:
        raise ValueError(f"expected (H, W, 1|3|4) uint8, got {image.shape} {image.dtype}")
    rows = np.zeros((h, 1 + w * c), dtype=np.uint8)  # a leading 0 per row: filter "None"
    rows[:, 1:] = image.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[c], 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)) + _chunk(b"IEND", b""))


def chunks(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """(type, body) of each chunk up to IEND, CRCs checked; stops early at anything broken.
    Nothing is inflated."""
    if data[:8] != PNG_SIGNATURE:
        return
    view, pos, end = memoryview(data), 8, len(data)
    while pos + 12 <= end:
        n = int.from_bytes(data[pos:pos + 4], "big")
        body_end = pos + 8 + n
        if body_end + 4 > end or zlib.crc32(view[pos + 4:body_end]) != int.from_bytes(
                data[body_end:body_end + 4], "big"):
            return
        kind = data[pos + 4:pos + 8]
        yield kind, view[pos + 8:body_end]
        if kind == b"IEND":
            return
        pos = body_end + 4


def refusal(data: bytes) -> str | None:
    """Why a PNG must not reach a decoder, read from its chunks alone; None when it may.

    Refused: more compressed metadata chunks than MAX_COMPRESSED_CHUNKS, and image data
    (IDAT) more than twice the size of the pixels its header declares, which no encoder
    writes but a decompression bomb needs.
    """
    compressed = idat = 0
    declared = None
    for kind, body in chunks(data):
        if kind == b"IHDR" and len(body) == 13:
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            declared = h * (1 + (w * depth * _SAMPLES.get(ctype, 4) + 7) // 8)
        elif kind == b"IDAT":
            idat += len(body)
        elif kind in COMPRESSED_CHUNKS:
            compressed += 1
    if compressed > MAX_COMPRESSED_CHUNKS:
        return f"the PNG carries more than {MAX_COMPRESSED_CHUNKS} compressed metadata chunks"
    if declared is not None and idat > 2 * declared + 1024:
        return "the PNG's image data is larger than its header allows"
    return None


def inflate_exactly(data: bytes, size: int) -> bytes | None:
    """The zlib stream `data` inflated, if it holds exactly `size` bytes; else None.

    At most `size` + 1 bytes are ever produced, whatever the stream claims.
    """
    d = zlib.decompressobj()
    try:
        raw = d.decompress(data, size + 1)
    except zlib.error:
        return None
    if len(raw) != size or d.unconsumed_tail or not d.eof:
        return None  # more than `size` (a bomb), or cut short
    return raw


def simple_png_pixels(data: bytes, channels: int, size: tuple[int, int]) -> np.ndarray | None:
    """The pixels (H, W, C) uint8 of a plain PNG already at `size` (H, W) and `channels`;
    None for anything else, which then takes the general (PIL) path.

    Plain: 8-bit grey or RGB, not interlaced, every chunk's CRC intact, no transparency, EXIF
    or animation, and rows filtered None, Sub or Up (what this server's writer and most
    array-to-PNG writers produce): PIL would not change a pixel of it, and costs far more.
    """
    H, W = size
    if channels not in (1, 3) or len(data) < 45 or data[:8] != PNG_SIGNATURE:
        return None
    if data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        return None
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if (w, h, depth, ctype, comp, filt, interlace) != (W, H, 8, _COLOR_TYPE[channels], 0, 0, 0):
        return None
    idat, ended = [], False
    for kind, body in chunks(data):
        if kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            ended = True
        elif kind != b"IHDR" and kind not in _INERT_CHUNKS:
            return None
    if not ended:
        return None  # truncated or a bad CRC
    stride = W * channels
    raw = inflate_exactly(b"".join(idat), H * (stride + 1))
    if raw is None:
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
