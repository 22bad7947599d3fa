"""Routes that answer errors in another protocol's shape (/v1: OpenAI's, /v2: KServe's).

The handlers raise the service's own errors (`ServiceError`, FastAPI's validation errors);
`protocol_route(shape)` makes an APIRoute class whose handler turns those, and any other
exception (a 500), into `shape`'s answer, dependencies (the API-key check) included, so each
protocol's clients read the message where they look for it. The native routes keep the
native shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ServiceError, describe_validation
from . import _DESCRIPTIONS

log = logging.getLogger("taming.errors")

# (status, code, message, param, headers) -> the protocol's error answer
ErrorShape = Callable[[int, str, str, "str | None", "dict | None"], Response]


class ProtocolError(ServiceError):
    """A ServiceError that also names the request field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(status, code, message)
        self.param = param


def protocol_route(shape: ErrorShape) -> type[APIRoute]:
    class ProtocolRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def answer(request: Request) -> Response:
                try:
                    return await handler(request)
                except ServiceError as e:
                    return shape(e.status, e.code, e.message, getattr(e, "param", None),
                                 e.headers)
                except RequestValidationError as e:
                    errors = list(e.errors())
                    loc = errors[0].get("loc", ()) if errors else ()
                    return shape(422, "invalid_request", describe_validation(errors),
                                 str(loc[-1]) if loc else None, None)
                except Exception:  # a bug: its 500 in the protocol's shape, not the native one
                    log.exception("unhandled error on %s", request.url.path)
                    return shape(500, "internal_error", "internal server error", None, None)

            return answer

    return ProtocolRoute


def error_responses(model: type[BaseModel], *codes: int) -> dict:
    """The documented error answers of a protocol's route, in its own shape."""
    descriptions = {**_DESCRIPTIONS, 400: "Invalid parameters.", 404: "Unknown model."}
    return {c: {"model": model, "description": descriptions[c]} for c in codes}
