"""The HTTP server: uvicorn, with a drain step on SIGTERM and a deadline on request headers.

uvicorn times out a keep-alive connection only between requests, and only until its next
byte: a client that sends half a request header and then nothing holds its connection (and
a file descriptor) forever; uvicorn has no setting for it (its issue #157, "timeout-request-
start", is open). `HeaderDeadline` is uvicorn's own httptools protocol with that timer: from
the moment a connection opens, or the first byte of its next request, the header must be
complete within TAMING_HEADER_TIMEOUT_S, else the client gets 408 and the connection closes
(a connection that sent nothing is just closed). Parsing stays uvicorn's: nothing here reads
a byte of HTTP. What its parser refuses is answered 400 in the JSON error shape (uvicorn's
own answer is plain text), from `send_400_response`, the method uvicorn calls for it.
The body's deadline (TAMING_BODY_TIMEOUT_S) is the request layer's (service.middleware).
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import error_for
from .settings import Settings

ACCEPTED_GRACE_S = 0.25


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request whose header does not arrive in time gets 408."""

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = False  # some of the awaited header has arrived

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self._waiting_for_request():
            self._arm()  # the first byte of a keep-alive connection's next request
        if self._header_timer is not None:
            self._header_bytes = True
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._header_bytes = False
        self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if not self._waiting_for_request():
            # a request of this connection is still being answered (the late header is a
            # pipelined next one): that answer is the connection's last
            self.cycle.keep_alive = False
            return
        if self._header_bytes:
            self._answer_and_close(b"408 Request Timeout", "request_timeout", (
                f"the request header was not complete within {self.header_timeout:g} s"))
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refuses (a malformed request line or header,
        a bad or repeated Content-Length): the JSON error shape, not plain text."""
        self._answer_and_close(b"400 Bad Request", "bad_request", (
            "the request is not valid HTTP/1.1 (a malformed request line or header, or a "
            "bad Content-Length)"))

    def _answer_and_close(self, status: bytes, code: str, message: str) -> None:
        """An error answer written here, below the app, in the shape of the path's protocol
        when the request line was read; then the connection closes."""
        path = _path_of(self.url) if getattr(self, "url", b"") else ""
        body = error_for(path)(int(status[:3]), code, message, None, None).body
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
            + body)
        self.transport.close()


def _path_of(url: bytes) -> str:
    """The path of a request target as far as it was read ("" when it cannot be told)."""
    try:
        return url.split(b"?", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        return ""


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain step on the first signal and exit code 0 after it."""

    def __init__(self, config: uvicorn.Config, on_drain, grace_s: float = 0.0) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self.grace_s = grace_s
        self._exit_at: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._exit_at is not None or self.should_exit:
            self.should_exit = self.force_exit = True  # second signal: stop now
            return
        self.on_drain()
        self._exit_at = time.monotonic() + self.grace_s
        if self.grace_s <= 0:
            self.should_exit = True
        # not recorded in _captured_signals: uvicorn would re-raise it and exit with 143

    async def shutdown(self, sockets=None) -> None:
        """Stop listening first, then give connections accepted a moment ago the time to
        deliver their request (it gets its answer: 503, draining) before uvicorn closes every
        connection without a request in progress; closing at once reset some of them under
        load (bench/overload.py)."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        await asyncio.sleep(ACCEPTED_GRACE_S)
        await super().shutdown(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)


def drain_timeout(settings: Settings) -> float:
    """Queued work cannot outlive its deadline: the grace period, one deadline, a margin."""
    return settings.shutdown_grace_s + settings.request_timeout_s + 5.0


def server_config(app, settings: Settings, **overrides) -> uvicorn.Config:
    """uvicorn's configuration for `app` under `settings` (tests override host and port)."""
    kw = dict(host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
              access_log=False, timeout_graceful_shutdown=drain_timeout(settings),
              lifespan="on",
              http=partial(HeaderDeadline, header_timeout=settings.header_timeout_s))
    return uvicorn.Config(app, **{**kw, **overrides})
