"""The error shapes: the native `{"error": {"code": "...", "message": "..."}}`, and those of
the protocol routes (OpenAI's under /v1, the Open Inference Protocol's under /v2).

Every error answer picks its shape by the request's path (`error_for`), wherever it is made:
in a handler, in FastAPI's exception handlers, in the request layer (413, 408, 500) or in the
HTTP protocol itself; so a protocol's clients read every message where they look for it.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("taming.errors")

CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout", 413: "payload_too_large",
         415: "unsupported_media_type", 422: "invalid_request", 429: "too_many_requests",
         500: "internal_error", 503: "unavailable", 504: "deadline_exceeded"}


RETRY_AFTER = {"Retry-After": "1"}  # seconds: a load balancer retries elsewhere meanwhile


class ServiceError(Exception):
    """An error the client should see, with its status, machine code and headers."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def invalid(message: str, code: str = "invalid_request") -> ServiceError:
    return ServiceError(422, code, message)


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def openai_error(status: int, code: str, message: str, param: str | None = None,
                 headers: dict | None = None) -> Response:
    """OpenAI's error body; the native API's 422 becomes a 400."""
    status = 400 if status == 422 else status
    kind = ("authentication_error" if status == 401 else "server_error" if status >= 500
            else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response(json.dumps(body).encode(), status_code=status, headers=headers,
                    media_type="application/json")


def v2_error(status: int, code: str, message: str, param: str | None = None,
             headers: dict | None = None) -> Response:
    """The Open Inference Protocol's `{"error": "<message>"}`; 422 becomes a 400."""
    status = 400 if status == 422 else status
    return Response(json.dumps({"error": message}).encode(), status_code=status,
                    headers=headers, media_type="application/json")


def _native(status: int, code: str, message: str, param: str | None = None,
            headers: dict | None = None) -> Response:
    return error_response(status, code, message, headers)


def error_for(path: str):
    """The error shape of a request path: (status, code, message, param, headers) -> answer."""
    if path == "/v2" or path.startswith("/v2/"):
        return v2_error
    if path == "/v1" or path.startswith("/v1/"):
        return openai_error
    return _native


_UNION_TAGS = {"int", "str", "float", "bool", "list", "dict", "none"}


def _location(loc: tuple) -> str:
    """("body", "tokens", "list[list[int]]", 0, 1) -> "tokens.0.1" (no union branch names)."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and (
        "[" in p or p in _UNION_TAGS))] if loc and loc[0] == "body" else [str(p) for p in loc]
    return ".".join(parts) or "body"


def describe_validation(errors: list[dict]) -> str:
    """pydantic's errors -> one readable line (the first three places)."""
    out: dict[str, str] = {}
    for e in errors:
        if e.get("type") == "json_invalid":
            return f"body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
        where = _location(tuple(e.get("loc", ())))
        if where == "body" and e.get("type") in ("model_attributes_type", "model_type", "dict_type"):
            return "the body must be a JSON object, sent with Content-Type: application/json"
        out.setdefault(where, e.get("msg", "invalid"))
    shown = list(out.items())[:3]
    more = len(out) - len(shown)
    return "; ".join(f"{k}: {v}" for k, v in shown) + (f" (and {more} more)" if more > 0 else "")


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return error_for(request.url.path)(exc.status, exc.code, exc.message,
                                           getattr(exc, "param", None), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_for(request.url.path)(422, "invalid_request",
                                           describe_validation(list(exc.errors())), None, None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return error_for(request.url.path)(422, "invalid_request", "body is not valid JSON",
                                               None, None)
        code = CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return error_for(request.url.path)(exc.status_code, code, message, None,
                                           getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_for(request.url.path)(500, "internal_error", "internal server error",
                                           None, None)
