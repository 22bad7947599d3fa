"""The way in for POST /generate, /encode and /decode: straight to their handlers, outside
FastAPI's middleware stack, routing and dependency solving.

The handlers take the Request alone and parse, validate and answer by themselves, so this is
their one request path: FastAPI keeps routes of the same handlers only to document them
(/docs, /openapi.json), and those never see a request. On a busy CPU replica FastAPI's
per-request machinery cost the event loop more than a one-image /encode itself
(BENCHMARKS.md, "One request path").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from .deps import bearer_token, check_key
from .errors import ServiceError, error_response
from .state import Service

Handler = Callable[[Request], Awaitable[Response]]


class InferenceRoutes:
    """ASGI layer: serves `routes` (path -> handler, POST only) and passes the rest on."""

    def __init__(self, app, service: Service, routes: dict[str, Handler]) -> None:
        self.app = app
        self.svc = service
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)  # FastAPI answers, 405 included
            return
        request = Request(scope, receive, send)
        try:
            check_key(self.svc, bearer_token(request))  # nothing to check without keys
            response = await handler(request)
        except ServiceError as e:
            response = error_response(e.status, e.code, e.message, e.headers)
        await response(scope, receive, send)
