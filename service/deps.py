"""Shared request helpers: the service state, API-key checks and JSON request bodies.

The API-key dependency of /models is attached by `create_app` only when TAMING_API_KEYS is
set, so a server without keys pays nothing for it (and its schema asks no key). JSON bodies
are parsed by the handlers themselves: pydantic validates the raw bytes in one call
(`model_validate_json`), and every failure has the service's own error shape.
"""

from __future__ import annotations

import hmac
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from .errors import ServiceError, describe_validation, invalid
from .state import Service

M = TypeVar("M", bound=BaseModel)

bearer = HTTPBearer(auto_error=False, description=(
    "Needed only when the server sets TAMING_API_KEYS: `Authorization: Bearer <key>`."))


def service_of(request: Request) -> Service:
    """The running service. A plain call, not a FastAPI dependency: each dependency level
    costs tens of microseconds per request, which /encode and /decode feel."""
    return request.app.state.service


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>`, read as HTTPBearer reads it."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def check_key(svc: Service, token: str | None) -> None:
    keys = svc.settings.api_keys
    if not keys:
        return
    given = token.encode() if token is not None else b""
    ok = False
    for k in keys:  # compare against every key: timing does not tell which matched
        ok |= hmac.compare_digest(given, k.encode())
    if not ok:
        raise ServiceError(401, "unauthorized", "missing or invalid API key "
                           "(send Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"})


async def require_api_key(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    check_key(service_of(request), creds.credentials if creds is not None else None)


async def require_metrics_key(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    svc = service_of(request)
    if svc.settings.protect_metrics:
        check_key(svc, creds.credentials if creds is not None else None)


NOT_JSON = "send the body as JSON, with Content-Type: application/json"


def _is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    kind, _, sub = media.partition("/")
    return kind == "application" and (sub == "json" or sub.endswith("+json"))


async def json_body(request: Request, schema: type[M], optional: bool = False) -> M | None:
    """The body as `schema`: None for an absent optional body; 415 for a body that is not
    declared JSON; 422 for bad JSON or values (pydantic's messages, one line)."""
    body = await request.body()
    if not body:
        if optional:
            return None
        raise invalid("the request needs a JSON body")
    if not _is_json(request):
        raise ServiceError(415, "unsupported_media_type", NOT_JSON)
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        raise invalid(describe_validation([{**err, "loc": ("body", *err["loc"])}
                                           for err in e.errors()])) from None
    except RecursionError:  # nested past the parser's stack
        raise invalid("body is not valid JSON") from None
