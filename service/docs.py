"""/docs (Swagger UI), with its scripts served from this server.

FastAPI's own page loads Swagger UI from a CDN and stays blank offline; here the assets come
from the fastapi-offline package (installed from PyPI with the server). There is no /redoc:
ReDoc fetches its logo from its vendor's site, so it cannot work offline.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

ASSETS = "/docs/assets"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"


def install(app: FastAPI) -> None:
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
