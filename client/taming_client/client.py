"""`TamingClient` (blocking) and `AsyncTamingClient` (asyncio): one method per endpoint."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, closing
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from PIL import Image

from . import protocol as p
from .types import Generation, ModelInfo, ModelList, RowEvent, open_png

DEFAULT_URL = "http://localhost:8000"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _tokens(body: dict[str, Any]) -> np.ndarray:
    return np.asarray(body["tokens"], dtype=np.int64).reshape(-1, *body["shape"])


def _images(body: dict[str, Any]) -> list[Image.Image]:
    return [open_png(base64.b64decode(im["png"])) for im in body["images"]]


class _Base:
    def __init__(self, http: type, base_url: str, api_key: str | None, timeout: float,
                 retry_budget: float, transport: Any) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.retry_budget = retry_budget
        self._http = http(base_url=self.base_url, timeout=timeout, headers=_headers(api_key),
                          transport=transport)


class TamingClient(_Base):
    """A blocking client. `TamingClient("http://host:8000", api_key="...")`; use it as a
    context manager or call `close()`.

    Every method raises `TamingError` for an error answer; a 503 (overloaded, draining) is
    sent again after its Retry-After while `retry_budget` seconds allow.
    """

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = 60.0, *, retry_budget: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(httpx.Client, base_url, api_key, timeout, retry_budget, transport)

    def __enter__(self) -> TamingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, stream: bool = False, **kw: Any) -> httpx.Response:
        budget = p.RetryBudget(self.retry_budget)
        while True:
            request = self._http.build_request(method, path, **kw)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                raise p.unreachable(request.url, e) from e
            if response.is_success:
                return response
            response.read()
            response.close()
            time.sleep(budget.wait_or_raise(response))

    @p.takes_generate_params
    def generate(self, params: p.GenerateParams) -> Generation:
        """Sample `n` images; the keywords are GenerateParams' fields (model, n, label, seed,
        temperature, top_k, top_p, cfg_scale, grid, prefix); those left at None take the
        model's defaults."""
        r = self._send("POST", "/generate", json=params.body(), headers={"Accept": p.JSON})
        return Generation.from_json(r.json())

    @p.takes_generate_params
    def stream(self, params: p.GenerateParams) -> Iterator[RowEvent | Generation]:
        """Like generate(), as it happens: a RowEvent each time a token row of an image is
        complete, then the Generation. Where the server does not stream a request (or at
        all), the Generation comes alone."""
        r = self._send("POST", "/generate", stream=True, json=params.body(),
                       headers={"Accept": p.STREAM_ACCEPT})
        with closing(r), p.transport_errors(r.url):
            if p.media_type(r) == p.EVENT_STREAM:
                events = p.GenerationStream()
                for line in r.iter_lines():
                    yield from events.items(line)
                    if events.done:
                        return
                raise p.ended_early()
            if p.media_type(r) == p.JSON:  # a request the server does not stream
                yield Generation.from_json(json.loads(r.read()))
                return
        # a server that streams nothing: its plain answer
        yield self.generate(params)

    def encode(self, images: Any, model: str | None = None) -> np.ndarray:
        """Images (paths, encoded bytes, PIL images or arrays; one or a list) -> their token
        grids, an int64 array (N, rows, cols)."""
        params = {"model": model} if model else None
        r = self._send("POST", "/encode", params=params, files=p.encode_files(images))
        return _tokens(r.json())

    def decode(self, grids: Any, model: str | None = None) -> list[Image.Image]:
        """One (rows, cols) token grid or several of one shape -> one PIL image per grid."""
        r = self._send("POST", "/decode", json=p.grids_body(grids, model),
                       headers={"Accept": p.JSON})
        return _images(r.json())

    def models(self) -> ModelList:
        """Every loaded model, and the server's default."""
        return ModelList.from_json(self._send("GET", "/models").json())

    def model(self, name: str) -> ModelInfo:
        return ModelInfo.from_json(self._send("GET", f"/models/{quote(name, safe='')}").json())


class AsyncTamingClient(_Base):
    """The asyncio twin of TamingClient: the same methods, awaitable; `stream()` is an async
    iterator (`async for event in client.stream(...)`)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = 60.0, *, retry_budget: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(httpx.AsyncClient, base_url, api_key, timeout, retry_budget, transport)

    async def __aenter__(self) -> AsyncTamingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, stream: bool = False,
                    **kw: Any) -> httpx.Response:
        budget = p.RetryBudget(self.retry_budget)
        while True:
            request = self._http.build_request(method, path, **kw)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                raise p.unreachable(request.url, e) from e
            if response.is_success:
                return response
            await response.aread()
            await response.aclose()
            await asyncio.sleep(budget.wait_or_raise(response))

    @p.takes_generate_params
    async def generate(self, params: p.GenerateParams) -> Generation:
        r = await self._send("POST", "/generate", json=params.body(),
                             headers={"Accept": p.JSON})
        return Generation.from_json(r.json())

    @p.takes_generate_params
    async def stream(self, params: p.GenerateParams) -> AsyncIterator[RowEvent | Generation]:
        r = await self._send("POST", "/generate", stream=True, json=params.body(),
                             headers={"Accept": p.STREAM_ACCEPT})
        async with aclosing(r):
            with p.transport_errors(r.url):
                kind = p.media_type(r)
                if kind == p.EVENT_STREAM:
                    events = p.GenerationStream()
                    async for line in r.aiter_lines():
                        for item in events.items(line):
                            yield item
                        if events.done:
                            return
                    raise p.ended_early()
                if kind == p.JSON:
                    yield Generation.from_json(json.loads(await r.aread()))
                    return
        yield await self.generate(params)

    async def encode(self, images: Any, model: str | None = None) -> np.ndarray:
        params = {"model": model} if model else None
        r = await self._send("POST", "/encode", params=params, files=p.encode_files(images))
        return _tokens(r.json())

    async def decode(self, grids: Any, model: str | None = None) -> list[Image.Image]:
        r = await self._send("POST", "/decode", json=p.grids_body(grids, model),
                             headers={"Accept": p.JSON})
        return _images(r.json())

    async def models(self) -> ModelList:
        return ModelList.from_json((await self._send("GET", "/models")).json())

    async def model(self, name: str) -> ModelInfo:
        r = await self._send("GET", f"/models/{quote(name, safe='')}")
        return ModelInfo.from_json(r.json())
