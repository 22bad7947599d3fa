"""The HTTP contract without I/O: the generate parameters and request bodies, error and retry
handling (its timing included), Server-Sent Events.

Both clients (blocking and asyncio) share these pieces and differ only in how they send and
wait, so the two cannot drift apart.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from email.utils import parsedate_to_datetime
from typing import Any, Union

import httpx
import numpy as np
from PIL import Image

from .types import Generation, RowEvent, TamingError

JSON = "application/json"
EVENT_STREAM = "text/event-stream"
# a stream where the server can stream the request, else its JSON answer in the same request
STREAM_ACCEPT = f"{EVENT_STREAM}, {JSON};q=0.9"

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]


def _plain(value: Any) -> Any:
    """numpy scalars and arrays -> JSON-ready Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class GenerateParams:
    """The parameters of POST /generate, defined once for both clients and the CLI; those
    left at None are left to the server (the model's defaults)."""

    model: str | None = None
    n: int = 1
    label: int | str | None = None  # a class index or name
    seed: int | None = None  # image i uses seed + i
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None  # classifier-free guidance (1 = off)
    grid: Sequence[int] | None = None  # (rows, cols), the model's grid or wider
    prefix: Any = None  # token ids the images start with (flat, or rows)

    def body(self) -> dict[str, Any]:
        """The JSON body of POST /generate."""
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self)
               if getattr(self, f.name) is not None}
        if out.get("n") == 1:
            del out["n"]
        return out


def takes_generate_params(method: Callable) -> Callable:
    """`method(self, params)` made callable as `method(self, model=..., n=..., ...)` (the
    fields of GenerateParams, as keywords) or `method(self, GenerateParams(...))`; works for
    plain, async and generator methods alike, and `help()` shows the fields."""

    @functools.wraps(method)
    def call(self, params: GenerateParams | None = None, /, **kw: Any):
        if params is not None and kw:
            raise TypeError("give a GenerateParams or keywords, not both")
        return method(self, params if params is not None else GenerateParams(**kw))

    sig = inspect.signature(method)
    own = list(sig.parameters.values())[0].replace(kind=inspect.Parameter.POSITIONAL_ONLY)
    given = inspect.Parameter("params", inspect.Parameter.POSITIONAL_ONLY, default=None,
                              annotation="GenerateParams | None")
    call.__signature__ = sig.replace(parameters=[own, given, *(
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                          annotation=f.type) for f in fields(GenerateParams))])
    return call


def generate_body(*args: Any, **kw: Any) -> dict[str, Any]:
    """The JSON body of POST /generate for GenerateParams(*args, **kw)."""
    return GenerateParams(*args, **kw).body()


def grids_body(grids: Any, model: str | None) -> dict[str, Any]:
    """The JSON body of POST /decode: one (rows, cols) grid or several of one shape."""
    body: dict[str, Any] = {"tokens": _plain(grids)}
    if model is not None:
        body["model"] = model
    return body


def image_list(images: Any) -> list[ImageInput]:
    """One image or a sequence of them -> a list. A bare array of 4 dimensions is a batch
    (N, H, W, C); of 2 or 3 it is one image (H, W) or (H, W, C)."""
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return [images]
    return list(images)


def image_bytes(item: ImageInput) -> bytes:
    """A path, encoded image bytes, a PIL image or a pixel array -> bytes the server reads
    (PNG, JPEG or WebP). Float arrays are taken as values in [0, 1]."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        with open(item, "rb") as f:
            return f.read()
    if isinstance(item, np.ndarray):
        a = item
        if a.dtype.kind == "f":
            a = np.clip(a * 255.0 + 0.5, 0, 255)
        a = a.astype(np.uint8)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        item = Image.fromarray(a)
    if isinstance(item, Image.Image):
        buf = io.BytesIO()
        item.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"cannot send {type(item).__name__} as an image: give a path, bytes, "
                    "a PIL image or a numpy array")


def encode_files(images: Any) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart fields of POST /encode (the server reads the format from the bytes)."""
    blobs = [image_bytes(im) for im in image_list(images)]
    if not blobs:
        raise ValueError("encode() needs at least one image")
    return [("files", (f"image{i}", b, "application/octet-stream")) for i, b in enumerate(blobs)]


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def error_of(response: httpx.Response) -> TamingError:
    """An error answer (read already) -> TamingError with the server's code and message."""
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code = "http_error"
        message = response.text.strip()[:200] or response.reason_phrase or "error"
    return TamingError(response.status_code, code, message, retry_after(response))


def unreachable(url: httpx.URL | str, exc: Exception) -> TamingError:
    if isinstance(exc, httpx.TimeoutException):
        return TamingError(None, "timeout", f"no answer from {url} in time ({exc!r})")
    return TamingError(None, "unreachable", f"cannot reach {url}: {exc}")


@contextmanager
def transport_errors(url: httpx.URL | str) -> Iterator[None]:
    """A connection that fails while a streamed answer is read -> TamingError."""
    try:
        yield
    except httpx.TransportError as e:
        raise unreachable(url, e) from e


@dataclass
class RetryBudget:
    """The retry timing of one call: a 503 is retried after its Retry-After (1 s when absent,
    at least 0.1 s) while the total time since the first attempt, the wait included, stays
    within `seconds`. Both clients send, then ask `wait_or_raise`, then sleep their way."""

    seconds: float
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.monotonic()

    def wait_before_retry(self, response: httpx.Response) -> float | None:
        """How long to wait before sending again, or None to give up and raise."""
        if response.status_code != 503:
            return None
        wait = retry_after(response)
        wait = 1.0 if wait is None else max(0.1, wait)  # "0" must not become a busy loop
        if time.monotonic() - self.started + wait > self.seconds:
            return None
        return wait

    def wait_or_raise(self, response: httpx.Response) -> float:
        """For an error answer (read already): the wait before sending again, or the
        TamingError to raise."""
        wait = self.wait_before_retry(response)
        if wait is None:
            raise error_of(response)
        return wait


class SSEParser:
    """Server-Sent Events, line by line (the WHATWG parsing rules): `feed` returns
    (event, data) when a blank line ends an event."""

    def __init__(self) -> None:
        self.event = ""
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            if not self.data:
                self.event = ""
                return None
            out = (self.event or "message", "\n".join(self.data))
            self.event, self.data = "", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


def stream_item(event: str, data: str) -> RowEvent | Generation | None:
    """A parsed event of POST /generate's stream -> what the client yields; an `error` event
    raises. Unknown events (keep-alives, later additions) give None."""
    if event == "row":
        return RowEvent.from_json(json.loads(data))
    if event == "done":
        return Generation.from_json(json.loads(data))
    if event == "error":
        try:
            err = json.loads(data)["error"]
            code, message = str(err["code"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "stream_error", data or "the stream failed"
        raise TamingError(None, code, message)
    return None


class GenerationStream:
    """POST /generate's event stream, line by line: `items(line)` gives what the client
    yields for it (nothing, a RowEvent, or the final Generation, after which `done`)."""

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.done = False

    def items(self, line: str) -> list[RowEvent | Generation]:
        event = self.parser.feed(line)
        item = stream_item(*event) if event else None
        if item is None:
            return []
        self.done = isinstance(item, Generation)
        return [item]


def media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip().lower()


def ended_early() -> TamingError:
    return TamingError(None, "stream_ended", "the stream ended before its done event")
