"""The playground: GET / serves one static page, its script and its style (service/static/).

Everything the page needs comes from this server (no CDN, no build step), so it works offline;
its Content-Security-Policy lets it load and call nothing else. The page itself is public:
on a server with API keys it asks for one and sends it with its API calls.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..errors import ServiceError

STATIC = Path(__file__).resolve().parent.parent / "static"
MEDIA = {"index.html": "text/html; charset=utf-8",
         "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter(tags=["playground"], include_in_schema=False)


@lru_cache(maxsize=16)
def _asset(name: str, mtime_ns: int) -> tuple[bytes, str]:
    """The file's bytes and a strong ETag, read again only when the file changes."""
    data = (STATIC / name).read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:20] + '"'


def _serve(request: Request, name: str) -> Response:
    data, etag = _asset(name, (STATIC / name).stat().st_mtime_ns)
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if name == "index.html":
        headers["Content-Security-Policy"] = CSP
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=MEDIA[name], headers=headers)


@router.get("/")
async def page(request: Request) -> Response:
    return _serve(request, "index.html")


@router.get("/static/{name}")
async def asset(request: Request, name: str) -> Response:
    if name not in MEDIA or name == "index.html":
        raise ServiceError(404, "not_found", f"no static file {name!r}")
    return _serve(request, name)
