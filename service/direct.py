"""The hot path: POST /generate, /encode and /decode go from the ASGI layer straight to their
handlers, past FastAPI's routing, dependency solving and per-request exit stacks.

On 2 cores that machinery was half of the event loop's time for a one-image /encode (py-spy
at 64 clients); the model step it wraps is under a millisecond. The handlers are the very
functions FastAPI routes to and documents in /docs: only their arguments are parsed here,
by the same pydantic models, into the same 422 answers. API keys are checked here too, and
CORS (a layer outside this one) still applies. TAMING_DIRECT_ROUTES=false hands the three
routes back to FastAPI.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated
from urllib.parse import parse_qsl

from pydantic import Field, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from .deps import bearer_token, check_key
from .errors import ServiceError, describe_validation, error_response, invalid
from .routers import decode, encode, generate
from .schemas import MAX_NAME, DecodeRequest, GenerateRequest
from .state import Service

NOT_JSON = "the body must be a JSON object, sent with Content-Type: application/json"
_MODEL_NAME = TypeAdapter(Annotated[str, Field(max_length=MAX_NAME)])


def _json_body(request: Request, body: bytes, schema: type, optional: bool = False):
    """What FastAPI makes of a JSON body parameter, message for message: None for an absent
    optional body, 422 for an absent required one, for a body that is not declared JSON
    (Content-Type), for bad JSON, and pydantic's errors (python mode, as FastAPI validates)."""
    if not body:
        if optional:
            return None
        raise invalid(describe_validation([{"type": "missing", "loc": ("body",),
                                            "msg": "Field required"}]))
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    kind, _, sub = media.partition("/")
    if kind != "application" or not (sub == "json" or sub.endswith("+json")):
        raise invalid(NOT_JSON)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:  # (UnicodeDecodeError is a ValueError too)
        raise invalid(describe_validation([{"type": "json_invalid", "loc": ("body", e.pos),
                                            "ctx": {"error": e.msg}}])) from None
    except (ValueError, RecursionError):  # not UTF-8; nested past Python's stack
        raise invalid("body is not valid JSON") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise invalid(describe_validation([{**err, "loc": ("body", *err["loc"])}
                                           for err in e.errors()])) from None


def _query_model(request: Request) -> str | None:
    """The optional ?model= of /encode (the last one wins, as in FastAPI)."""
    model = None
    for k, v in parse_qsl(request.scope["query_string"].decode("latin-1")):
        if k == "model":
            model = v
    if model is None:
        return None
    try:
        return _MODEL_NAME.validate_python(model)
    except ValidationError as e:
        raise invalid(describe_validation([{**err, "loc": ("query", "model")}
                                           for err in e.errors()])) from None


async def _generate(request: Request) -> Response:
    body = _json_body(request, await request.body(), GenerateRequest, optional=True)
    return await generate.generate(request, body)


async def _encode(request: Request) -> Response:
    return await encode.encode(request, _query_model(request))


async def _decode(request: Request) -> Response:
    body = _json_body(request, await request.body(), DecodeRequest)
    return await decode.decode(request, body)


ROUTES: dict[str, Callable[[Request], Awaitable[Response]]] = {
    "/generate": _generate, "/encode": _encode, "/decode": _decode}


class DirectRoutes:
    """ASGI middleware: serves ROUTES itself and passes everything else on to FastAPI."""

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.svc = service

    async def __call__(self, scope, receive, send) -> None:
        handler = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            if self.svc.settings.api_keys:
                check_key(self.svc, bearer_token(request))
            response = await handler(request)
        except ServiceError as e:
            response = error_response(e.status, e.code, e.message, e.headers)
        await response(scope, receive, send)
