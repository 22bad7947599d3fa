"""Hostile requests against a real server process (`python -m service`, uvicorn, the shipped
mnist checkpoint): decompression bombs, bodies over the size limit, connections that never
finish their request header or their body, and bytes uvicorn's parser refuses."""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from service_helpers import REAL, ROOT, assert_error, free_port, png_of, stop, wait_ready

from service.png import png_bytes

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 2.0  # the server's TAMING_HEADER_TIMEOUT_S (default 10)
# the server's TAMING_BODY_TIMEOUT_S (default 20): past the time the header test below keeps
# a body on its way (the half-open connections closing, a few seconds)
BODY_TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    """(base URL, pid) of `python -m service` serving mnist from the shipped checkpoints."""
    port = free_port()
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(port), PYTHONPATH=str(ROOT),
               TAMING_CHECKPOINT_DIR=str(REAL), TAMING_MODELS="mnist", TAMING_TORCH_THREADS="1",
               TAMING_LOG_LEVEL="warning", TAMING_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
               TAMING_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S))
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc)
            yield base, proc.pid
        finally:
            stop(proc)


def _peak_rss_mb(pid: int) -> float:
    """The process's high-water resident memory (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# ---- decompression bombs ---------------------------------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _zeros_zlib(mib: int) -> bytes:
    """A valid zlib stream of `mib` MiB of zeros (about 1 KB per MiB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: blocks can be repeated
    block = bytes(1 << 20)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(mib):
        adler = zlib.adler32(block, adler)
    return b"\x78\xda" + first + again * (mib - 1) + c.flush() + struct.pack(">I", adler)


def _png(size: int, idat: bytes | None = None, meta: bytes = b"") -> bytes:
    """A grey PNG of size x size (black unless `idat` says otherwise), `meta` before IDAT."""
    if idat is None:
        idat = zlib.compress(bytes(size * (size + 1)))
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + meta + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """Each fits the 10 MiB body limit and inflates to gigabytes with no bound in place.

    28x28 is the model's size (the plain-PNG path); 30x30 goes through PIL.
    """
    gib = _zeros_zlib(1024)  # 1 GiB of zeros in about 1 MB
    mib = _zeros_zlib(1)
    out = {}
    for size in (28, 30):
        out[f"IDAT {size}"] = _png(size, idat=gib)
        out[f"zTXt {size}"] = _png(size, meta=_chunk(b"zTXt", b"Comment\x00\x00" + gib))
        out[f"iTXt {size}"] = _png(size, meta=_chunk(b"iTXt", b"Comment\x00\x01\x00\x00\x00" + gib))
        out[f"iCCP {size}"] = _png(size, meta=_chunk(b"iCCP", b"icc\x00\x00" + gib))
        # many 1 MiB chunks: each under PIL's per-chunk limit, together gigabytes
        out[f"zTXt x3000 {size}"] = _png(size, meta=b"".join(
            _chunk(b"zTXt", b"k%d\x00\x00" % i + mib) for i in range(3000)))
        out[f"iCCP x3000 {size}"] = _png(size, meta=_chunk(b"iCCP", b"icc\x00\x00" + mib) * 3000)
    assert all(len(b) < 10 * 2**20 for b in out.values())
    return out


def test_decompression_bombs_are_refused_at_once_while_healthz_answers(server, bombs):
    base, pid = server
    with httpx.Client(base_url=base, timeout=30) as client:
        for size in (28, 30):  # both paths run once before the high-water mark is read
            ok = client.post("/encode", content=png_of(np.zeros((size, size), np.uint8)),
                             headers={"Content-Type": "image/png"})
            assert ok.status_code == 200, ok.text
        before = _peak_rss_mb(pid)
        health: list[float] = []
        done = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                while not done.is_set():
                    t0 = time.perf_counter()
                    assert c.get("/healthz").status_code == 200
                    health.append(time.perf_counter() - t0)
                    time.sleep(0.01)

        prober = threading.Thread(target=probe)
        prober.start()
        took = {}
        try:
            for name, body in bombs.items():
                t0 = time.perf_counter()
                r = client.post("/encode", content=body, headers={"Content-Type": "image/png"})
                took[name] = time.perf_counter() - t0
                message = assert_error(r, 422, "invalid_image")["message"]
                assert any(w in message for w in ("header", "metadata")), (name, message)
        finally:
            done.set()
            prober.join()
    grew = _peak_rss_mb(pid) - before
    assert max(took.values()) < 0.5, took
    assert grew < 50, f"peak resident memory grew by {grew:.0f} MB"
    assert health and max(health) < 0.5, max(health)


def test_a_bomb_among_good_images_names_it(server, bombs):
    good = png_bytes(np.zeros((28, 28, 1), np.uint8))
    files = [("files", ("a.png", good, "image/png")),
             ("files", ("b.png", bombs["iCCP x3000 28"], "image/png"))]
    r = httpx.post(f"{server[0]}/encode", files=files, timeout=30)
    assert assert_error(r, 422, "invalid_image")["message"].startswith("image 1:")


# ---- bodies over the limit -------------------------------------------------------------------
BIG = 30 * 2**20  # three times the default 10 MiB limit


def _big_json() -> bytes:
    return b'{"tokens": [' + b"0," * (BIG // 2) + b"0]}"


def test_urllib_reads_the_413_after_sending_30_mb(server):
    req = urllib.request.Request(f"{server[0]}/decode", data=_big_json(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:  # urllib also asks for Connection: close
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 413
    assert json.loads(err.value.read())["error"]["code"] == "payload_too_large"


def test_httpx_reads_the_413_and_keeps_its_connection(server):
    with httpx.Client(base_url=server[0], timeout=30) as client:
        r = client.post("/decode", content=_big_json(),
                        headers={"Content-Type": "application/json"})
        assert_error(r, 413, "payload_too_large")
        assert r.headers.get("connection") != "close"  # the whole body was read: reusable
        # chunked, with no Content-Length: over the limit while streaming
        r = client.post("/decode", content=iter([b"0" * 2**20] * 30),
                        headers={"Content-Type": "application/json"})
        assert_error(r, 413, "payload_too_large")
        assert client.get("/healthz").status_code == 200


def test_expect_100_continue_gets_the_413_without_sending_the_body(server):
    port = int(server[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /decode HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue\r\n" + f"Content-Length: {BIG}\r\n\r\n".encode())
        answer = b""
        while b"}" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head  # no "100 Continue" first
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "payload_too_large"


# ---- the door: request headers that never complete ---------------------------------------------
HALF_OPEN = 300


def _answer(s: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (perf_counter)."""
    s.settimeout(limit_s)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return data, time.perf_counter()
        data += chunk


def test_half_sent_headers_get_408_and_close_while_requests_in_flight_and_healthz_carry_on(
        server):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"n": 4, "seed": 1}).encode()
    with httpx.Client(base_url=base, timeout=30) as client:
        # a request whose header is complete, with its body still on its way past the
        # deadline: the door is for headers only
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nAccept: application/json\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:3])
        opened = time.perf_counter()
        half = []
        for i in range(HALF_OPEN):
            s = socket.create_connection(("127.0.0.1", port))
            if i % 3:  # two in three send half a header, the rest nothing at all
                s.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Le")
            half.append(s)
        silent_keepalive = client.get("/healthz")  # a keep-alive connection, reused below
        assert silent_keepalive.status_code == 200
        health: list[float] = []
        answers: dict[int, bytes] = {}
        closed: dict[int, float] = {}
        with selectors.DefaultSelector() as sel:
            for i, s in enumerate(half):
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, i)
            while len(closed) < HALF_OPEN and time.perf_counter() - opened < HEADER_TIMEOUT_S + 10:
                t0 = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                health.append(time.perf_counter() - t0)
                for key, _ in sel.select(timeout=0.05):
                    chunk = key.fileobj.recv(4096)
                    answers[key.data] = answers.get(key.data, b"") + chunk
                    if not chunk:
                        closed[key.data] = time.perf_counter() - opened
                        sel.unregister(key.fileobj)
        for s in half:
            s.close()
        slow.sendall(body[3:])  # the in-flight request carries on past the deadline
        answer, _ = _answer(slow, 30)
        slow.close()
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert len(json.loads(rest)["images"]) == 4
        assert len(closed) == HALF_OPEN
        for i in range(HALF_OPEN):
            if i % 3:
                head, _, rest = answers[i].partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 408 "), answers[i]
                assert json.loads(rest)["error"]["code"] == "request_timeout"
            else:
                assert answers[i] == b"", answers[i]
        # closed at the deadline, not before it and not long after it
        assert min(closed.values()) >= HEADER_TIMEOUT_S - 0.1, min(closed.values())
        assert max(closed.values()) < HEADER_TIMEOUT_S + 5, max(closed.values())
        assert max(health) < 0.5, max(health)
        assert client.get("/healthz").status_code == 200


def test_a_late_header_on_a_kept_alive_connection_gets_408(server):
    port = int(server[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        first = b""
        while b"ok" not in first:
            first += s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200 ")
        t0 = time.perf_counter()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # the next request, never finished
        data, at = _answer(s, 30)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert HEADER_TIMEOUT_S - 0.1 <= at - t0 < HEADER_TIMEOUT_S + 5


# ---- bodies that never finish -----------------------------------------------------------------
SLOW_BODIES = 100


def test_slow_bodies_get_408_and_close_at_the_body_timeout_while_requests_and_healthz_carry_on(
        server):
    """A complete header with Content-Length: 100000, then a byte now and then: no answer and
    no close, ever (300 such held 300 requests in flight). Now each gets 408 and its
    connection closes at TAMING_BODY_TIMEOUT_S, while a request in flight gets its 200 and a
    kept-alive client's /healthz answers throughout."""
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    slow = []
    for i in range(SLOW_BODIES):
        s = socket.create_connection(("127.0.0.1", port))
        path = "/generate" if i % 2 else "/v2/models/mnist-decode/infer"
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  "Content-Length: 100000\r\n\r\n{".encode())
        s.setblocking(False)
        slow.append(s)
    opened = time.perf_counter()
    answers: dict[int, bytes] = {}
    closed: dict[int, float] = {}
    health: list[float] = []
    with httpx.Client(base_url=base, timeout=30) as client, \
            selectors.DefaultSelector() as sel:
        for i, s in enumerate(slow):
            sel.register(s, selectors.EVENT_READ, i)
        inflight = None
        last_byte = time.perf_counter()
        while len(closed) < SLOW_BODIES and time.perf_counter() - opened < BODY_TIMEOUT_S + 10:
            if inflight is None and time.perf_counter() - opened > BODY_TIMEOUT_S / 2:
                # sent while the slow ones hold their connections, answered before they end
                inflight = client.post("/generate", json={"n": 2, "seed": 1},
                                       headers={"Accept": "application/json"})
            if time.perf_counter() - last_byte > 1.0:  # a byte a second on each
                last_byte = time.perf_counter()
                for i, s in enumerate(slow):
                    if i not in closed:
                        try:
                            s.send(b" ")
                        except OSError:
                            pass
            t0 = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            health.append(time.perf_counter() - t0)
            for key, _ in sel.select(timeout=0.05):
                try:
                    chunk = key.fileobj.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                answers[key.data] = answers.get(key.data, b"") + chunk
                if not chunk:
                    closed[key.data] = time.perf_counter() - opened
                    sel.unregister(key.fileobj)
        metrics = client.get("/metrics").text
    for s in slow:
        s.close()
    assert inflight is not None and inflight.status_code == 200, inflight
    assert len(inflight.json()["images"]) == 2
    assert len(closed) == SLOW_BODIES
    for i in range(SLOW_BODIES):
        head, _, rest = answers[i].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answers[i]
        assert b"connection: close" in head.lower()
        error = json.loads(rest)["error"]
        if i % 2:
            assert error["code"] == "request_timeout" and "body" in error["message"]
        else:  # /v2: the Open Inference Protocol's shape
            assert isinstance(error, str) and "body" in error
    assert min(closed.values()) >= BODY_TIMEOUT_S - 0.5, min(closed.values())
    assert max(closed.values()) < BODY_TIMEOUT_S + 5, max(closed.values())
    assert max(health) < 0.5, max(health)
    assert "taming_in_flight_requests 0.0" in metrics


# ---- bytes the HTTP parser refuses ---------------------------------------------------------------
def _raw(port: int, data: bytes) -> tuple[bytes, dict | str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        answer, _ = _answer(s, 10)
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)["error"]


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost t\r\n\r\n",  # a header without a colon
    b"GET /healthz HTTP/1.1\r\nHost: t\r\nX\x01Y: z\r\n\r\n",  # a control byte in a name
    b"POST /decode HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /decode HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /decode HTTP/1.1\r\nHost: t\r\nContent-Length: \xb2\r\n\r\n{}",
    b"POST /decode HTTP/1.1\r\nHost: t\r\nContent-Length: " + b"1" * 4301 + b"\r\n\r\n{}",
], ids=["no colon", "control byte", "two lengths", "a length twice", "superscript length",
        "4301-digit length"])
def test_what_the_parser_refuses_is_a_json_400_and_a_close(server, request_bytes):
    head, error = _raw(int(server[0].rsplit(":", 1)[1]), request_bytes)
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"content-type: application/json" in head.lower()
    assert b"connection: close" in head.lower()
    assert error["code"] == "bad_request" and error["message"], error


def test_a_malformed_request_to_v2_is_answered_in_the_v2_shape(server):
    head, error = _raw(int(server[0].rsplit(":", 1)[1]),
                       b"POST /v2/models/mnist-decode/infer HTTP/1.1\r\nHost t\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert isinstance(error, str) and "HTTP" in error, error
