"""Property-based fuzzing of every operation in the server's own OpenAPI schema (schemathesis).

Valid and invalid requests (wrong types, missing fields, out-of-range numbers, odd bodies and
query strings) go over a real socket. Every answer must be: never a 5xx, a status the schema
documents, an error in the one JSON shape; and the server must still be ready afterwards.

The suite runs a fixed budget (FUZZ_CASES per operation, derandomized: the same cases on every
run) on tiny models; `bench/fuzz.sh` runs a larger budget on the shipped checkpoints.
"""

from __future__ import annotations

import os
from collections import Counter
from urllib.parse import urlsplit

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis.checks import content_type_conformance, not_a_server_error, status_code_conformance
from service_helpers import live_server, serving_models, settings, tiny_models

from service.app import create_app

pytestmark = pytest.mark.slow  # hundreds of generated requests: the fuzz runs in `make test`

CASES = int(os.environ.get("FUZZ_CASES", "25"))
REAL = os.environ.get("FUZZ_MODELS") == "shipped"
SEEN: Counter = Counter()


@pytest.fixture(scope="module")
def base_url():
    with live_server(create_app(_settings())) as url:
        yield url


def _settings():
    models = serving_models(every=True) if REAL else tiny_models("mnist", "fashion-mnist")
    return settings(**models, max_body_bytes=256 * 1024, max_image_pixels=512 * 512,
                    max_images=8, max_grid=14, request_timeout_s=60)


# the schema the running app serves (building it needs no model)
SCHEMA = schemathesis.openapi.from_dict(create_app(_settings()).openapi())
OPERATIONS = {f"{op.method.upper()} {op.path}": op
              for op in (r.ok() for r in SCHEMA.get_all_operations())}
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# negative cases need something to break: parameters or a body
RUNS = [(label, mode) for label, op in sorted(OPERATIONS.items()) for mode in (POSITIVE, NEGATIVE)
        if mode is POSITIVE or {"parameters", "requestBody"} & set(op.definition.raw)]


def check_error_shape(response: schemathesis.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        ctype = response.headers.get("content-type") or [""]
        assert ctype[0].startswith("application/json"), response.headers
        body = response.json()
        assert set(body) == {"error"}, body
        path = urlsplit(response.request.url).path
        if path.startswith("/v2"):  # the Open Inference Protocol's shape
            assert isinstance(body["error"], str) and body["error"], body
            return
        shape = {"message", "type", "param", "code"} if path.startswith("/v1/") else {
            "code", "message"}  # OpenAI's shape under /v1
        assert set(body["error"]) == shape, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize("label,mode", RUNS, ids=[f"{lab}-{m.value}" for lab, m in RUNS])
def test_fuzzed_requests_get_documented_answers(label, mode, base_url):
    @hypothesis.given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def run(case):
        response = case.call(base_url=base_url, timeout=120)
        SEEN[label] += 1
        SEEN[response.status_code] += 1
        try:
            check_error_shape(response)
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                     content_type_conformance])
        except AssertionError as e:
            raise AssertionError(f"{e}\nreproduce: {case.as_curl_command()}") from None

    run()


def test_still_ready_and_correct_after_the_fuzzing(base_url):
    assert sum(v for k, v in SEEN.items() if isinstance(k, str)) >= len(OPERATIONS) * CASES, SEEN
    print("fuzz cases:", dict(SEEN))
    assert requests.get(f"{base_url}/readyz", timeout=10).status_code == 200
    r = requests.post(f"{base_url}/generate", json={"seed": 1, "label": 3}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    metrics = requests.get(f"{base_url}/metrics", timeout=10).text
    assert 'status="500"' not in metrics and "taming_in_flight_requests 0.0" in metrics
