"""The outermost ASGI layer: request id, body limit, request metrics and the JSON access log;
and the server's logging: one JSON line per request on stdout (logger `taming.access`, at
INFO, so TAMING_LOG_LEVEL=warning silences it), everything else as text on stderr.

Pure ASGI (no BaseHTTPMiddleware): each request pays little here. Handlers add
`model`, `batch_size`, `queue_ms` and `compute_ms` to `scope["taming.log"]` for the log line.

A body over the limit is answered 413 after the rest of it is read and dropped, up to
LINGER_BYTES and LINGER_S (a lingering close): a client that writes its whole body before
reading, as urllib, requests and httpx do, then reads the 413 instead of a reset connection.
A client that sent `Expect: 100-continue` gets the 413 without being asked for the body.

The whole body must arrive within TAMING_BODY_TIMEOUT_S of the request's header, else the
client gets 408 and the connection closes (the header has its own deadline, in
service.server): a client sending a byte a second held its connection, and its place among
the requests in flight, for as long as it liked. Content-Length is parsed strictly
(service.lengths) and must be sent once.

A client that leaves before its answer is complete is logged and counted as 499, whatever
its handler answered: a stream it stopped reading, a request it abandoned while queued.
Every error answered here has the shape of the request's protocol (service.errors.error_for).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import secrets
import sys
import time

from .engine.batches import Arrivals
from .errors import error_for
from .lengths import parse_length
from .metrics import Metrics

log = logging.getLogger("taming.http")

ACCESS = logging.getLogger("taming.access")  # one JSON line per request, on stdout


def configure_logging(level: str = "info") -> None:
    """Idempotent: attach our handlers once per process."""
    root = logging.getLogger("taming")
    root.setLevel(level.upper())
    if getattr(root, "_taming_configured", False):
        return
    text = logging.StreamHandler(sys.stderr)
    text.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    root.addHandler(text)
    access = logging.StreamHandler(sys.stdout)
    access.setFormatter(logging.Formatter("%(message)s"))
    ACCESS.addHandler(access)
    ACCESS.propagate = False
    root._taming_configured = True


def access(record: dict) -> None:
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info(json.dumps(record, separators=(",", ":")))

LOG_KEY = "taming.log"
INFERENCE = frozenset({"/generate", "/encode", "/decode", "/v1/images/generations",
                       "/v1/images/variations", "/v2/models/{name}/infer"})
ENDPOINTS = INFERENCE | {"/models", "/healthz", "/readyz", "/metrics", "/docs",
                         "/openapi.json", "/docs/oauth2-redirect", "/v1/models", "/v2",
                         "/v2/health/live", "/v2/health/ready"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# generated ids: a random per-process prefix and a counter (unique, and cheaper than uuid4)
_ID_PREFIX = secrets.token_hex(12)  # + 8 hex digits of counter: 32 characters, like a uuid
_ids = itertools.count()
LINGER_BYTES = 64 * 1024 * 1024  # most of a too-large body read (and dropped) before the 413
LINGER_S = 10.0  # most time spent reading it
_timeout_at = getattr(asyncio, "timeout_at", None)  # Python 3.11+


def endpoint_of(path: str) -> str:
    """A bounded label: the route template, or "other" for unknown paths."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/models/") and path.count("/") == 2:
        return "/models/{name}"
    if path.startswith("/v1/models/") and path.count("/") == 3:
        return "/v1/models/{model}"
    if path.startswith("/v2/models/"):  # the protocol's model routes: /v2/models/{name}[/x]
        tail = path.count("/")
        if tail == 3:
            return "/v2/models/{name}"
        if tail == 4 and path.rsplit("/", 1)[1] in ("infer", "ready", "config"):
            return "/v2/models/{name}/" + path.rsplit("/", 1)[1]
    if path.startswith("/docs/assets/"):
        return "/docs/assets"
    return "other"


CLIENT_GONE = 499


class RequestMiddleware:
    def __init__(self, app, metrics: Metrics, max_body_bytes: int, arrivals: Arrivals,
                 body_timeout_s: float = 20.0) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.arrivals = arrivals
        self.body_timeout = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        rid = None
        lengths: list[bytes] = []
        expects_continue = False
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = v.decode("latin-1")
            elif k == b"content-length":
                lengths.append(v)
            elif k == b"expect":
                expects_continue = v.lower() == b"100-continue"
        if rid is None or not _REQUEST_ID.fullmatch(rid):
            rid = f"{_ID_PREFIX}{next(_ids):08x}"
        # arrival: when the header was complete; deadlines run from here, the body's included
        ctx = {"model": "", "t0": t0, "arrival": loop.time()}
        scope[LOG_KEY] = ctx
        endpoint = endpoint_of(scope["path"])
        # complete: the answer's last byte was handed to the server; gone: the client left
        # before that (a disconnect read while the answer was incomplete)
        state = {"status": CLIENT_GONE, "started": False, "complete": False, "gone": False}
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                message["headers"] = [*message.get("headers", ()), rid_header]
            elif not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        async def receive_watched():
            message = await inner()
            if message["type"] == "http.disconnect" and not state["complete"]:
                state["gone"] = True
            return message

        inner = receive

        inference = endpoint in INFERENCE
        if inference:
            self.metrics.in_flight.inc()
            self.arrivals.arrive(ctx)  # until the handler queues it (state.Service.run)
        try:
            length = parse_length(lengths[0]) if len(lengths) == 1 else None
            if lengths and length is None:
                await self._error(scope, receive, send_with_id, 400, "bad_request", (
                    "Content-Length must be sent once, as ASCII digits"), {"Connection": "close"})
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                if length is not None and length > self.max_body:
                    # no lingering when the client waits for 100 Continue or sends too much
                    linger = not expects_continue and length <= LINGER_BYTES
                    await self._too_big(scope, receive, send_with_id, linger)
                    return
                try:
                    body = await self._read_body_in_time(receive, ctx["arrival"])
                except asyncio.TimeoutError:
                    await self._error(scope, receive, send_with_id, 408, "request_timeout", (
                        f"the request body was not complete within {self.body_timeout:g} s "
                        "of its header"), {"Connection": "close"})
                    return
                if body is None:  # over the limit while streaming
                    await self._too_big(scope, receive, send_with_id, True)
                    return
                if body is False:  # the client went away mid-body
                    return
                inner = _replay(body, receive)
            await self.app(scope, receive_watched, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not state["started"]:
                await self._error(scope, receive, send_with_id, 500, "internal_error",
                                  "internal server error")
            else:
                state["status"] = 500
        finally:
            if inference:
                self.metrics.in_flight.dec()
                self.arrivals.settle(ctx)
            elapsed = time.perf_counter() - t0
            model, status = ctx["model"], state["status"]
            if status != 500 and (state["gone"] or (state["started"] and not state["complete"])):
                status = CLIENT_GONE  # it left first: whatever was (being) answered, unread
            self.metrics.requests.labels(endpoint, model, str(status)).inc()
            self.metrics.request_duration.labels(endpoint, model).observe(elapsed)
            record = {"ts": round(time.time(), 3), "request_id": rid, "method": scope["method"],
                      "endpoint": endpoint, "path": scope["path"], "model": model,
                      "status": status, "duration_ms": round(elapsed * 1000, 2)}
            for k in ("batch_size", "queue_ms", "compute_ms", "images", "error"):
                if k in ctx:
                    record[k] = ctx[k]
            access(record)

    @staticmethod
    async def _error(scope, receive, send, status: int, code: str, message: str,
                     headers: dict | None = None) -> None:
        """An error answer in the shape of the request's protocol."""
        await error_for(scope["path"])(status, code, message, None, headers)(
            scope, receive, send)

    async def _too_big(self, scope, receive, send, linger: bool) -> None:
        """413; the connection stays open only when the whole body was read and dropped."""
        drained = linger and await _drop_body(receive)
        await self._error(scope, receive, send, 413, "payload_too_large",
                          f"request body exceeds the limit of {self.max_body} bytes",
                          None if drained else {"Connection": "close"})

    async def _read_body_in_time(self, receive, arrival: float) -> bytes | None | bool:
        """The body, read by TAMING_BODY_TIMEOUT_S after `arrival` (loop.time()), else
        asyncio.TimeoutError."""
        deadline = arrival + self.body_timeout
        if _timeout_at is not None:  # Python 3.11+: a timer, no task
            async with _timeout_at(deadline):
                return await self._read_body(receive)
        left = deadline - asyncio.get_running_loop().time()
        return await asyncio.wait_for(self._read_body(receive), max(0.0, left))

    async def _read_body(self, receive) -> bytes | None | bool:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _drop_body(receive) -> bool:
    """Read and drop the rest of the body; True when it ended within the linger bounds."""

    async def drop() -> bool:
        size = 0
        while size <= LINGER_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False

    try:
        return await asyncio.wait_for(drop(), LINGER_S)
    except asyncio.TimeoutError:
        return False


def _replay(body: bytes, receive):
    """A receive() that hands the buffered body over once, then defers to the server's."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
