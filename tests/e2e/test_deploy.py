"""Deployment files: compose, Dockerfile, Prometheus, Grafana and Kubernetes manifests.

Fast and offline. The metric names every dashboard query and alert uses are checked against
the metric families the real app exports on /metrics; probe paths and ports against the
app's routes and the server's port. `promtool` (Debian's `prometheus` package, installed by
`make test`) checks the Prometheus config and rules and runs the alert unit tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
K8S_DIR = DEPLOY / "k8s"
PORT = 8000
HEALTH, READY = "/healthz", "/readyz"


# ---- what the service exports ----------------------------------------------------------


def _surface(settings) -> tuple[set[str], set[str]]:
    """(metric names, paths answering 200) read from the real app with these settings."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from service.app import create_app

    with TestClient(create_app(settings)) as client:
        paths = set(client.get("/openapi.json").json()["paths"])
        ok = {p for p in (HEALTH, READY) if client.get(p).status_code == 200}
        resp = client.get("/metrics")
        assert resp.status_code == 200
        text = resp.text
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in ("_bucket", "_sum", "_count", "_total", "_created"))
        names.update(sample.name for sample in family.samples)
    return names, paths & ok


@pytest.fixture(scope="module")
def app_surface():
    """The surface of the real app on the shipped mnist model with the eager step: what it
    exports depends neither on which models it serves nor on compiling (the slow
    test_the_deployed_app_has_the_surface_the_tests_read checks that)."""
    from service_helpers import serving_models, settings

    return _surface(settings(**serving_models("mnist"), api_keys=[], protect_metrics=False))


@pytest.fixture(scope="module")
def deployed_surface():
    """The surface of the app as deployed: every shipped model, the default settings (the
    compiled step)."""
    from service.settings import Settings

    return _surface(Settings(checkpoint_dir=ROOT / "checkpoints", api_keys=[],
                             protect_metrics=False))


@pytest.mark.slow  # compiles every shipped model's step
def test_the_deployed_app_has_the_surface_the_tests_read(deployed_surface, app_surface):
    assert deployed_surface == app_surface


@pytest.fixture(scope="module")
def exported(app_surface):
    names, _ = app_surface
    return names


# ---- PromQL: which metric names an expression reads -----------------------------------

_PROMQL_WORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, labels, keywords and Grafana variables
    removed). Enough of PromQL for our dashboards and rules, not a full parser."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    e = re.sub(r"\$\{?\w+\}?", "", e)  # Grafana variables ($__rate_interval, ${model})
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    tokens = re.findall(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", e)
    return {t for t in tokens if t.lower() not in _PROMQL_WORDS}


def test_metric_names_parser():
    expr = (
        'histogram_quantile(0.99, sum by (endpoint, le) (rate(foo_bucket{model=~"$model",'
        'status=~"5.."}[$__rate_interval]))) / sum(rate(bar_total[5m])) by (job) > 1e-3'
    )
    assert metric_names(expr) == {"foo_bucket", "bar_total"}
    assert metric_names('up{job="taming"} == 0 and on (instance) baz offset 5m') == {"up", "baz"}


# ---- Dockerfile --------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.startswith("#")]


def test_dockerfile_runs_the_service_as_non_root_with_a_healthcheck():
    ins = _dockerfile_instructions()
    stages = [rest for word, rest in ins if word == "FROM"]
    assert len(stages) >= 2, "multi-stage build expected"
    assert any("slim" in s for s in stages)
    final = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    runtime = ins[final:]

    cmd = [rest for word, rest in runtime if word == "CMD"]
    assert json.loads(cmd[-1]) == ["python", "-m", "service"], "exec-form CMD so SIGTERM reaches it"
    user = [rest for word, rest in runtime if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert any(w == "EXPOSE" and str(PORT) in r for w, r in runtime)

    health = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    assert health and HEALTH in health[-1] and "urllib" in health[-1]
    probe = json.loads(health[-1][health[-1].index("CMD") + 3 :].strip())
    assert probe[:2] == ["python", "-c"]
    compile(probe[2], "<healthcheck>", "exec")  # the inline program is valid Python

    # Checkpoints are baked in; torch comes from a selectable wheel index (CPU by default).
    assert any(w == "COPY" and r.split()[0] == "checkpoints" for w, r in runtime)
    args = {r.split("=")[0]: r.partition("=")[2] for w, r in ins if w == "ARG"}
    assert args.get("TORCH_VARIANT") == "cpu"
    assert any("download.pytorch.org/whl/${TORCH_VARIANT}" in r for w, r in ins if w == "RUN")
    env = " ".join(r for w, r in runtime if w == "ENV")
    assert "TAMING_CHECKPOINT_DIR=/app/checkpoints" in env and "PORT=8000" in env


def _runtime_run(needle: str) -> str:
    ins = _dockerfile_instructions()
    final = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    (cmd,) = [r for w, r in ins[final:] if w == "RUN" and needle in r]
    return cmd


@pytest.mark.parametrize("variant", ["cpu", "cu130"])
def test_each_image_carries_the_compiler_its_compiled_step_needs(tmp_path, variant):
    """Runs the runtime stage's install step with apt-get and rm stubbed: nothing on CPU (the
    step is a TorchScript trace); gcc alone (Triton's driver module) on CUDA."""
    cmd = _runtime_run("apt-get")
    log = tmp_path / "log"
    log.write_text("")
    for tool in ("apt-get", "rm"):
        stub = tmp_path / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "TORCH_VARIANT": variant}
    proc = subprocess.run(["sh", "-ec", cmd], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    if variant == "cpu":
        assert calls == []
        return
    (install,) = [c.split() for c in calls if c.startswith("apt-get install")]
    assert "--no-install-recommends" in install
    assert {w for w in install[2:] if not w.startswith("-")} == {"gcc", "libc6-dev"}
    assert calls[-1].startswith("rm -rf /var/lib/apt/lists")


def test_cuda_image_pins_a_torch_version_and_a_cuda_variant():
    args = {r.split("=")[0]: r.partition("=")[2] for w, r in _dockerfile_instructions() if w == "ARG"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    gpu = _compose("docker-compose.gpu.yml")["services"]["api"]["build"]["args"]
    assert re.fullmatch(r"cu\d{3}", _compose_default(gpu["TORCH_VARIANT"]))


@pytest.mark.slow
def test_pinned_torch_is_published_for_the_gpu_variants_cuda(tmp_path):
    """PyPI's Linux x86-64 torch is the CUDA build of the same release on PyTorch's own index;
    its metadata names the CUDA toolkit it was built with. The compose override's default
    variant must be that CUDA (cu130 for CUDA 13.0)."""
    args = {r.split("=")[0]: r.partition("=")[2] for w, r in _dockerfile_instructions() if w == "ARG"}
    gpu = _compose("docker-compose.gpu.yml")["services"]["api"]["build"]["args"]
    variant = _compose_default(gpu["TORCH_VARIANT"])
    report = tmp_path / "report.json"
    # --isolated and no config file: PyPI itself, not this machine's local wheels.
    cmd = [sys.executable, "-m", "pip", "--isolated", "--retries", "1", "--timeout", "30",
           "install", "--dry-run", "--ignore-installed", "--no-deps",
           "--quiet", "--report", str(report), "--target", str(tmp_path / "t"),
           "--only-binary=:all:", "--implementation", "cp", "--python-version",
           args["PYTHON_VERSION"], "--platform", "manylinux_2_28_x86_64",
           f"torch=={args['TORCH_VERSION']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PIP_CONFIG_FILE": os.devnull})
    if re.search(r"NewConnectionError|NameResolutionError|ConnectTimeout|Max retries", proc.stderr):
        pytest.skip(f"PyPI not reachable: {proc.stderr[-300:]}")
    assert proc.returncode == 0, f"torch {args['TORCH_VERSION']} has no manylinux wheel"
    (item,) = json.loads(report.read_text())["install"]
    assert item["download_info"]["url"].startswith("https://"), item["download_info"]["url"]
    deps = " ".join(item["metadata"]["requires_dist"])
    toolkit = re.search(r"cuda-toolkit\[[^\]]*\]==(\d+)\.(\d+)", deps)
    runtime = re.search(r"nvidia-cuda-runtime-cu\d+==(\d+)\.(\d+)", deps)
    major, minor = (toolkit or runtime).groups()
    assert variant == f"cu{major}{minor}", f"torch {args['TORCH_VERSION']} is built for CUDA {major}.{minor}"


def test_docker_build_context_has_what_the_dockerfile_copies():
    ignored = _dockerignore()
    for must in (".venv", ".git", "data", "runs"):
        assert must in ignored, f".dockerignore should exclude {must}"
    for word, rest in _dockerfile_instructions():
        if word != "COPY" or rest.startswith("--from"):
            continue
        parts = [p for p in rest.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
            assert src not in ignored, f"Dockerfile copies {src}, which .dockerignore excludes"


# ---- docker compose --------------------------------------------------------------------


def _compose(name="docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _published(ports) -> set[int]:
    out = set()
    for p in ports:
        target = p["target"] if isinstance(p, dict) else str(p).rsplit(":", 1)[-1]
        out.add(int(str(target).split("/")[0]))
    return out


def test_compose_has_api_prometheus_and_grafana_with_ports_and_healthchecks():
    services = _compose()["services"]
    assert {"api", "prometheus", "grafana"} <= set(services)
    for name, port in (("api", PORT), ("prometheus", 9090), ("grafana", 3000)):
        svc = services[name]
        assert port in _published(svc["ports"]), f"{name} should publish {port}"
        test = svc["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name} healthcheck"
    api = services["api"]
    assert HEALTH in " ".join(api["healthcheck"]["test"])
    assert api["build"]["context"] == "." and api["environment"]["PORT"] == str(PORT)
    assert all(k in ("HOST", "PORT") or k.startswith("TAMING_") for k in api["environment"])


def test_compose_mounts_the_repo_config():
    services = _compose()["services"]
    mounts = {
        name: {v.split(":")[0]: v.split(":")[1] for v in services[name]["volumes"]}
        for name in ("prometheus", "grafana")
    }
    assert mounts["prometheus"]["./deploy/prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert mounts["grafana"]["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_dir = mounts["grafana"]["./deploy/grafana/dashboards"]
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/taming.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == dash_dir
    for name in mounts:
        for src in mounts[name]:
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"


def test_compose_gpu_override_reserves_an_nvidia_gpu():
    api = _compose("docker-compose.gpu.yml")["services"]["api"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "cuda" in api["environment"]["TAMING_DEVICE"]
    assert "TORCH_VARIANT" in api["build"]["args"]


def _compose_default(value: str) -> str:
    """The value compose uses when the shell sets nothing: `${NAME:-default}` -> default."""
    m = re.fullmatch(r"\$\{\w+:-([^}]*)\}", str(value))
    return m.group(1) if m else str(value)


def test_compose_gpu_override_bounds_torch_threads():
    from service.settings import Settings

    env = _compose("docker-compose.gpu.yml")["services"]["api"]["environment"]
    threads = int(_compose_default(env["TAMING_TORCH_THREADS"]))
    assert 1 <= threads <= 8, "not one thread per core of a large GPU host"
    assert Settings(torch_threads=threads).torch_threads == threads


def test_compose_taming_variables_are_server_settings():
    from service.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        env = _compose(name)["services"]["api"]["environment"]
        for key in env:
            if key.startswith(prefix):
                field = key[len(prefix):].lower()
                assert field in Settings.model_fields, f"{name}: {key} is no server setting"


@pytest.mark.skipif(
    subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    if shutil.which("docker")
    else True,
    reason="the docker compose plugin is not installed",
)
def test_docker_compose_config_validates():
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"]
    proc = subprocess.run(
        ["docker", "compose", *files, "config", "-q"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


# ---- Prometheus ------------------------------------------------------------------------


def _promtool(*args: str) -> str:
    if shutil.which("promtool") is None:
        pytest.skip("promtool missing: apt-get install prometheus (make test installs it)")
    proc = subprocess.run(
        ["promtool", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_promtool_check_config():
    out = _promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert "SUCCESS" in out


def test_promtool_check_rules():
    out = _promtool("check", "rules", "deploy/prometheus/alerts.yml")
    assert "SUCCESS" in out


def test_promtool_alert_unit_tests():
    out = _promtool("test", "rules", "deploy/prometheus/alerts_test.yml")
    assert "SUCCESS" in out


def _rules() -> list[dict]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alerts_cover_errors_saturation_and_latency_with_exported_metrics(exported):
    rules = _rules()
    exprs = " ".join(r["expr"] for r in rules)
    assert 'status=~"5.."' in exprs
    assert "taming_queue_depth" in exprs and 'reason="queue_full"' in exprs
    assert "histogram_quantile(0.99" in exprs and "taming_request_duration_seconds_bucket" in exprs
    for rule in rules:
        unknown = metric_names(rule["expr"]) - exported - {"up"}
        assert not unknown, f"alert {rule['alert']} reads metrics the service lacks: {unknown}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def test_scrape_config_targets_the_api_metrics_endpoint():
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "taming")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"api:{PORT}"]
    assert (PROM_DIR / cfg["rule_files"][0]).is_file()


# ---- Grafana ---------------------------------------------------------------------------


def _dashboards() -> list[tuple[Path, dict]]:
    files = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
    assert files, "no dashboard JSON"
    return [(f, json.loads(f.read_text())) for f in files]


def _panels(dash: dict):
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for _, dash in _dashboards():
        for panel in _panels(dash):
            out.extend((panel["title"], t["expr"]) for t in panel.get("targets", []))
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                q = var["query"]
                out.append((f"variable {var['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def test_grafana_datasource_is_the_compose_prometheus():
    doc = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    for _, dash in _dashboards():
        for panel in _panels(dash):
            if "datasource" in panel:
                assert panel["datasource"]["uid"] == ds["uid"], panel["title"]


def test_dashboard_has_the_required_panels():
    for _, dash in _dashboards():
        ids = [p["id"] for p in _panels(dash)]
        assert len(ids) == len(set(ids)), "panel ids must be unique"
        assert dash["uid"]
    exprs = " ".join(e for _, e in dashboard_queries())
    for needle in (
        "sum by (endpoint, status) (rate(taming_requests_total",
        "histogram_quantile(0.5, sum by (endpoint, le) (rate(taming_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (endpoint, le) (rate(taming_request_duration_seconds_bucket",
        "taming_batch_size_",
        "taming_queue_depth",
        "taming_rejected_total",
        "taming_images_generated_total",
    ):
        assert needle in exprs, f"dashboard lacks a query with {needle!r}"


def test_every_dashboard_query_names_an_exported_metric(exported):
    queries = dashboard_queries()
    assert len(queries) >= 10
    for title, expr in queries:
        expr = re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", expr)
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"panel {title!r} queries metrics the service lacks: {unknown}"


# ---- Kubernetes ------------------------------------------------------------------------


def _k8s_docs() -> dict[str, list[dict]]:
    out = {}
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, f"{path} is empty"
        out[str(path.relative_to(K8S_DIR))] = docs
    return out


def _container_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def test_k8s_manifests_parse_and_kustomizations_list_existing_files():
    docs = _k8s_docs()
    kinds = {d["kind"] for ds in docs.values() for d in ds}
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "Kustomization"):
        assert kind in kinds
    for name, ds in docs.items():
        for d in ds:
            if d["kind"] == "Kustomization":
                folder = (K8S_DIR / name).parent
                for res in d.get("resources", []):
                    assert (folder / res).exists(), f"{name}: missing {res}"
                for patch in d.get("patches", []):
                    assert (folder / patch["path"]).is_file(), f"{name}: missing {patch}"


def test_k8s_deployment_probes_match_the_service(app_surface):
    _, serving = app_surface
    assert {HEALTH, READY} <= serving, "the app should answer 200 on /healthz and /readyz"
    docs = _k8s_docs()
    (dep,) = [d for d in docs["base/deployment.yaml"] if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert _container_port(c, "http") == PORT
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PORT"] == str(PORT)
    assert c["livenessProbe"]["httpGet"]["path"] == HEALTH
    assert c["readinessProbe"]["httpGet"]["path"] == READY
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert _container_port(c, c[probe]["httpGet"]["port"]) == PORT, probe
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    # preStop sleep, then SIGTERM, then the drain: all inside the grace period.
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and 0 < int(sleep[1]) < pod["terminationGracePeriodSeconds"]
    assert pod["securityContext"]["runAsNonRoot"] is True

    (svc,) = [d for d in docs["base/service.yaml"] if d["kind"] == "Service"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (sp,) = svc["spec"]["ports"]
    assert _container_port(c, sp["targetPort"]) == PORT

    (hpa,) = [d for d in docs["base/hpa.yaml"] if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert any(m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_k8s_gpu_variant_requests_a_gpu():
    docs = _k8s_docs()
    (patch,) = docs["gpu/deployment-gpu.yaml"]
    (c,) = patch["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["TAMING_DEVICE"].startswith("cuda")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (built-in kustomize) missing")
@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_k8s_kustomize_builds(overlay):
    proc = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR / overlay)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == READY
    if overlay == "gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["image"].endswith(":gpu")


# ---- GPU autoscaling: the Prometheus adapter and KEDA ----------------------------------

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (built-in kustomize) missing"
)


def _kustomize(folder: str) -> list[dict]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR / folder)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _adapter_rules() -> list[dict]:
    config = _one(_kustomize("prometheus-adapter"), "ConfigMap")
    return yaml.safe_load(config["data"]["config.yaml"])["rules"]


@needs_kubectl
def test_gpu_overlay_replaces_pods_in_place_and_scales_on_the_queue(exported):
    docs = _kustomize("gpu")
    dep, hpa = _one(docs, "Deployment"), _one(docs, "HorizontalPodAutoscaler")
    # A full GPU pool has no GPU for a surge pod: take one down, then start its successor.
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}
    }
    assert _one(_kustomize("base"), "Deployment")["spec"]["strategy"]["rollingUpdate"][
        "maxUnavailable"] == 0, "the CPU base still surges"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods", "no CPU rule: a busy GPU leaves the CPU idle"
    assert metric["pods"]["metric"]["name"] == "taming_queue_depth"
    assert "taming_queue_depth" in exported
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0


@needs_kubectl
def test_prometheus_adapter_serves_the_hpa_metric_per_pod():
    (metric,) = _one(_kustomize("gpu"), "HorizontalPodAutoscaler")["spec"]["metrics"]
    config = _one(_kustomize("prometheus-adapter"), "ConfigMap")
    assert config["metadata"]["namespace"] == "monitoring"
    (rule,) = [r for r in _adapter_rules() if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    assert metric_names(rule["seriesQuery"]) == {"taming_queue_depth"}
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}
    }
    # One value per pod, whatever the operation and model labels.
    query = rule["metricsQuery"]
    assert query.startswith("sum by (<<.GroupBy>>)") and "<<.Series>>{<<.LabelMatchers>>}" in query


@needs_kubectl
def test_keda_overlay_scales_the_gpu_deployment_on_the_same_queue():
    docs = _kustomize("gpu-keda")
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"], (
        "KEDA makes its own HPA; a second one would fight it"
    )
    dep, scaled = _one(docs, "Deployment"), _one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert metric_names(query) == {"taming_queue_depth"}
    pods = re.search(r'pod=~"([^"]+)"', query).group(1)
    assert re.fullmatch(pods, dep["metadata"]["name"] + "-5d8f9c7b6-x2k4q"), "the pods' names"
    # The same target and bounds as the adapter's HPA.
    hpa = _one(_kustomize("gpu"), "HorizontalPodAutoscaler")["spec"]
    (metric,) = hpa["metrics"]
    assert float(trigger["metadata"]["threshold"]) == float(metric["pods"]["target"]["averageValue"])
    assert trigger["metadata"].get("metricType", "AverageValue") == "AverageValue"
    bounds = (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"])
    assert bounds == (hpa["minReplicas"], hpa["maxReplicas"])


@needs_kubectl
def test_deployment_docs_show_the_adapter_rule_and_the_keda_overlay():
    text = (ROOT / "docs" / "deployment.md").read_text()
    assert "kubectl apply -k deploy/k8s/gpu-keda" in text
    assert "kubectl apply -k deploy/k8s/prometheus-adapter" in text
    # The Helm values in the docs carry the same rule as the ConfigMap.
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    helm = [b for b in blocks if isinstance(b, dict) and "custom" in b.get("rules", {})]
    assert helm and helm[0]["rules"]["custom"] == _adapter_rules()


def test_k8s_taming_variables_are_server_settings():
    from service.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    docs = _k8s_docs()
    for name in ("base/deployment.yaml", "gpu/deployment-gpu.yaml"):
        (dep,) = docs[name]
        for c in dep["spec"]["template"]["spec"]["containers"]:
            for var in c["env"]:
                if var["name"].startswith(prefix):
                    field = var["name"][len(prefix):].lower()
                    assert field in Settings.model_fields, f"{name}: {var['name']} is no server setting"
