"""The API's documentation: what FastAPI cannot infer for the OpenAPI schema (operation ids
that read as verbs, the request bodies that handlers parse themselves, the response headers
that handlers and the request layer set outside the response models, the key check of the
routes served outside FastAPI), and /docs (Swagger UI) with its scripts served from here.

FastAPI's own /docs page loads Swagger UI from a CDN and stays blank offline; here the assets
come from the fastapi-offline package (installed from PyPI with the server). There is no
/redoc: ReDoc fetches its logo from its vendor's site, so it cannot work offline.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.responses import HTMLResponse


def operation_id(route: APIRoute) -> str:
    """The handler's name (`generate`, `list_models`), not FastAPI's `generate_generate_post`."""
    return route.name


def body_schema(schema: type[BaseModel], examples: dict[str, Any], required: bool) -> dict:
    """The OpenAPI requestBody of a handler that parses its own JSON body."""
    return {"requestBody": {"required": required, "content": {"application/json": {
        "schema": schema.model_json_schema(ref_template="#/components/schemas/{model}"),
        "examples": examples}}}}


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


def add_security(schema: dict, paths: tuple[str, ...]) -> dict:
    """The routes served outside FastAPI (service.app.InferenceRoutes checks their key) ask
    for the same bearer key as /models, whose dependency FastAPI documents."""
    for path in paths:
        op = schema.get("paths", {}).get(path, {}).get("post")
        if op is not None:
            op["security"] = [{"HTTPBearer": []}]
    return schema


def hoist_defs(schema: dict) -> dict:
    """The models nested in a request body that a handler parses itself (pydantic's `$defs`,
    referred to as #/components/schemas/...) become components, so every reference resolves."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for item in schema.get("paths", {}).values():
        for op in item.values():
            for media in op.get("requestBody", {}).get("content", {}).values():
                components.update(media.get("schema", {}).pop("$defs", {}))
    return schema


def _json_body(schema: dict, path: str) -> dict | None:
    op = schema.get("paths", {}).get(path, {}).get("post", {})
    media = op.get("requestBody", {}).get("content", {}).get("application/json")
    return None if media is None else media["schema"]


def add_limits(schema: dict, limits: Limits | None) -> dict:
    """The bounds the code holds requests to, from the models loaded: /generate's `grid`
    (each side from the smallest training grid to the largest max_grid), its prefix ids and
    labels (indexes and names of the models' classes), top_k (up to the codebook), and
    /decode's grids (rows, columns, ids below the largest codebook, grids per request).
    Several models: the widest of their bounds (a model's own may be narrower)."""
    if limits is None:
        return schema
    ids = {"type": "integer", "minimum": 0, "maximum": limits.codebook - 1}
    generate = _json_body(schema, "/generate")
    if generate is not None:
        props = generate["properties"]
        for option in props["grid"].get("anyOf", []):
            if option.get("type") == "array":
                option["items"] = {"type": "integer", "minimum": limits.min_side,
                                   "maximum": limits.max_side}
        props["prefix"]["anyOf"] = [
            {"type": "array", "items": ids, "maxItems": limits.max_prefix},
            {"type": "array", "items": {"type": "array", "items": ids,
                                        "maxItems": limits.max_side},
             "maxItems": limits.max_side},
            {"type": "null"}]
        if limits.classes:
            props["label"]["anyOf"] = [
                {"type": "integer", "minimum": 0, "maximum": len(limits.classes) - 1},
                {"type": "string", "enum": list(limits.classes)}, {"type": "null"}]
    for path, media in (("/generate", "application/json"),
                        ("/v1/images/generations", "application/json"),
                        ("/v1/images/variations", "multipart/form-data")):
        body = schema.get("paths", {}).get(path, {}).get("post", {}).get(
            "requestBody", {}).get("content", {}).get(media)
        top_k = body["schema"]["properties"].get("top_k") if body else None
        for option in (top_k or {}).get("anyOf", [top_k] if top_k else []):
            if option.get("type") == "integer":
                option["maximum"] = limits.codebook
    decode = _json_body(schema, "/decode")
    if decode is not None:
        row = {"type": "array", "items": ids, "minItems": 1, "maxItems": limits.max_side}
        grid = {"type": "array", "items": row, "minItems": 1, "maxItems": limits.max_side}
        tokens = decode["properties"]["tokens"]
        tokens["anyOf"] = [grid, {"type": "array", "items": grid, "minItems": 1,
                                  "maxItems": limits.max_images}]
    return schema


@dataclass(frozen=True)
class Limits:
    """What the loaded models and the settings allow, for the schema."""

    min_side: int  # the smallest side of a model's training grid
    max_side: int  # the largest side of a model's max_grid
    codebook: int  # the largest codebook
    max_images: int  # TAMING_MAX_IMAGES
    max_prefix: int  # the most ids a prefix may hold (schemas.MAX_PREFIX)
    classes: tuple[str, ...] = ()  # the generating models' class names (the label's enum)


def document_headers(app: FastAPI, secured: tuple[str, ...] = (),
                     limits: Callable[[], Limits | None] = lambda: None) -> None:
    """Make app.openapi() return the generated schema with the headers added, the key
    check of `secured` (POST routes) documented, nested body models as components and the
    grids' bounds from `limits()` (built once; again after the models load)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            # a copy: the bodies documented by hand are module-level dicts, shared by apps
            schema = copy.deepcopy(build())
            app.openapi_schema = add_limits(hoist_defs(add_security(add_headers(schema),
                                                                    secured)), limits())
        return app.openapi_schema

    app.openapi = openapi


ASSETS = "/docs/assets"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"


def install_docs(app: FastAPI) -> None:
    """Add /docs and its assets; build the app with docs_url=None, redoc_url=None."""
    app.mount(ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")),
              name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            # no badge fetched from the public validator
            swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})})

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
