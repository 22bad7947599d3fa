"""JSON request bodies, parsed by the handlers themselves: pydantic validates the raw bytes
in one call (`model_validate_json`), and every failure has the service's own error shape."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .errors import ServiceError, describe_validation, invalid

M = TypeVar("M", bound=BaseModel)

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


def body_schema(schema: type[BaseModel], examples: dict[str, Any], required: bool) -> dict:
    """The OpenAPI requestBody of a handler that parses its own JSON body."""
    return {"requestBody": {"required": required, "content": {"application/json": {
        "schema": schema.model_json_schema(ref_template="#/components/schemas/{model}"),
        "examples": examples}}}}
