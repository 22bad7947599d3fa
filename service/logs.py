"""Logging: one JSON line per request on stdout (logger `taming.access`, at INFO, so
TAMING_LOG_LEVEL=warning silences it), everything else as text on stderr."""

from __future__ import annotations

import json
import logging
import sys

ACCESS = logging.getLogger("taming.access")


def configure(level: str = "info") -> None:
    """Idempotent: attach our handlers once per process."""
    root = logging.getLogger("taming")
    root.setLevel(level.upper())
    if getattr(root, "_taming_configured", False):
        return
    text = logging.StreamHandler(sys.stderr)
    text.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    root.addHandler(text)
    access = logging.StreamHandler(sys.stdout)
    access.setFormatter(logging.Formatter("%(message)s"))
    ACCESS.addHandler(access)
    ACCESS.propagate = False
    root._taming_configured = True


def access(record: dict) -> None:
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info(json.dumps(record, separators=(",", ":")))
