"""Shared request helpers: the service state, API-key checks and content negotiation.

The API-key dependencies are attached by `create_app` only when TAMING_API_KEYS is set, so a
server without keys pays nothing for them (and its schema asks no key of those routes).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ServiceError
from .state import Service

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


def wants_json(request: Request) -> bool:
    """True when Accept prefers application/json over image/png (PNG is the default)."""
    accept = request.headers.get("accept")
    if not accept or "json" not in accept:
        return False
    q_json = q_png = 0.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        media = media.strip().lower()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if media in ("application/json", "application/*"):
            q_json = max(q_json, q)
        elif media in ("image/png", "image/*", "*/*"):
            q_png = max(q_png, q)
    return q_json > 0 and q_json > q_png
