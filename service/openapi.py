"""The API's documentation: what FastAPI cannot infer for the OpenAPI schema (operation ids
that read as verbs, the request bodies that handlers parse themselves, the response headers
that handlers and the request layer set outside the response models, the key check of the
routes served outside FastAPI), and /docs (Swagger UI) with its scripts served from here.

FastAPI's own /docs page loads Swagger UI from a CDN and stays blank offline; here the assets
come from the fastapi-offline package (installed from PyPI with the server). There is no
/redoc: ReDoc fetches its logo from its vendor's site, so it cannot work offline.
"""

from __future__ import annotations

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


def document_headers(app: FastAPI, secured: tuple[str, ...] = ()) -> None:
    """Make app.openapi() return the generated schema with the headers added, and the key
    check of `secured` (POST routes) documented (built once)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            add_security(add_headers(build()), secured)
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
