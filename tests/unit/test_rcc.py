"""The Qt resource (.rcc) reader: a tiny file built here in Qt's layout, read back byte for
byte (stored and zlib-compressed entries, nested folders, format versions 1 and 3), and
damaged files refused with RccError instead of being read past their end."""

from __future__ import annotations

import struct
import zlib

import pytest

from training.rcc import COMPRESSED_ZLIB, DIRECTORY, RccError, RccFile


def _qt_hash(name: str) -> int:  # qt_hash, as rcc writes it beside each name
    h = 0
    for ch in name:
        h = ((h << 4) + ord(ch)) & 0xFFFFFFFF
        h ^= (h & 0xF0000000) >> 23
        h &= 0x0FFFFFFF
    return h


def build_rcc(tree: dict, version: int = 3, compress: set[str] = frozenset()) -> bytes:
    """An .rcc holding `tree` ({name: bytes or sub-tree}); names in `compress` go through
    zlib as qCompress does (a 32-bit size, then the stream). Nodes are laid out breadth
    first, children of a folder consecutive, as Qt's rcc does."""
    names, data = bytearray(), bytearray()
    name_off: dict[str, int] = {}

    def name(n: str) -> int:
        if n not in name_off:
            name_off[n] = len(names)
            names.extend(struct.pack(">HI", len(n), _qt_hash(n)) + n.encode("utf-16-be"))
        return name_off[n]

    nodes: list[tuple] = [("", tree)]
    order, i = [], 0
    while i < len(nodes):
        n, v = nodes[i]
        order.append((n, v))
        if isinstance(v, dict):
            nodes.extend(sorted(v.items()))
        i += 1
    node_size = 14 if version == 1 else 22
    out_nodes, next_child = bytearray(), 1
    for n, v in order:
        if isinstance(v, dict):
            rec = struct.pack(">IHII", name(n) if n else 0, DIRECTORY, len(v), next_child)
            next_child += len(v)
        else:
            payload, flags = v, 0
            if n in compress:
                payload, flags = struct.pack(">I", len(v)) + zlib.compress(v), COMPRESSED_ZLIB
            rec = struct.pack(">IHHHI", name(n), flags, 0, 0, len(data))
            data.extend(struct.pack(">I", len(payload)) + payload)
        out_nodes.extend(rec + (b"\0" * 8 if version >= 2 else b""))
        assert len(rec) == 14 and len(out_nodes) % node_size == 0
    header = 20 + (4 if version >= 3 else 0)
    tree_off = header
    data_off = tree_off + len(out_nodes)
    names_off = data_off + len(data)
    head = b"qres" + struct.pack(">IIII", version, tree_off, data_off, names_off)
    if version >= 3:
        head += struct.pack(">I", 0)
    return head + bytes(out_nodes) + bytes(data) + bytes(names)


TREE = {"images": {"sea.webp": b"RIFF-not-really-webp" * 50, "README": b"License: CC0-1.0\n"},
        "top.txt": b"hello", "empty": {}}


@pytest.mark.parametrize("version", [1, 3])
def test_reads_back_every_file(version):
    blob = build_rcc(TREE, version=version, compress={"sea.webp"})
    rcc = RccFile(blob)
    assert rcc.version == version
    files = rcc.files()
    assert files == {"images/sea.webp": TREE["images"]["sea.webp"],
                     "images/README": TREE["images"]["README"], "top.txt": b"hello"}
    flags, _ = rcc.entries()["images/sea.webp"]
    assert flags & COMPRESSED_ZLIB  # it really went through the zlib path
    assert rcc.read("top.txt") == b"hello"
    with pytest.raises(KeyError):
        rcc.read("images/missing.webp")


def test_open_reads_a_file(tmp_path):
    path = tmp_path / "tiny.rcc"
    path.write_bytes(build_rcc(TREE))
    assert RccFile.open(path).read("images/README") == b"License: CC0-1.0\n"


def test_refuses_damaged_files():
    good = build_rcc(TREE, compress={"sea.webp"})
    with pytest.raises(RccError, match="magic"):
        RccFile(b"PK\3\4" + good[4:])
    with pytest.raises(RccError, match="version"):
        RccFile(good[:4] + struct.pack(">I", 9) + good[8:])
    with pytest.raises(RccError):  # cut short: the names run past the end
        RccFile(good[: len(good) - 10]).files()
    # a zlib entry claiming more than it inflates to
    rcc = RccFile(good)
    _, off = rcc.entries()["images/sea.webp"]
    at = rcc.data + off + 4
    lying = bytearray(good)
    lying[at: at + 4] = struct.pack(">I", 12345)
    with pytest.raises(RccError, match="expected"):
        RccFile(bytes(lying)).read("images/sea.webp")
    # a zlib entry claiming a huge size is refused before inflating
    lying[at: at + 4] = struct.pack(">I", 1 << 31)
    with pytest.raises(RccError, match="more than"):
        RccFile(bytes(lying)).read("images/sea.webp")


def test_refuses_a_tree_that_loops():
    blob = bytearray(build_rcc({"a": {"b": b"x"}}))
    rcc = RccFile(bytes(blob))
    # point folder "a" (node 1) back at the root as its child
    at = rcc.tree + 1 * rcc.node_size + 10
    blob[at: at + 4] = struct.pack(">I", 0)
    with pytest.raises(RccError, match="twice"):
        RccFile(bytes(blob)).entries()
