"""The KServe InferenceService (deploy/k8s/kserve): rendered by kustomize and checked against
the real app, in the style of tests/test_deploy.py: its probes are paths the app answers 200
on, its port and settings are the server's, it scales on concurrency, and the deployment docs
say when to pick it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # a real server process (or kustomize) per module

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "k8s" / "kserve"
PORT = 8000
LIVE, READY = "/v2/health/live", "/v2/health/ready"


def _rendered() -> list[dict]:
    """`kubectl kustomize` when kubectl is here (what `kubectl apply -k` sends), else the
    files the kustomization lists."""
    if shutil.which("kubectl"):
        proc = subprocess.run(["kubectl", "kustomize", str(KSERVE)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [d for d in yaml.safe_load_all(proc.stdout) if d]
    kust = yaml.safe_load((KSERVE / "kustomization.yaml").read_text())
    return [d for res in kust["resources"]
            for d in yaml.safe_load_all((KSERVE / res).read_text()) if d]


@pytest.fixture(scope="module")
def isvc() -> dict:
    (doc,) = [d for d in _rendered() if d["kind"] == "InferenceService"]
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    return doc


@pytest.fixture(scope="module")
def container(isvc) -> dict:
    (c,) = isvc["spec"]["predictor"]["containers"]
    return c


@pytest.fixture(scope="module")
def answering() -> set[str]:
    """The probe paths the real app (shipped checkpoints) answers 200 on, without a key."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(checkpoint_dir=ROOT / "checkpoints", api_keys=["k"])
    with TestClient(create_app(settings)) as client:
        return {p for p in (LIVE, READY) if client.get(p).status_code == 200}


def test_inference_service_probes_the_protocol_health_routes(container, answering):
    assert {LIVE, READY} <= answering, "the v2 health routes answer 200, keys or not"
    assert container["livenessProbe"]["httpGet"]["path"] == LIVE
    assert container["readinessProbe"]["httpGet"]["path"] == READY
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == PORT, probe


def test_inference_service_serves_the_server_port_and_settings(isvc, container):
    from service.settings import Settings

    (port,) = container["ports"]
    assert port["containerPort"] == PORT and port["name"] in ("http1", "h2c")
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PORT"] == str(PORT)
    prefix = Settings.model_config["env_prefix"]
    for name in env:
        if name.startswith(prefix):
            assert name[len(prefix):].lower() in Settings.model_fields, name
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    predictor = isvc["spec"]["predictor"]
    assert predictor["securityContext"]["runAsNonRoot"] is True
    # a request may take the server's deadline; the route and the drain give it that long
    deadline = float(env["TAMING_REQUEST_TIMEOUT_S"])
    assert predictor["timeout"] > deadline
    assert predictor["terminationGracePeriodSeconds"] > deadline


def test_inference_service_scales_on_concurrency(isvc):
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    assert predictor["scaleMetric"] == "concurrency"
    assert predictor["scaleTarget"] >= 1
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    # no hard cap in front of the server: its own queue bound answers 503 with Retry-After
    assert predictor["containerConcurrency"] == 0


def test_deployment_docs_say_when_to_pick_the_inference_service():
    text = (ROOT / "docs" / "deployment.md").read_text()
    assert "kubectl apply -k deploy/k8s/kserve" in text
    assert "InferenceService" in text and "/v2/health/ready" in text
