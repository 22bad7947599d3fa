"""Holes found from the outside and closed where they were made (tiny models): lengths parsed
strictly, every error of a protocol route in that protocol's shape, a queue bound that holds
for every job, a deadline that counts the body's time, a body that must arrive in time, the
pixel limit quoted as ours, /v1 sizes that are WxH or refused, and a schema whose references
resolve and whose bounds are the code's."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient
from service_helpers import (
    assert_error,
    async_client,
    metric,
    png_header,
    record_queue,
    settings,
    tiny_models,
)

from service.app import create_app

INFER = "/v2/models/mnist-decode/infer"
OCTETS = {"Content-Type": "application/octet-stream"}


def _limited(**kw):
    return settings(**tiny_models("mnist", "fashion-mnist"), max_body_bytes=64 * 1024,
                    max_image_pixels=100 * 100, max_queue=8, **kw)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(_limited()), raise_server_exceptions=False) as c:
        yield c


def assert_v2_error(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def assert_openai_error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---- lengths: ASCII digits, bounded, sent once ------------------------------------------
BAD_LENGTHS = [b"\xb2", b"1" * 4301, b"9" * 19, b"-1", b"+2", b" 2x", b"0x2", b"", b"2.0",
               b"\xd9\xa2"]  # superscript two, 4301 digits, ..., an Arabic-Indic two


def test_inference_header_length_is_ascii_digits_or_400_in_the_v2_shape():
    """Raw header bytes (httpx's ASGI transport passes them as sent; the TestClient would
    re-encode them): `\xb2` is latin-1's superscript two, which str.isdigit() accepts."""
    app = create_app(_limited())

    async def main():
        async with async_client(app) as c:
            return [await c.post(INFER, content=b"{}", headers=[
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", v)]) for v in BAD_LENGTHS]

    for value, r in zip(BAD_LENGTHS, asyncio.run(main()), strict=True):
        assert "Inference-Header-Content-Length" in assert_v2_error(r, 400), value


def test_a_repeated_inference_header_length_is_refused(client):
    r = client.post(INFER, content=b"{}{}", headers=[
        ("Content-Type", "application/octet-stream"),
        ("Inference-Header-Content-Length", "2"), ("Inference-Header-Content-Length", "4")])
    assert "given 2 times" in assert_v2_error(r, 400)
    # sent once, the same length is read (the request then fails on its missing inputs)
    r = client.post(INFER, content=b"{}", headers={**OCTETS,
                                                   "Inference-Header-Content-Length": "2"})
    assert "inputs" in assert_v2_error(r, 400)


def test_every_error_on_the_protocol_routes_has_their_shape(client, monkeypatch):
    big = b"0" * (64 * 1024 + 1)
    assert "exceeds" in assert_v2_error(client.post(INFER, content=big, headers=OCTETS), 413)
    assert assert_openai_error(client.post("/v1/images/generations", content=big, headers={
        "Content-Type": "application/json"}), 413)["code"] == "payload_too_large"
    assert_v2_error(client.get("/v2/models/mnist-decode/nothing"), 404)
    assert_v2_error(client.get(INFER), 405)
    assert_openai_error(client.get("/v1/images/generations"), 405)
    assert_error(client.get("/nothing"), 404, "not_found")  # the native shape elsewhere

    def broken(*args, **kwargs):  # a bug inside a /v2 handler
        raise RuntimeError("boom")

    monkeypatch.setattr("service.routers.inference_v2._parse", broken)
    r = client.post(INFER, content=b"{}", headers={"Content-Type": "application/json"})
    assert assert_v2_error(r, 500) == "internal server error"


# ---- the queue bound holds for every job -------------------------------------------------
def test_a_request_larger_than_the_queue_bound_is_refused_even_by_an_empty_queue(client):
    err = assert_error(client.post("/generate", json={"n": 9}), 422, "too_many_images")
    assert "TAMING_MAX_QUEUE" in err["message"] and "8" in err["message"]
    grids = [[[1] * 7] * 7] * 9
    assert_error(client.post("/decode", json={"tokens": grids}), 422, "too_many_images")
    rows = {"inputs": [{"name": "SEED", "shape": [9], "datatype": "INT64",
                        "data": list(range(9))}]}
    assert "TAMING_MAX_QUEUE" in assert_v2_error(
        client.post("/v2/models/mnist-generate/infer", json=rows), 400)
    assert "TAMING_MAX_QUEUE" in assert_openai_error(client.post(
        "/v1/images/generations", json={"prompt": "", "n": 9}), 400)["message"]
    assert client.post("/generate", json={"n": 8, "seed": 1}).status_code == 200


def test_two_requests_the_size_of_the_bound_never_queue_more_than_it():
    """The issue's reproduction: with TAMING_MAX_QUEUE=8, concurrent requests of 64 images
    put 64 in the queue; now each request fits the bound, and the queue never exceeds it."""
    app = create_app(_limited(generate_slots=1))
    peaks: list[int] = []

    async def main():
        async with async_client(app) as c:
            record_queue(app.state.service.admission, peaks)
            big = await asyncio.gather(*[c.post("/generate", json={"n": 64}) for _ in range(2)])
            fits = await asyncio.gather(*[c.post("/generate", json={"n": 8, "seed": i})
                                          for i in range(4)])
            return big, fits

    big, fits = asyncio.run(main())
    assert [r.status_code for r in big] == [422, 422]
    assert {r.status_code for r in fits} <= {200, 503} and 200 in {r.status_code for r in fits}
    assert peaks and max(peaks) <= 8, peaks


# ---- the body: in time, and inside the request's deadline ---------------------------------
async def _slow(body: bytes, pieces: int, gap_s: float):
    step = -(-len(body) // pieces)
    for i in range(0, len(body), step):
        yield body[i:i + step]
        await asyncio.sleep(gap_s)


def test_the_request_deadline_counts_the_time_its_body_took():
    """A 41-byte body sent over 41 s got its 200: the deadline started once the body was in.
    It runs from the header now: a body slower than the deadline leaves nothing to work in."""
    app = create_app(_limited(request_timeout_s=0.6, body_timeout_s=30))
    body = json.dumps({"seed": 1, "n": 1}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}

    async def main():
        async with async_client(app) as c:
            fast = await c.post("/generate", content=body, headers=headers)
            slow = await c.post("/generate", content=_slow(body, 4, 0.3), headers=headers)
            decode = await c.post("/decode", content=_slow(json.dumps(
                {"tokens": [[1] * 7] * 7}).encode(), 4, 0.3), headers=headers)
            return fast, slow, decode

    fast, slow, decode = asyncio.run(main())
    assert fast.status_code == 200
    assert "of its arrival" in assert_error(slow, 504, "deadline_exceeded")["message"]
    assert "of its arrival" in assert_error(decode, 504, "deadline_exceeded")["message"]


def test_a_body_slower_than_the_body_timeout_gets_408_and_the_connection_closes():
    app = create_app(_limited(body_timeout_s=0.5))
    body = json.dumps({"seed": 1}).encode()

    async def main():
        async with async_client(app) as c:
            slow = await c.post("/generate", content=_slow(body, 8, 0.25),
                                headers={"Content-Type": "application/json"})
            v2 = await c.post(INFER, content=_slow(b"{}" * 8, 8, 0.25), headers=OCTETS)
            ok = await c.post("/generate", content=_slow(body, 2, 0.1),
                              headers={"Content-Type": "application/json"})
            return slow, v2, ok, (await c.get("/metrics")).text

    slow, v2, ok, text = asyncio.run(main())
    err = assert_error(slow, 408, "request_timeout")
    assert "body" in err["message"] and "0.5 s" in err["message"]
    assert slow.headers["connection"] == "close"
    assert "body" in assert_v2_error(v2, 408)
    assert ok.status_code == 200  # a body inside the timeout, in pieces, is served
    assert metric(text, "taming_requests_total", endpoint="/generate", status="408") == 1
    assert metric(text, "taming_in_flight_requests") == 0


# ---- smaller holes ------------------------------------------------------------------------
def test_a_huge_upload_is_refused_quoting_our_pixel_limit_not_pillows(client):
    for w, h in ((100_000, 100_000), (200, 200)):
        r = client.post("/encode", content=png_header(w, h), headers={
            "Content-Type": "image/png"})
        message = assert_error(r, 413, "image_too_large")["message"]
        assert f"{w}x{h}" in message and "limit of 10000 pixels" in message, message
        assert "178956970" not in message


@pytest.mark.parametrize("size", ["28 x 28", " 28x28", "28x28 ", "28X28", "028x28", "\u00b2x28",
                                  "28x28x28", "x28", "1e2x28", "28_0x28", "28×28"])
def test_openai_size_is_wxh_in_ascii_digits_or_400(client, size):
    r = client.post("/v1/images/generations", json={"prompt": "3", "size": size})
    assert "WxH" in assert_openai_error(r, 400, "size")["message"]


def test_openai_size_is_echoed_as_sent_when_it_is_wxh(client):
    r = client.post("/v1/images/generations", json={"prompt": "3", "size": "28x28", "seed": 1})
    assert r.status_code == 200 and r.json()["size"] == "28x28"
    wide = client.post("/v1/images/generations", json={"prompt": "3", "size": "56x28"})
    assert wide.status_code == 200 and wide.json()["size"] == "56x28"


def test_a_repeated_or_bad_content_length_is_refused_by_the_request_layer():
    """Below a server whose parser lets them through, the request layer still refuses them
    (the real server's parser refuses them first: tests/e2e/test_service_hostile.py)."""
    app = create_app(_limited())
    middleware = app.build_middleware_stack()

    async def call(headers: list[tuple[bytes, bytes]]) -> tuple[int, dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/decode", "raw_path": b"/decode",
                 "query_string": b"", "headers": headers, "http_version": "1.1",
                 "scheme": "http", "server": ("t", 80), "client": ("c", 1), "root_path": ""}
        await middleware(scope, receive, send)
        return sent[0]["status"], json.loads(sent[1]["body"])

    for lengths in ([b"2", b"2"], [b"2", b"3"], [b"\xb2"], [b"1" * 4301]):
        status, body = asyncio.run(call([(b"content-length", v) for v in lengths]))
        assert status == 400 and body["error"]["code"] == "bad_request", body


# ---- the schema ---------------------------------------------------------------------------
def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [
            r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_schema_reference_resolves_and_bounds_are_the_codes(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    refs = _refs(schema)
    assert "#/components/schemas/RequestTensor" in refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in components, ref
    body = lambda path, media="application/json": schema["paths"][path]["post"][  # noqa: E731
        "requestBody"]["content"][media]["schema"]
    gen = body("/v1/images/generations")["properties"]
    top_p = next(o for o in gen["top_p"]["anyOf"] if o.get("type") == "number")
    assert top_p["exclusiveMinimum"] == 0 and top_p["maximum"] == 1
    temperature = next(o for o in gen["temperature"]["anyOf"] if o.get("type") == "number")
    assert temperature["minimum"] > 0
    form = body("/v1/images/variations", "multipart/form-data")["properties"]
    assert form["top_p"]["exclusiveMinimum"] == 0 and form["temperature"]["minimum"] > 0
    grid = next(o for o in body("/generate")["properties"]["grid"]["anyOf"]
                if o.get("type") == "array")
    assert grid["items"] == {"type": "integer", "minimum": 7, "maximum": 32}  # tiny: 7x7..32
    one, many = body("/decode")["properties"]["tokens"]["anyOf"]
    assert one["maxItems"] == 32 and one["items"]["maxItems"] == 32
    assert one["items"]["items"] == {"type": "integer", "minimum": 0, "maximum": 15}
    assert many["maxItems"] == 64 and many["items"] == one


def _grid_schema(schema: dict) -> dict:
    return next(o for o in schema["paths"]["/generate"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]["grid"]["anyOf"] if o.get("type") == "array")


def test_the_schema_built_before_the_models_load_is_rebuilt_with_their_bounds():
    app = create_app(_limited())
    assert "maximum" not in _grid_schema(app.openapi())["items"]  # no model known yet
    with TestClient(app) as c:
        assert _grid_schema(c.get("/openapi.json").json())["items"]["maximum"] == 32


def test_two_apps_keep_their_own_schema_bounds():
    """The documented bodies are module-level dicts shared by every app: each app's schema
    is a copy, bounded by its own models and settings."""
    with TestClient(create_app(_limited(max_grid=12))) as a, \
            TestClient(create_app(_limited(max_grid=20))) as b:
        got = (_grid_schema(a.get("/openapi.json").json())["items"]["maximum"],
               _grid_schema(b.get("/openapi.json").json())["items"]["maximum"])
    assert got == (12, 20)
