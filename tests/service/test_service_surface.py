"""What a new user meets first: `python -m service --help`, /docs with no internet access,
readable operation ids and documented headers in the OpenAPI schema, the standard process and
Python series on /metrics, and the package's extras and metadata."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from urllib.parse import urlsplit

import pytest
import tomllib
from fastapi.testclient import TestClient
from service_helpers import ROOT, live_server, metric, settings, tiny_models

from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(settings(**tiny_models("mnist")))) as c:
        yield c


# ---- python -m service --help -----------------------------------------------------------------
@pytest.mark.slow
def test_help_lists_every_setting_and_starts_no_server():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAMING_")}
    proc = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: python -m service") and not proc.stderr
    for name, field in Settings.model_fields.items():
        env_name = "HOST" if name == "host" else "PORT" if name == "port" else f"TAMING_{name.upper()}"
        assert env_name in out, name
        words = (field.description or "").split()[:3]
        assert " ".join(words) in " ".join(out.split()), name  # its description too
    bad = subprocess.run([sys.executable, "-m", "service", "--no-such-option"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


# ---- /docs ------------------------------------------------------------------------------------
def test_docs_page_loads_its_assets_from_this_server(client):
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", r.text)
    urls = [a or b for a, b in urls]
    assert len(urls) >= 4  # script, stylesheet, icon, schema
    for url in urls:
        assert not urlsplit(url).netloc, f"/docs loads {url} from another host"
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 100, url
    assert client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith(
        ("application/javascript", "text/javascript"))
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert client.get("/redoc").status_code == 404  # ReDoc needs its vendor's site


@pytest.mark.slow
def test_docs_render_in_a_browser_with_no_network():
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    app = create_app(settings(**tiny_models("mnist")))
    with live_server(app) as base, sync_api.sync_playwright() as p:
        spec = app.openapi()
        operations = sum(len(item) for item in spec["paths"].values())
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page()
            foreign: list[str] = []
            host = urlsplit(base).netloc

            def only_this_server(route) -> None:
                if urlsplit(route.request.url).netloc in (host, ""):
                    route.continue_()
                else:  # as if offline: nothing else answers
                    foreign.append(route.request.url)
                    route.abort()

            page.route("**/*", only_this_server)
            page.goto(f"{base}/docs")
            page.wait_for_selector(".opblock", timeout=60_000)
            assert page.locator(".opblock").count() == operations
            assert page.locator(".opblock-summary-path", has_text="/generate").count() == 1
            assert foreign == []
        finally:
            browser.close()


# ---- the OpenAPI schema -----------------------------------------------------------------------
def test_operation_ids_are_the_handler_names(client):
    spec = client.get("/openapi.json").json()
    ids = {path: {method: op["operationId"] for method, op in item.items()}
           for path, item in spec["paths"].items()}
    assert ids["/generate"] == {"post": "generate"}
    assert ids["/encode"] == {"post": "encode"} and ids["/decode"] == {"post": "decode"}
    assert ids["/models"] == {"get": "list_models"}
    assert ids["/models/{name}"] == {"get": "get_model"}
    every = [i for item in ids.values() for i in item.values()]
    assert len(every) == len(set(every))
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)?", i) for i in every), every


def test_encode_documents_its_model_parameter(client):
    """/encode reads ?model= itself (service.app.InferenceRoutes serves it past FastAPI), so its schema
    says by hand what FastAPI would have derived."""
    op = client.get("/openapi.json").json()["paths"]["/encode"]["post"]
    params = {p["name"]: p for p in op["parameters"]}
    assert params["model"]["in"] == "query" and not params["model"]["required"]
    assert params["model"]["schema"] == {"type": "string", "maxLength": 128}


def test_response_headers_are_documented_and_sent(client):
    spec = client.get("/openapi.json").json()
    ops = {op["operationId"]: op for item in spec["paths"].values() for op in item.values()}

    def documented(op: str, status: int) -> set[str]:
        return set(ops[op]["responses"][str(status)].get("headers", {}))

    assert documented("generate", 200) == {"X-Seed", "X-Model", "X-Request-ID"}
    assert documented("decode", 200) == {"X-Model", "X-Request-ID"}
    for op in ops.values():
        for status, response in op["responses"].items():
            assert "X-Request-ID" in response["headers"]
            assert (status == "503") == ("Retry-After" in response["headers"])
    # what is documented is what comes back
    answers = {
        ("generate", 200): client.post("/generate", json={"seed": 3}),
        ("decode", 200): client.post("/decode", json={"tokens": [[0] * 7] * 7}),
        ("get_model", 404): client.get("/models/nope"),
    }
    with TestClient(create_app(settings(**tiny_models("mnist")))) as c:
        c.app.state.service.begin_drain()
        answers[("readyz", 503)] = c.get("/readyz")
        answers[("generate", 503)] = c.post("/generate", json={"seed": 1})
    for (op, status), r in answers.items():
        assert r.status_code == status, (op, r.text)
        missing = {h for h in documented(op, status) if h.lower() not in r.headers}
        assert not missing, (op, status, missing)
    assert answers[("generate", 200)].headers["x-seed"] == "3"


# ---- /metrics ---------------------------------------------------------------------------------
def test_metrics_carry_the_standard_process_and_python_series(client):
    text = client.get("/metrics").text
    rss = metric(text, "process_resident_memory_bytes")
    with open("/proc/self/status") as f:  # the app runs in this process
        mine = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert 0.5 * mine < rss < 2 * mine
    assert metric(text, "process_cpu_seconds_total") > 0
    assert metric(text, "process_open_fds") > 0
    assert metric(text, "python_info", implementation="CPython") == 1
    assert "python_gc_objects_collected_total" in text


# ---- the package ------------------------------------------------------------------------------
def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(reqs: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9._-]+", r).group().lower() for r in reqs}


def test_extras_split_serving_training_and_testing():
    project = _project()
    base, extras = _names(project["dependencies"]), project["optional-dependencies"]
    serve, train = _names(extras["serve"]), _names(extras["train"])
    assert {"fastapi", "uvicorn", "fastapi-offline"} <= serve and "fastapi" not in base
    tools = {"pytest", "ruff", "httpx", "schemathesis", "playwright"}
    assert not tools & (base | serve | train) and tools <= _names(extras["test"])
    assert "taming-server[serve,train]" in extras["test"]
    # `make serve` installs the serving extra only, with torch pinned by constraints.txt
    plan = subprocess.run(["make", "-n", "serve", "VENV=/nonexistent/venv"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line]
    assert any("-c constraints.txt torch==" in line for line in installs), installs
    assert any("'.[serve]'" in line for line in installs) and ".[test]" not in plan


def test_license_is_an_spdx_expression_setuptools_accepts_without_warning():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    assert _project()["license"] == "MIT"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"
    assert not [w for w in caught if "license" in str(w.message).lower()]
