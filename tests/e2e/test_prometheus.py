"""A real Prometheus scrapes a real server, with the repo's scrape config and alert rules.

Starts `python -m service` on a free port and Debian's `prometheus` binary (installed by
`make test`) with deploy/prometheus/prometheus.yml, its `taming` job pointed at that port and
a 1 s scrape interval; drives /generate, /encode and /decode; then asks Prometheus's HTTP
API that the target is up, that histogram quantiles over request latency and batch size are
numbers, that every Grafana query runs, and that every alert rule evaluates cleanly.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
READY_TIMEOUT_S = 45.0

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus missing: apt-get install prometheus (make test installs it)",
)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _wait_http(url: str, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{url} not ready in time:\n{_tail(log)}")


def prometheus_config(api_port: int) -> dict:
    """The repo's config, its `taming` job aimed at 127.0.0.1:api_port, scraped every second."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    cfg["rule_files"] = [str(PROM_DIR / f) for f in cfg.get("rule_files", [])]
    cfg.pop("alerting", None)
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == "taming"]
    assert len(jobs) == 1, "the repo's config should have one `taming` job"
    job = jobs[0]
    labels = (job.get("static_configs") or [{}])[0].get("labels", {})
    for key in list(job):
        if key.endswith("_sd_configs") or key == "static_configs":
            del job[key]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{api_port}"], "labels": labels}]
    cfg["scrape_configs"] = [job]
    return cfg


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(api base URL, Prometheus base URL), both processes killed at the end."""
    tmp = tmp_path_factory.mktemp("prom")
    api_port, prom_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAMING_")}
    # the eager generation step: compiling it would only lengthen the start
    env.update(HOST="127.0.0.1", PORT=str(api_port), TAMING_DEVICE="cpu", TAMING_COMPILE="false")
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(api_port)))
    api_log, prom_log = tmp / "api.log", tmp / "prometheus.log"
    api = prom = None
    try:
        with api_log.open("wb") as out:
            api = subprocess.Popen(
                [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT,
            )
        with prom_log.open("wb") as out:
            prom = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
            )
        api_url, prom_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        _wait_http(f"{prom_url}/-/ready", prom, prom_log, deadline)
        _wait_http(f"{api_url}/readyz", api, api_log, deadline)
        yield api_url, prom_url
    finally:
        _stop(api)
        _stop(prom)


def _query(prom_url: str, expr: str) -> dict:
    resp = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=5)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]


def _numbers(data: dict) -> list[float]:
    return [float(r["value"][1]) for r in data["result"]]


def _traffic(client: httpx.Client, i: int) -> None:
    r = client.post(
        "/generate",
        json={"n": 1, "label": i % 10, "seed": i},
        headers={"Accept": "application/json"},
    )
    assert r.status_code == 200, r.text
    image = r.json()["images"][0]
    png, tokens = base64.b64decode(image["png"]), image["tokens"]
    r = client.post("/encode", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    r = client.post("/decode", json={"tokens": tokens})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("image/png")


def _poll(fn, timeout: float, what: str):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"{what}: last answer {last!r}")


@pytest.fixture(scope="module")
def scraped(stack):
    """Traffic spread over several scrapes, so rates over the window are non-zero."""
    api_url, prom_url = stack

    def target_up():
        resp = httpx.get(f"{prom_url}/api/v1/targets", timeout=5).json()
        active = resp["data"]["activeTargets"]
        return [t for t in active if t["labels"]["job"] == "taming" and t["health"] == "up"]

    _poll(target_up, 15, "the taming target never came up")
    with httpx.Client(base_url=api_url, timeout=30) as client:
        start, i = time.monotonic(), 0
        while time.monotonic() - start < 3.5 or i < 4:
            _traffic(client, i)
            i += 1
    return stack


def test_target_is_up(scraped):
    _, prom_url = scraped
    resp = httpx.get(f"{prom_url}/api/v1/targets", timeout=5).json()
    (target,) = [t for t in resp["data"]["activeTargets"] if t["labels"]["job"] == "taming"]
    assert target["health"] == "up", target
    assert target["scrapeUrl"].endswith("/metrics")
    assert _numbers(_query(prom_url, 'up{job="taming"}')) == [1.0]


@pytest.mark.parametrize(
    "histogram", ["taming_request_duration_seconds_bucket", "taming_batch_size_bucket"]
)
def test_histogram_quantiles_are_numbers(scraped, histogram):
    _, prom_url = scraped
    expr = f"histogram_quantile(0.99, sum by (le) (rate({histogram}[1m])))"

    def finite():
        values = _numbers(_query(prom_url, expr))
        return values if values and all(math.isfinite(v) and v > 0 for v in values) else None

    _poll(finite, 20, f"{expr} gave no finite number")


def test_request_counters_reach_prometheus(scraped):
    _, prom_url = scraped

    def by_endpoint():
        data = _query(prom_url, 'sum by (endpoint) (taming_requests_total{status="200"})')
        seen = {r["metric"].get("endpoint"): float(r["value"][1]) for r in data["result"]}
        return seen if all(any(e in k for k in seen) for e in ("generate", "encode", "decode")) else None

    seen = _poll(by_endpoint, 10, "requests per endpoint missing")
    assert all(v >= 1 for v in seen.values())
    images = _numbers(_query(prom_url, "sum(taming_images_generated_total)"))
    assert images and images[0] >= 4


def _dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        panels = [p for top in dash["panels"] for p in (top, *top.get("panels", []))]
        out += [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]
    return out


def test_every_dashboard_query_runs(scraped):
    """Grafana's variables substituted as Grafana would; each query is valid PromQL and the
    core panels have data once there was traffic."""
    _, prom_url = scraped
    empty = []
    for title, expr in _dashboard_exprs():
        expr = expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
        expr = re.sub(r"\$\{?model\}?", ".*", expr)
        if not _query(prom_url, expr)["result"]:
            empty.append(title)
    must_have_data = {"Request rate by endpoint and status", "Latency p50 / p99 by endpoint"}
    assert not must_have_data & set(empty), f"panels without data: {empty}"


def test_alert_rules_load_and_evaluate(scraped):
    _, prom_url = scraped
    names = {
        r["alert"]
        for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }

    def evaluated():
        groups = httpx.get(f"{prom_url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else None

    rules = _poll(evaluated, 10, "alert rules did not all evaluate with health ok")
    assert {r["name"] for r in rules} == names
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert "TamingTargetDown" not in firing
