"""Lengths carried by headers (Content-Length, Inference-Header-Content-Length), parsed
strictly: ASCII digits only, and few enough of them to bound the number.

`str.isdigit()` also accepts other scripts' digits and superscripts (`²`), which `int()`
then refuses or reads; and `int()` refuses more than 4,300 digits. Both raised past the
checks as a 500. A length here is a plain decimal of at most MAX_DIGITS digits, or nothing.
"""

from __future__ import annotations

import re

MAX_DIGITS = 18  # below 2**63: every length a server can hold, and none that overflows
_LENGTH = re.compile(rb"[0-9]{1,%d}" % MAX_DIGITS)


def parse_length(value: str | bytes | None) -> int | None:
    """The length a header value states, or None when it states none (absent, empty, signed,
    spaced, non-ASCII digits, or more than MAX_DIGITS digits)."""
    if value is None:
        return None
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return int(raw) if _LENGTH.fullmatch(raw) else None


def header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of one header (lower-case `name`) in raw ASGI headers, in order."""
    return [v for k, v in headers if k == name]
