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
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_helpers import live_server, serving_models, settings, tiny_models

from service.app import create_app
from service.registry import load_models

pytestmark = pytest.mark.slow  # hundreds of generated requests: the fuzz runs in `make test`

CASES = int(os.environ.get("FUZZ_CASES", "25"))
REAL = os.environ.get("FUZZ_MODELS") == "shipped"
SEEN: Counter = Counter()


@pytest.fixture(scope="module")
def base_url():
    with live_server(APP) as url:
        yield url


def _settings():
    models = serving_models(every=True) if REAL else tiny_models("mnist", "fashion-mnist")
    return settings(**models, max_body_bytes=256 * 1024, max_image_pixels=512 * 512,
                    max_images=8, max_grid=14, request_timeout_s=60)


# the app under test, its models loaded first: the schema it serves carries their bounds
APP = create_app(_settings(), models=load_models(_settings()))
SCHEMA = schemathesis.openapi.from_dict(APP.openapi())
OPERATIONS = {f"{op.method.upper()} {op.path}": op
              for op in (r.ok() for r in SCHEMA.get_all_operations())}
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# negative cases need something to break: parameters or a body
RUNS = [(label, mode) for label, op in sorted(OPERATIONS.items()) for mode in (POSITIVE, NEGATIVE)
        if mode is POSITIVE or {"parameters", "requestBody"} & set(op.definition.raw)]


# Bodies the schema can only call bytes (images, the /v2 binary tensor extension): whether
# they are readable is not a schema's to say, so schema-valid bytes may be refused.
BINARY_BODIES = {"POST /encode", "POST /v1/images/variations", "POST /v1/images/edits",
                 "POST /v2/models/{name}/infer"}
# Refusals that depend on which model or grid a request names, where the schema holds the
# widest bounds of the models served: a class of one model is no class of another; a /v1
# prompt is free text in OpenAI's schema and names a class here; a prefix is bounded by the
# grid's cells and its rows by the grid's columns; an edit's source ids by the model's
# codebook and its rows' lengths (a grid is rectangular, which JSON Schema cannot say), and its
# mask and offset by the source's shape.
MODEL_DEPENDENT = ("unknown class", "is no class of model", "prefix row",
                   "longer than the grid's", "tokens:", "mask", "offset",
                   "source")


def _integral_floats(node) -> bool:
    """JSON Schema's integers include 6.0; the server takes JSON integers only (docs/api.md:
    requests are strict), so a case holding one is not valid data for this server."""
    if isinstance(node, float):
        return node.is_integer()
    if isinstance(node, dict):
        return any(_integral_floats(v) for v in node.values())
    if isinstance(node, list):
        return any(_integral_floats(v) for v in node)
    return False


def schema_valid_data_is_accepted(ctx, response, case):
    """schemathesis's positive_data_acceptance wherever JSON Schema can say what the server
    takes: a schema-valid request is never refused for a bound the schema does not carry."""
    # uploads (and /generate's multipart form, an image and its mask) are judged by their bytes
    if (case.operation.label in BINARY_BODIES or case.media_type == "multipart/form-data"
            or _integral_floats(case.body)):
        return None
    if response.status_code in (400, 422):
        error = response.json().get("error")
        message = error if isinstance(error, str) else (error or {}).get("message", "")
        if any(m in message for m in MODEL_DEPENDENT):
            return None
    return positive_data_acceptance(ctx, response, case)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance, negative_data_rejection,
          schema_valid_data_is_accepted]


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
            case.validate_response(response, checks=CHECKS)
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
