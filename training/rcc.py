"""A reader of Qt's binary resource files (`.rcc`), enough to list and extract their files.

The layout (Qt's rcc, format versions 1 to 3): a 'qres' magic, then big-endian 32-bit version,
tree, data and names offsets (and, from version 3, a flags word). The tree is an array of
fixed-size nodes (14 bytes, 22 from version 2 with the modification time): name offset, flags
(1 zlib, 2 directory, 4 zstd), then a directory's child count and first child index, or a
file's locale and data offset. A name is a 16-bit length, a 32-bit hash and UTF-16BE text; a
file's data is a 32-bit size and its bytes (zlib: Qt's qCompress, a 32-bit expected size then
a zlib stream). Every offset and size is checked against the file, and decompression is
bounded, so a damaged or hostile file raises RccError instead of reading past its end.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

MAGIC = b"qres"
COMPRESSED_ZLIB, DIRECTORY, COMPRESSED_ZSTD = 1, 2, 4
MAX_FILE_BYTES = 64 << 20  # largest file we inflate
MAX_NODES = 1 << 20


class RccError(ValueError):
    """A file that is not a readable Qt resource file."""


class RccFile:
    """The files of one .rcc, by their path inside it ('images/cat.webp')."""

    def __init__(self, blob: bytes) -> None:
        if len(blob) < 20 or blob[:4] != MAGIC:
            raise RccError("not a Qt resource file (no 'qres' magic)")
        self.blob = blob
        self.version, self.tree, self.data, self.names = struct.unpack_from(">4I", blob, 4)
        if not 1 <= self.version <= 3:
            raise RccError(f"unsupported rcc format version {self.version}")
        self.node_size = 14 if self.version == 1 else 22
        for name, off in (("tree", self.tree), ("data", self.data), ("names", self.names)):
            if off >= len(blob):
                raise RccError(f"{name} offset {off} is past the end ({len(blob)} bytes)")

    @classmethod
    def open(cls, path: str | Path) -> RccFile:
        return cls(Path(path).read_bytes())

    def _unpack(self, fmt: str, offset: int) -> tuple:
        if offset < 0 or offset + struct.calcsize(fmt) > len(self.blob):
            raise RccError(f"truncated file: {struct.calcsize(fmt)} bytes wanted at {offset}")
        return struct.unpack_from(fmt, self.blob, offset)

    def _name(self, offset: int) -> str:
        (length,) = self._unpack(">H", self.names + offset)
        start = self.names + offset + 6
        if start + 2 * length > len(self.blob):
            raise RccError("a name runs past the end of the file")
        return self.blob[start: start + 2 * length].decode("utf-16-be")

    def _node(self, index: int) -> tuple[int, int, int, int]:
        """(name offset, flags, a: child count or locale, b: first child or data offset)."""
        if not 0 <= index < MAX_NODES:
            raise RccError(f"tree node {index} out of range")
        name, flags = self._unpack(">IH", self.tree + index * self.node_size)
        if flags & DIRECTORY:
            count, first = self._unpack(">II", self.tree + index * self.node_size + 6)
            return name, flags, count, first
        (data,) = self._unpack(">I", self.tree + index * self.node_size + 10)  # after the locale
        return name, flags, 0, data

    def entries(self) -> dict[str, tuple[int, int]]:
        """Every file's path -> (flags, data offset), walking the tree from its root."""
        out: dict[str, tuple[int, int]] = {}
        stack, seen = [(0, "")], set()
        while stack:
            index, prefix = stack.pop()
            if index in seen:
                raise RccError(f"tree node {index} is reached twice (a loop)")
            seen.add(index)
            name_off, flags, count, first = self._node(index)
            name = "" if index == 0 else self._name(name_off)
            path = f"{prefix}/{name}" if prefix else name
            if flags & DIRECTORY:
                if count > MAX_NODES or first + count > MAX_NODES:
                    raise RccError(f"directory {path!r} claims {count} children")
                stack.extend((first + i, path) for i in range(count))
            else:
                out[path] = (flags, first)
        return out

    def read(self, path: str) -> bytes:
        """A file's bytes, inflated when it is stored compressed."""
        entries = self.entries()
        if path not in entries:
            raise KeyError(path)
        flags, offset = entries[path]
        return self._payload(flags, offset)

    def _payload(self, flags: int, offset: int) -> bytes:
        (size,) = self._unpack(">I", self.data + offset)
        start = self.data + offset + 4
        if start + size > len(self.blob):
            raise RccError(f"data of {size} bytes runs past the end of the file")
        raw = self.blob[start: start + size]
        if flags & COMPRESSED_ZSTD:
            return _zstd(raw)
        if flags & COMPRESSED_ZLIB:
            if len(raw) < 4:
                raise RccError("zlib entry shorter than its size header")
            (expected,) = struct.unpack_from(">I", raw)
            if expected > MAX_FILE_BYTES:
                raise RccError(f"entry claims {expected} bytes, more than {MAX_FILE_BYTES}")
            d = zlib.decompressobj()
            try:
                out = d.decompress(raw[4:], MAX_FILE_BYTES + 1)
            except zlib.error as e:
                raise RccError(f"bad zlib data: {e}") from e
            if len(out) != expected:
                raise RccError(f"zlib entry inflated to {len(out)} bytes, {expected} expected")
            return out
        return raw

    def files(self) -> dict[str, bytes]:
        return {p: self._payload(f, o) for p, (f, o) in self.entries().items()}


def _zstd(raw: bytes) -> bytes:
    try:
        import zstandard
    except ImportError as e:  # no file in the packages we read uses it; say so if one does
        raise RccError("zstd-compressed entry: install the zstandard package") from e
    try:
        return zstandard.ZstdDecompressor().decompress(raw, max_output_size=MAX_FILE_BYTES)
    except zstandard.ZstdError as e:
        raise RccError(f"bad zstd data: {e}") from e
