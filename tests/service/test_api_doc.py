"""docs/api.md, the repository's API reference, names everything the server has: every
setting, path, operation id, documented header, metric and error code; and nothing in the
repository points outside it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from service_helpers import ROOT, settings, tiny_models

from service.app import create_app
from service.metrics import Metrics
from service.openapi import HEADERS
from service.settings import Settings

DOC = (ROOT / "docs" / "api.md").read_text()


@pytest.fixture(scope="module")
def schema() -> dict:
    return create_app(settings(**tiny_models("mnist"))).openapi()


def _named(name: str) -> bool:
    return f"`{name}`" in DOC or f"`{name} " in DOC or f"{name} (" in DOC


def test_every_setting_is_documented():
    for name in Settings.model_fields:
        env = {"host": "HOST", "port": "PORT"}.get(name, f"TAMING_{name.upper()}")
        assert _named(env), env


def test_every_path_operation_and_header_is_documented(schema):
    for path, item in schema["paths"].items():
        assert f"{path}" in DOC, path
        for op in item.values():
            assert f"`{op['operationId']}`" in DOC, op["operationId"]
    for header in HEADERS:
        assert f"`{header}`" in DOC, header
    for event in ("row", "done", "error"):
        assert f"event: {event}" in DOC or f"`{event}`" in DOC, event


def test_every_metric_is_documented():
    families = {f.name + ("_total" if f.type == "counter" else "")
                for f in Metrics().registry.collect()}
    taming = {f for f in families if f.startswith("taming_")}
    assert len(taming) >= 10
    for name in taming:
        assert f"`{name}`" in DOC, name
    for name in families - taming:  # the standard process_* and python_* series
        assert f"`{name}`" in DOC or f"`{name.split('_')[0]}_*`" in DOC, name


def test_every_error_code_the_server_raises_is_documented():
    source = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    codes = set(re.findall(r"(?:ServiceError|error_response)\(\s*[45]\d\d,\s*\"(\w+)\"", source))
    codes |= set(re.findall(r"invalid\([^()]*(?:\([^()]*\)[^()]*)*,\s*\"(\w+)\"\)", source))
    codes |= {"invalid_request", "not_found", "method_not_allowed", "internal_error"}
    assert {"overloaded", "draining", "image_too_large", "generator_unavailable"} <= codes
    codes.discard("client_gone")  # 499: logged, never seen by a client
    for code in codes:
        assert f"`{code}`" in DOC, code


SKIP_DIRS = {".git", ".venv", "data", "build", "wheels", "runs", "node_modules", "__pycache__",
             ".pytest_cache", ".ruff_cache"}


def _files() -> list[Path]:
    """The repository's files outside SKIP_DIRS and the top-level *.egg-info, found without
    walking into the skipped folders (the venv would be most of the walk)."""
    found = []
    for folder, dirs, names in os.walk(ROOT):
        top = Path(folder) == ROOT
        kept = [n for n in dirs + names
                if n not in SKIP_DIRS and not (top and n.endswith(".egg-info"))]
        dirs[:] = [d for d in dirs if d in kept]
        found += [Path(folder, n) for n in names if n in kept]
    return found


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|DESIGN" + r"\.md")
    hits = []
    for path in _files():
        rel = path.relative_to(ROOT)
        if not path.is_file() or path.suffix in (".safetensors", ".png", ".gz", ".whl"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{rel}:{i + 1}" for i, line in enumerate(text.splitlines())
                 if outside.search(line)]
    assert not hits, hits
