"""The HTTP contract's happy paths: every endpoint, headers, content negotiation, metadata,
metrics, API keys and CORS. Runs on the shipped models once trained, tiny ones until then."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import (
    assert_error,
    metric,
    png_array,
    png_of,
    serving_models,
    settings,
    tiny_models,
    tiny_root,
)

from service.app import create_app

JSON = {"Accept": "application/json"}
EXTRA = [str(tiny_root() / "rgb"), str(tiny_root() / "tokenizer-only")]


@pytest.fixture(scope="module")
def client():
    kw = serving_models()
    kw["models"] = kw["models"] + EXTRA
    with TestClient(create_app(settings(**kw))) as c:
        yield c


@pytest.fixture(scope="module")
def info(client) -> dict:
    return client.get("/models/mnist").json()


def test_health_and_readiness(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["status"] == "ready" and "mnist" in r.json()["models"]


def test_models_metadata(client, info):
    r = client.get("/models")
    assert r.status_code == 200
    body = r.json()
    assert body["default"] == "mnist"
    names = [m["name"] for m in body["models"]]
    assert "mnist" in names and "rgb" in names
    for key in ("name", "image_size", "channels", "grid", "codebook_size", "classes",
                "defaults", "digest", "evaluation", "max_grid", "can_generate"):
        assert key in info, key
    assert info["image_size"] == [28, 28] and info["channels"] == 1 and info["grid"] == [7, 7]
    assert len(info["classes"]) == 10 and info["digest"].startswith("sha256:")
    assert set(info["defaults"]) == {"temperature", "top_k", "top_p", "cfg_scale"}
    assert client.get("/models/rgb").json()["channels"] == 3
    assert client.get("/models/tokenizer-only").json()["can_generate"] is False


def test_unknown_model_and_path_traversal_are_404(client):
    assert_error(client.get("/models/nope"), 404, "model_not_found")
    assert_error(client.get("/models/..%2F..%2Fetc%2Fpasswd"), 404)
    # "/models/.." itself the client resolves to "/" (the playground) before sending
    assert_error(client.get("/models/%2E%2E"), 404, "model_not_found")
    assert_error(client.post("/generate", json={"model": "../checkpoints/mnist"}), 404)
    assert_error(client.post("/encode?model=%2Fetc", content=b"x",
                             headers={"content-type": "image/png"}), 404)


def test_generate_png_default(client, info):
    r = client.post("/generate", json={"seed": 1, "label": 3})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "1" and r.headers["x-model"] == "mnist"
    assert r.headers["x-request-id"]
    assert png_array(r.content).shape == tuple(info["image_size"])


def test_generate_empty_body_uses_defaults_and_returns_its_seed(client):
    r = client.post("/generate")
    assert r.status_code == 200, r.text
    seed = int(r.headers["x-seed"])
    again = client.post("/generate", json={"seed": seed})
    assert again.content == r.content


def test_generate_n_gives_a_tiled_png(client):
    r = client.post("/generate", json={"n": 4, "seed": 2})
    assert r.status_code == 200
    assert png_array(r.content).shape == (2 * 28 + 2, 2 * 28 + 2)


def test_generate_json_images_tokens_and_seeds(client, info):
    K = info["codebook_size"]
    r = client.post("/generate", json={"n": 3, "seed": 10, "label": 5},
                    headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-seed"] == "10"
    body = r.json()
    assert body["model"] == "mnist" and body["seed"] == 10 and len(body["images"]) == 3
    for i, im in enumerate(body["images"]):
        assert im["seed"] == 10 + i
        tokens = np.array(im["tokens"])
        assert tokens.shape == (7, 7) and tokens.min() >= 0 and tokens.max() < K
        assert png_array(base64.b64decode(im["png"])).shape == (28, 28)
        # each image alone, from its own seed, is the same image
        alone = client.post("/generate", json={"n": 1, "seed": 10 + i, "label": 5},
                            headers={"Accept": "application/json"}).json()["images"][0]
        assert alone["tokens"] == im["tokens"] and alone["png"] == im["png"]
        # and its tokens decode to the same picture
        dec = client.post("/decode", json={"tokens": im["tokens"]})
        assert dec.content == base64.b64decode(im["png"])


def test_accept_negotiation(client):
    png = client.post("/generate", json={"seed": 4}, headers={"Accept": "*/*"})
    assert png.headers["content-type"] == "image/png"
    png = client.post("/generate", json={"seed": 4},
                      headers={"Accept": "image/png, application/json;q=0.5"})
    assert png.headers["content-type"] == "image/png"
    js = client.post("/generate", json={"seed": 4},
                     headers={"Accept": "application/json, image/png;q=0.1"})
    assert js.headers["content-type"] == "application/json"


def test_generate_label_by_name_and_index_agree(client, info):
    name = info["classes"][7]
    a = client.post("/generate", json={"seed": 5, "label": 7}).content
    b = client.post("/generate", json={"seed": 5, "label": name}).content
    c = client.post("/generate", json={"seed": 5, "label": name.upper()}).content
    assert a == b == c


def test_generate_greedy_top_k_1_ignores_the_seed(client):
    a = client.post("/generate", json={"seed": 1, "label": 2, "top_k": 1}).content
    b = client.post("/generate", json={"seed": 99, "label": 2, "top_k": 1}).content
    assert a == b


def test_generate_sampling_settings_and_guidance(client):
    """Every setting at once is taken, reproducibly, and each one changes what is sampled."""
    body = {"seed": 3, "label": 1, "temperature": 0.7, "top_k": 8, "top_p": 0.9,
            "cfg_scale": 2.0, "n": 2}

    def tokens(**change) -> list:
        r = client.post("/generate", json={**body, **change}, headers=JSON)
        assert r.status_code == 200, r.text
        assert r.json()["seed"] == 3
        return [im["tokens"] for im in r.json()["images"]]

    first = tokens()
    assert len(first) == 2 and first[0] != first[1]  # image i samples with seed + i
    assert tokens() == first
    for change in ({"cfg_scale": 1.0}, {"temperature": 1.3, "top_k": None, "top_p": 1.0},
                   {"label": 2}):
        assert tokens(**change) != first, change


def test_generate_wider_grid_slides_the_window(client, info):
    K = info["codebook_size"]
    r = client.post("/generate", json={"seed": 1, "grid": [7, 10]},
                    headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    tokens = np.array(r.json()["images"][0]["tokens"])
    assert tokens.shape == (7, 10) and 0 <= tokens.min() and tokens.max() < K
    png = client.post("/generate", json={"seed": 1, "grid": [7, 10]}).content
    assert png_array(png).shape == (28, 40)


def test_generate_keeps_the_prefix(client):
    prefix = [1, 2, 3, 0, 0, 0, 0, 4, 5, 6]
    r = client.post("/generate", json={"seed": 8, "prefix": prefix, "n": 2},
                    headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    for im in r.json()["images"]:
        assert sum(im["tokens"], [])[: len(prefix)] == prefix
    rows = [prefix[:7], prefix[7:]]
    r2 = client.post("/generate", json={"seed": 8, "prefix": rows, "n": 2},
                     headers={"Accept": "application/json"})
    assert r2.json() == r.json()


def test_generate_on_a_tokenizer_only_model_is_422(client):
    assert_error(client.post("/generate", json={"model": "tokenizer-only"}), 422,
                 "generator_unavailable")


def _digit() -> np.ndarray:
    a = np.zeros((28, 28), np.uint8)
    a[6:22, 12:16] = 255
    return a


@pytest.mark.parametrize("fmt,ctype", [("PNG", "image/png"), ("JPEG", "image/jpeg"),
                                       ("WEBP", "image/webp")])
def test_encode_raw_body(client, info, fmt, ctype):
    buf = io.BytesIO()
    Image.fromarray(_digit()).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    r = client.post("/encode", content=buf.getvalue(), headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "mnist" and body["shape"] == [7, 7]
    tokens = np.array(body["tokens"])
    assert tokens.shape == (1, 7, 7) and tokens.min() >= 0
    assert tokens.max() < info["codebook_size"]


def test_encode_multipart_several_files_and_model_query(client):
    files = [("files", (f"d{i}.png", png_of(np.roll(_digit(), i, axis=1)), "image/png"))
             for i in range(3)]
    r = client.post("/encode?model=mnist", files=files)
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert len(tokens) == 3
    single = client.post("/encode", content=png_of(np.roll(_digit(), 2, axis=1)),
                         headers={"content-type": "image/png"}).json()["tokens"][0]
    assert tokens[2] == single  # the same image gives the same grid alone or in a batch


def _encode(client, arr: np.ndarray, model: str = "mnist", **save) -> list:
    r = client.post(f"/encode?model={model}", content=png_of(arr, **save),
                    headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["tokens"][0]


def test_encode_conversion_policy(client):
    gray = _digit()
    base = _encode(client, gray)
    assert base != _encode(client, np.zeros_like(gray))  # the checks below can tell apart
    # RGB input to a grayscale model: converted by luma, equal for a gray image
    assert _encode(client, np.stack([gray] * 3, -1)) == base
    # alpha is composited onto black: transparent white pixels count as black
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = gray
    assert _encode(client, rgba) == base
    # 16-bit PNG scaled to 8 bits
    assert _encode(client, gray.astype(np.uint16) * 257) == base
    # a larger square image is resized; a non-square one padded, never cropped
    assert np.array(_encode(client, np.kron(gray, np.ones((2, 2), np.uint8)))).shape == (7, 7)
    assert np.array(_encode(client, np.zeros((10, 30), np.uint8))).shape == (7, 7)
    # a 1x1 image and a grayscale image for an RGB model
    assert np.array(_encode(client, np.full((1, 1), 200, np.uint8))).shape == (7, 7)
    assert np.array(_encode(client, gray, model="rgb")).shape == (7, 7)


def test_encode_cmyk_jpeg(client):
    buf = io.BytesIO()
    Image.fromarray(_digit()).convert("CMYK").save(buf, format="JPEG")
    r = client.post("/encode", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    buf = io.BytesIO()
    Image.fromarray(_digit()).save(buf, format="JPEG")  # the same JPEG, in gray
    own = client.post("/encode", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    cmyk, gray = np.array(r.json()["tokens"]), np.array(own.json()["tokens"])
    assert cmyk.shape == (1, 7, 7) and (cmyk == gray).all()  # CMYK read as the same gray


def test_decode_png_json_and_several_grids(client, info):
    grid = [[(i * 7 + j) % info["codebook_size"] for j in range(7)] for i in range(7)]
    r = client.post("/decode", json={"tokens": grid})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-model"] == "mnist"
    assert png_array(r.content).shape == (28, 28)
    r = client.post("/decode", json={"model": "mnist", "tokens": [grid, grid]},
                    headers={"Accept": "application/json"})
    body = r.json()
    assert body["shape"] == [7, 7] and len(body["images"]) == 2
    one = client.post("/decode", json={"tokens": grid}).content
    assert base64.b64decode(body["images"][1]["png"]) == one
    tiled = client.post("/decode", json={"tokens": [grid, grid, grid]}).content
    assert png_array(tiled).shape == (58, 58)


def test_decode_any_grid_size(client):
    r = client.post("/decode", json={"tokens": [[3] * 12] * 10})
    assert r.status_code == 200
    assert png_array(r.content).shape == (40, 48)
    r = client.post("/decode", json={"tokens": [[1]]})
    assert png_array(r.content).shape == (4, 4)


def test_rgb_model_outputs_rgb(client):
    r = client.post("/generate", json={"model": "rgb", "seed": 1, "label": "green"})
    assert r.status_code == 200, r.text
    assert png_array(r.content).shape == (28, 28, 3)


def test_request_id_is_echoed_or_made(client):
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    made = r.headers["x-request-id"]
    assert made != "bad id with spaces" and len(made) == 32
    assert client.get("/healthz").headers["x-request-id"] not in (made, "abc-123")


def test_docs_and_openapi_examples(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/generate", "/encode", "/decode", "/models", "/models/{name}", "/healthz",
                 "/readyz", "/metrics"):
        assert path in spec["paths"], path
    gen = spec["paths"]["/generate"]["post"]
    assert gen["requestBody"]["content"]["application/json"]["examples"]
    assert "image/png" in gen["responses"]["200"]["content"]
    assert "image/png" in spec["paths"]["/encode"]["post"]["requestBody"]["content"]
    assert "ErrorBody" in spec["components"]["schemas"]


def test_docs_examples_work(client):
    spec = client.get("/openapi.json").json()
    for path in ("/generate", "/decode"):
        examples = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"][
            "examples"]
        for name, ex in examples.items():
            value = dict(ex["value"])
            if value.get("model") not in (None, "mnist") and value["model"] not in [
                    m["name"] for m in client.get("/models").json()["models"]]:
                continue
            r = client.post(path, json=value)
            assert r.status_code == 200, (path, name, r.text)
            assert r.headers["content-type"] == "image/png" and png_array(r.content).size
            if "seed" in value:
                assert r.headers["x-seed"] == str(value["seed"]), (path, name)


DESIGN_FAMILIES = ["taming_requests_total", "taming_request_duration_seconds_bucket",
                   "taming_queue_wait_seconds_bucket", "taming_batch_duration_seconds_bucket",
                   "taming_batch_size_bucket", "taming_queue_depth", "taming_in_flight_requests",
                   "taming_rejected_total", "taming_images_generated_total",
                   "taming_tokens_sampled_total", "taming_model_info", "taming_slots_active",
                   "taming_time_to_first_row_seconds_bucket"]


def test_metric_families_exist_and_count(client):
    client.get("/healthz")  # a request answered, so the request series exist even run alone
    before = client.get("/metrics").text
    for family in DESIGN_FAMILIES:
        assert f"\n{family}" in before, family
    assert client.post("/generate", json={"n": 3, "seed": 1}).status_code == 200
    client.post("/generate", json={"n": 0})
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    d = lambda name, **kw: metric(text, name, **kw) - metric(before, name, **kw)  # noqa: E731
    assert d("taming_requests_total", endpoint="/generate", model="mnist", status="200") == 1
    assert d("taming_requests_total", endpoint="/generate", status="422") == 1
    assert d("taming_images_generated_total", model="mnist") == 3
    assert d("taming_tokens_sampled_total", model="mnist") == 3 * 49
    # /generate's forwards are sampling steps: one per grid cell, the three images together
    steps = 49
    assert d("taming_batch_size_count", operation="generate", model="mnist") == steps
    assert d("taming_batch_size_sum", operation="generate", model="mnist") == 3 * steps
    assert d("taming_step_duration_seconds_count", model="mnist") == steps
    assert metric(text, "taming_slots_active", model="mnist") == 0
    assert d("taming_request_duration_seconds_count", endpoint="/generate") == 2
    assert metric(text, "taming_model_info", model="mnist") == 1
    assert metric(text, "taming_in_flight_requests") == 0
    assert metric(text, "taming_queue_depth", operation="generate", model="mnist") == 0


def test_api_keys_protect_inference_not_health():
    s = settings(**tiny_models("mnist"), api_keys="k1, k2")
    with TestClient(create_app(s)) as c:
        assert_error(c.post("/generate", json={"seed": 1}), 401, "unauthorized")
        r = c.post("/generate", json={"seed": 1}, headers={"Authorization": "Bearer wrong"})
        assert_error(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(c.get("/models"), 401)
        assert_error(c.post("/decode", json={"tokens": [[1]]}), 401)
        assert_error(c.post("/encode", content=png_of(_digit()),
                            headers={"content-type": "image/png"}), 401)
        ok = {"Authorization": "Bearer k2"}
        assert c.post("/generate", json={"seed": 1}, headers=ok).status_code == 200
        assert c.get("/models/mnist", headers=ok).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200  # open unless TAMING_PROTECT_METRICS
    s = settings(**tiny_models("mnist"), api_keys="k1", protect_metrics=True)
    with TestClient(create_app(s)) as c:
        assert_error(c.get("/metrics"), 401)
        assert c.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_inference_asks_for_the_bearer_key_only_when_keys_are_set(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not any("security" in paths[p]["post"] for p in ("/generate", "/encode", "/decode"))
    s = settings(**tiny_models("mnist"), api_keys="k1")
    with TestClient(create_app(s)) as c:
        schema = c.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path in ("/generate", "/encode", "/decode"):
        assert schema["paths"][path]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_cors_off_by_default_and_on_when_configured(client):
    r = client.get("/healthz", headers={"Origin": "https://example.com"})
    assert "access-control-allow-origin" not in r.headers
    s = settings(**tiny_models("mnist"), cors_origins="https://example.com")
    with TestClient(create_app(s)) as c:
        r = c.get("/healthz", headers={"Origin": "https://example.com"})
        assert r.headers["access-control-allow-origin"] == "https://example.com"
        r = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_the_served_tokenizer_answers_as_the_eager_vqvae(client):
    """The server runs the VQ-VAE as frozen TorchScript graphs where it can: its answers are
    the eager model's own."""
    vq = client.app.state.service.models["mnist"].bundle.vqvae
    grids = [[[i * 7 + j for j in range(7)] for i in range(7)], [[3] * 7] * 7]
    decoded = client.post("/decode", json={"model": "mnist", "tokens": grids},
                          headers={"accept": "application/json"})
    assert decoded.status_code == 200, decoded.text
    pngs = [base64.b64decode(im["png"]) for im in decoded.json()["images"]]
    with torch.inference_mode():
        pixels = vq.decode_pixels(torch.tensor(grids)).numpy()
    assert [png_array(p).tolist() for p in pngs] == [p[..., 0].tolist() for p in pixels]
    files = [("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    encoded = client.post("/encode?model=mnist", files=files)
    assert encoded.status_code == 200, encoded.text
    with torch.inference_mode():
        tokens = vq.encode_pixels(torch.from_numpy(pixels)).tolist()
    assert encoded.json()["tokens"] == tokens
