"""What FastAPI cannot infer for the OpenAPI schema: operation ids that read as verbs, and the
response headers that handlers and the request layer set outside the response models."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute


def operation_id(route: APIRoute) -> str:
    """The handler's name (`generate`, `list_models`), not FastAPI's `generate_generate_post`."""
    return route.name


def _header(description: str, type_: str = "string") -> dict:
    return {"description": description, "schema": {"type": type_}}


HEADERS = {
    "X-Request-ID": _header("The request's id: the client's X-Request-ID when it is 1-128 "
                            "characters of [A-Za-z0-9._:-], else one made by the server. It is "
                            "in the access log line of the request."),
    "X-Seed": _header("The seed of the first image; image i used seed + i.", "integer"),
    "X-Model": _header("The model that answered."),
    "Retry-After": _header("Seconds to wait before retrying.", "integer"),
}
# headers of the 2xx answers, by operation id
SUCCESS_HEADERS = {"generate": ("X-Seed", "X-Model"), "decode": ("X-Model",)}


def add_headers(schema: dict) -> dict:
    """Document X-Request-ID on every answer, Retry-After on every 503, and SUCCESS_HEADERS."""
    for item in schema.get("paths", {}).values():
        for op in item.values():
            for status, response in op.get("responses", {}).items():
                headers = response.setdefault("headers", {})
                headers["X-Request-ID"] = {**HEADERS["X-Request-ID"], "required": True}
                names = SUCCESS_HEADERS.get(op.get("operationId"), ()) if status[0] == "2" else ()
                if status == "503":
                    names = ("Retry-After",)
                for name in names:
                    headers[name] = {**HEADERS[name], "required": True}
    return schema


def document_headers(app: FastAPI) -> None:
    """Make app.openapi() return the generated schema with the headers added (built once)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            add_headers(build())
        return app.openapi_schema

    app.openapi = openapi
