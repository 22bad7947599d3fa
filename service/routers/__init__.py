"""One router per resource; `ERRORS` documents the error answers each route can give."""

from __future__ import annotations

from ..schemas import ErrorBody

_DESCRIPTIONS = {
    401: "Missing or invalid API key (only when TAMING_API_KEYS is set).",
    404: "Unknown model.",
    413: "Body or image too large.",
    415: "Unsupported media type.",
    422: "Invalid parameters.",
    503: "Overloaded or shutting down; retry after Retry-After seconds.",
    504: "The deadline passed before the work ran.",
}


def errors(*codes: int) -> dict:
    return {c: {"model": ErrorBody, "description": _DESCRIPTIONS[c]} for c in codes}


PNG_CONTENT = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
