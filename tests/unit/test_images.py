"""The PNG writer, the plain-PNG reader and the tiler, each checked against PIL (and so
against what every browser reads); the reader's inflate is bounded by the header."""

import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from models.images import tile, to_uint8
from service.png import MAX_COMPRESSED_CHUNKS, inflate_exactly, png_bytes, refusal, simple_png_pixels


@pytest.mark.parametrize("shape", [(28, 28, 1), (7, 13, 3), (5, 9, 4), (1, 1, 1), (64, 80, 3)])
def test_png_bytes_round_trip_through_pil(shape):
    a = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = png_bytes(a)
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG" and im.size == (shape[1], shape[0])
    assert im.mode == {1: "L", 3: "RGB", 4: "RGBA"}[shape[2]]
    back = np.asarray(im)
    assert np.array_equal(back.reshape(shape), a)


def test_png_bytes_refuses_what_it_cannot_write():
    with pytest.raises(ValueError):
        png_bytes(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError):
        png_bytes(np.zeros((4, 4, 1), dtype=np.float32))


def test_a_tiled_grid_is_one_readable_png():
    x = to_uint8(torch.rand(5, 1, 28, 28))
    grid = tile(x, pad=2)
    assert grid.shape == (2 * 30 - 2, 3 * 30 - 2, 1)  # 3 columns, 2 rows, 2 px apart
    back = np.asarray(Image.open(io.BytesIO(png_bytes(grid))))
    assert np.array_equal(back[:28, :28], x[0, ..., 0])
    assert np.array_equal(back[:28, 30:58], x[1, ..., 0])
    assert np.array_equal(back[30:58, 30:58], x[4, ..., 0])
    assert not back[30:58, 60:88].any()  # the empty sixth cell stays black


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(a: np.ndarray, filters: list[int], extra: bytes = b"") -> bytes:
    """A PNG of `a` (H, W, C) whose row y is filtered with filters[y] (0 None, 1 Sub, 2 Up)."""
    h, w, c = a.shape
    flat = a.reshape(h, w * c).astype(np.int16)
    rows = []
    for y, f in enumerate(filters):
        if f == 0:
            enc = flat[y]
        elif f == 1:
            enc = flat[y] - np.concatenate([np.zeros(c, np.int16), flat[y, :-c]])
        else:
            enc = flat[y] - (flat[y - 1] if y else 0)
        rows.append(bytes([f]) + (enc % 256).astype(np.uint8).tobytes())
    ihdr = struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra
            + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3])
def test_plain_png_reader_matches_pil(channels):
    rng = np.random.default_rng(channels)
    a = rng.integers(0, 256, (28, 28, channels), dtype=np.uint8)
    filters = [int(f) for f in rng.integers(0, 3, 28)]
    text = _chunk(b"tEXt", b"Comment\x00hello")
    for data in (_png(a, filters), _png(a, filters, extra=text), png_bytes(a)):
        got = simple_png_pixels(data, channels, (28, 28))
        assert got is not None
        pil = np.asarray(Image.open(io.BytesIO(data)))
        assert np.array_equal(got, pil.reshape(got.shape)) and np.array_equal(got, a)
    # whatever PIL itself writes: read the same, or left to PIL
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if channels == 1 else a).save(buf, format="PNG")
    got = simple_png_pixels(buf.getvalue(), channels, (28, 28))
    assert got is None or np.array_equal(got, a)


def test_plain_png_reader_leaves_the_rest_to_pil():
    a = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    good = _png(a, [0] * 28)
    assert simple_png_pixels(good, 1, (28, 28)) is not None
    others = {
        "other size": simple_png_pixels(good, 1, (28, 27)),
        "other channels": simple_png_pixels(good, 3, (28, 28)),
        "transparency": simple_png_pixels(_png(a, [0] * 28, _chunk(b"tRNS", b"\x00\x00")),
                                          1, (28, 28)),
        "exif": simple_png_pixels(_png(a, [0] * 28, _chunk(b"eXIf", b"MM\x00*")), 1, (28, 28)),
        "animation": simple_png_pixels(_png(a, [0] * 28, _chunk(b"acTL", bytes(8))), 1, (28, 28)),
        "paeth row": simple_png_pixels(_paeth(a), 1, (28, 28)),
        "bad crc": simple_png_pixels(good[:-5] + bytes([good[-5] ^ 1]) + good[-4:], 1, (28, 28)),
        "truncated": simple_png_pixels(good[:-20], 1, (28, 28)),
        "not png": simple_png_pixels(b"GIF89a" + bytes(64), 1, (28, 28)),
    }
    assert all(v is None for v in others.values()), [k for k, v in others.items() if v is not None]
    Image.open(io.BytesIO(_paeth(a))).load()  # a valid PNG all the same


def _paeth(a: np.ndarray) -> bytes:
    """A valid PNG whose first row is declared Paeth-filtered."""
    data = bytearray(_png(a, [0] * 28))
    start = data.index(b"IDAT") + 4
    n = int.from_bytes(data[start - 8:start - 4], "big")
    raw = bytearray(zlib.decompress(bytes(data[start:start + n])))
    raw[0] = 4
    body = zlib.compress(bytes(raw))
    return (bytes(data[:start - 8]) + _chunk(b"IDAT", body)
            + _chunk(b"IEND", b""))


def zeros_zlib(mib: int) -> bytes:
    """A valid zlib stream of `mib` MiB of zeros, built from one compressed MiB repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: blocks can be repeated
    block = bytes(1 << 20)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(mib):
        adler = zlib.adler32(block, adler)
    return b"\x78\xda" + first + again * (mib - 1) + c.flush() + struct.pack(">I", adler)


def test_the_plain_reader_never_inflates_past_the_header():
    bomb = zeros_zlib(256)  # 256 MiB of rows behind a 28x28 header
    assert len(bomb) < 300_000
    ihdr = struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", bomb)
            + _chunk(b"IEND", b""))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        assert simple_png_pixels(data, 1, (28, 28)) is None
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.05 and peak < 1 << 20, (elapsed, peak)
    # the same holds for any stream: exact size only, never more than one byte past it
    assert inflate_exactly(bomb, 100) is None
    assert inflate_exactly(zlib.compress(bytes(100)), 100) == bytes(100)
    assert inflate_exactly(zlib.compress(bytes(100)), 101) is None  # cut short
    # bytes after the stream's end are never inflated: ignored, as zlib and PIL do
    assert inflate_exactly(zlib.compress(bytes(100)) + bomb, 100) == bytes(100)


def test_bombs_are_refused_from_their_chunks_alone():
    a = np.zeros((28, 28, 1), dtype=np.uint8)
    assert refusal(png_bytes(a)) is None
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert refusal(png_bytes(noise, compress_level=0)) is None  # stored: larger than raw
    meta = (_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"x"))
            + _chunk(b"iCCP", b"p\x00\x00" + zlib.compress(b"y")) + _chunk(b"tEXt", b"k\x00v"))
    assert refusal(_png(a, [0] * 28, meta * (MAX_COMPRESSED_CHUNKS // 2))) is None
    assert "compressed metadata" in refusal(_png(a, [0] * 28, meta * MAX_COMPRESSED_CHUNKS))
    ihdr = struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0)
    bomb = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zeros_zlib(8))
            + _chunk(b"IEND", b""))
    assert "larger than its header" in refusal(bomb)
