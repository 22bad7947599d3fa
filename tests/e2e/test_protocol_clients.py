"""The ecosystem's clients against a real server process: the `openai` package on the OpenAI
Images API (/v1) and `tritonclient[http]` on the Open Inference Protocol (/v2).

Every answer is compared with the native endpoints' for the same inputs (same seed and class
-> same pixels), and the protocols' errors reach each client as its own exceptions.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton
from PIL import Image
from service_helpers import ROOT, free_port, metric, serving_models, wait_ready
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.slow  # a real server process (or kustomize) per module

KEY = "protocol-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def auth() -> dict:
    """A fresh header dict per call: tritonclient adds its own headers to the one it gets."""
    return dict(AUTH)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m service` on the shipped models (tiny ones until those are trained), with
    an API key; yields (base URL, access log path)."""
    port = free_port()
    models = serving_models()
    log = tmp_path_factory.mktemp("protocols") / "access.log"
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "TAMING_TORCH_THREADS": "1",
           "TAMING_COMPILE": "false", "TAMING_LOG_LEVEL": "info", "TAMING_API_KEYS": KEY,
           "TAMING_CHECKPOINT_DIR": str(models["checkpoint_dir"]),
           "TAMING_MODELS": ",".join(models["models"]), "PYTHONPATH": str(ROOT)}
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(base, proc)
        yield base, log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def base(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def model(base) -> dict:
    """The default generator's metadata (the native GET /models/{name})."""
    name = serving_models()["models"][0]
    return httpx.get(f"{base}/models/{name}", headers=auth()).json()


@pytest.fixture(scope="module")
def oai(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tc(base):
    client = triton.InferenceServerClient(base.removeprefix("http://"), network_timeout=120,
                                          connection_timeout=120)
    yield client
    client.close()


def pixels(png: str | bytes) -> np.ndarray:
    data = base64.b64decode(png) if isinstance(png, str) else png
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    a = np.asarray(im)
    return a[..., None] if a.ndim == 2 else a


def native_generate(base: str, **body) -> dict:
    r = httpx.post(f"{base}/generate", json=body, timeout=120,
                   headers={**AUTH, "Accept": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()


def native_images(answer: dict) -> np.ndarray:
    return np.stack([pixels(im["png"]) for im in answer["images"]])


def native_tokens(answer: dict) -> np.ndarray:
    return np.asarray([im["tokens"] for im in answer["images"]], dtype=np.int64)


# ---- OpenAI Images API -----------------------------------------------------------------
def test_openai_generations_equal_native_generate(oai, base, model):
    name, classes = model["name"], model["classes"]
    h, w = model["image_size"]
    out = oai.images.generate(model=name, prompt=classes[3], n=3, size=f"{w}x{h}",
                              response_format="b64_json", extra_body={"seed": 1234})
    native = native_generate(base, model=name, label=3, n=3, seed=1234)
    got = np.stack([pixels(d.b64_json) for d in out.data])
    assert got.shape == (3, h, w, model["channels"])
    assert np.array_equal(got, native_images(native))
    assert [d.model_extra["seed"] for d in out.data] == [1234, 1235, 1236]
    # a class by index, and the sampling settings as extra body fields
    settings = {"seed": 77, "temperature": 0.8, "top_k": 20, "top_p": 0.9}
    by_index = oai.images.generate(model=name, prompt="3", extra_body=settings)
    native = native_generate(base, model=name, label=3, **settings)
    assert np.array_equal(pixels(by_index.data[0].b64_json), native_images(native)[0])
    assert len(np.unique(got.reshape(3, -1), axis=0)) == 3  # three different images


def test_openai_empty_prompt_is_unconditional(oai, base, model):
    out = oai.images.generate(model=model["name"], prompt="", n=2, extra_body={"seed": 9})
    native = native_generate(base, model=model["name"], n=2, seed=9)
    assert np.array_equal(np.stack([pixels(d.b64_json) for d in out.data]),
                          native_images(native))


@pytest.mark.slow
def test_openai_larger_canvas_equals_native_wide_grid(oai, base, model):
    (h, w), (rows, cols) = model["image_size"], model["grid"]
    out = oai.images.generate(model=model["name"], prompt="1", size=f"{2 * w}x{h}",
                              extra_body={"seed": 5})
    native = native_generate(base, model=model["name"], label=1, seed=5, grid=[rows, 2 * cols])
    got = pixels(out.data[0].b64_json)
    assert got.shape[:2] == (h, 2 * w)
    assert np.array_equal(got, native_images(native)[0])


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # OpenAI retired theirs
def test_openai_variations_keep_the_image_tokens_then_sample(oai, base, model):
    name = model["name"]
    source = native_generate(base, model=name, label=2, seed=11)
    png = base64.b64decode(source["images"][0]["png"])
    out = oai.images.create_variation(image=("digit.png", png, "image/png"), model=name, n=2,
                                      response_format="b64_json",
                                      extra_body={"seed": 40, "keep": 0.5})
    # the native way: encode the upload, keep the first half of its tokens, sample the rest
    enc = httpx.post(f"{base}/encode", params={"model": name}, content=png,
                     headers={**AUTH, "Content-Type": "image/png"}, timeout=60)
    assert enc.status_code == 200, enc.text
    tokens = np.asarray(enc.json()["tokens"][0]).reshape(-1)
    kept = tokens[: tokens.size // 2].tolist()
    native = native_generate(base, model=name, n=2, seed=40, prefix=kept)
    assert np.array_equal(native_tokens(native).reshape(2, -1)[:, : len(kept)],
                          np.asarray([kept, kept]))
    assert np.array_equal(np.stack([pixels(d.b64_json) for d in out.data]),
                          native_images(native))


def test_openai_edits_repaint_the_masks_transparent_pixels(oai, base, model):
    name = model["name"]
    h, w = model["image_size"]
    source = native_generate(base, model=name, label=4, seed=12)
    png = base64.b64decode(source["images"][0]["png"])
    mask = np.full((h, w, 4), 255, dtype=np.uint8)
    mask[h // 3: 2 * h // 3, :, 3] = 0  # transparent: edited
    buf = io.BytesIO()
    Image.fromarray(mask, "RGBA").save(buf, format="PNG")
    out = oai.images.edit(image=("digit.png", png, "image/png"),
                          mask=("mask.png", buf.getvalue(), "image/png"), prompt="4",
                          model=name, n=2, response_format="b64_json", extra_body={"seed": 50})
    native = native_generate(base, model=name, label=4, n=2, seed=50,
                             image=base64.b64encode(png).decode(),
                             mask=base64.b64encode(buf.getvalue()).decode())
    assert np.array_equal(np.stack([pixels(d.b64_json) for d in out.data]),
                          native_images(native))
    assert out.size == f"{w}x{h}"


def test_openai_models_list_and_retrieve(oai, base):
    native = httpx.get(f"{base}/models", headers=auth()).json()
    listed = oai.models.list()
    assert [m.id for m in listed.data] == [m["name"] for m in native["models"]]
    one = oai.models.retrieve(native["default"])
    assert (one.id, one.object, one.owned_by) == (native["default"], "model", "taming")
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def _openai_error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert exc.body == body["error"] and body["error"]["message"]
    return body["error"]


def test_openai_bad_requests_raise_bad_request_error(oai, base, model):
    before = httpx.get(f"{base}/metrics").text
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(model=model["name"], prompt="a zebra")
    err = _openai_error(e.value)
    assert err["param"] == "prompt" and err["type"] == "invalid_request_error"
    assert all(c in err["message"] for c in model["classes"]), "the message names the classes"
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(model=model["name"], prompt="1", response_format="url")
    assert _openai_error(e.value)["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(model=model["name"], prompt="1", size="1024x1024")
    assert _openai_error(e.value)["param"] == "size"
    with pytest.raises(openai.BadRequestError) as e:  # the native 422, as a 400
        oai.images.generate(model=model["name"], prompt="1", n=65)
    assert _openai_error(e.value)["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:  # nothing sent is silently dropped
        oai.images.generate(model=model["name"], prompt="1", quality="hd")
    assert _openai_error(e.value)["param"] == "quality"
    with pytest.raises(openai.BadRequestError) as e, pytest.warns(DeprecationWarning):
        oai.images.create_variation(image=("x.png", b"not an image", "image/png"),
                                    model=model["name"])
    assert _openai_error(e.value)["code"] == "invalid_image"
    after = httpx.get(f"{base}/metrics").text
    assert metric(after, "taming_images_generated_total") == metric(
        before, "taming_images_generated_total"), "no bad request sampled anything"


def test_openai_wrong_key_raises_authentication_error(base, model):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.images.generate(model=model["name"], prompt="1")
    assert _openai_error(e.value)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


# ---- Open Inference Protocol (KServe v2) ------------------------------------------------
def test_triton_health_and_metadata(tc, model):
    name = model["name"]
    assert tc.is_server_live() and tc.is_server_ready()
    meta = tc.get_server_metadata(headers=auth())
    assert "binary_tensor_data" in meta["extensions"]
    for op in ("generate", "encode", "decode"):
        assert tc.is_model_ready(f"{name}-{op}", headers=auth())
    gen = tc.get_model_metadata(f"{name}-generate", headers=auth())
    assert [(t["name"], t["datatype"]) for t in gen["inputs"]] == [("LABEL", "INT64"),
                                                                   ("SEED", "INT64")]
    assert [(t["name"], t["datatype"]) for t in gen["outputs"]] == [("IMAGE", "UINT8"),
                                                                    ("TOKENS", "INT64")]
    enc = tc.get_model_metadata(f"{name}-encode", headers=auth())
    assert enc["inputs"][0]["shape"] == [-1, *model["image_size"], model["channels"]]
    assert not tc.is_model_ready("no-such-generate", headers=auth())


def _tensor(name: str, arr: np.ndarray, binary: bool) -> triton.InferInput:
    t = triton.InferInput(name, list(arr.shape), "UINT8" if arr.dtype == np.uint8 else "INT64")
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_generate_equals_native_generate(tc, base, model, binary):
    name = model["name"]
    labels, seeds = np.array([4, 4], dtype=np.int64), np.array([300, 301], dtype=np.int64)
    outputs = [triton.InferRequestedOutput(o, binary_data=binary) for o in ("IMAGE", "TOKENS")]
    res = tc.infer(f"{name}-generate", [_tensor("LABEL", labels, binary),
                                        _tensor("SEED", seeds, binary)],
                   outputs=outputs, headers=auth(), parameters={"top_k": 50})
    native = native_generate(base, model=name, label=4, n=2, seed=300, top_k=50)
    assert np.array_equal(res.as_numpy("IMAGE"), native_images(native))
    assert np.array_equal(res.as_numpy("TOKENS"), native_tokens(native))


def test_triton_rows_of_other_labels_and_seeds_each_equal_native(tc, base, model):
    name = model["name"]
    labels, seeds = np.array([1, 6, 6], dtype=np.int64), np.array([10, 99, 7], dtype=np.int64)
    res = tc.infer(f"{name}-generate", [_tensor("LABEL", labels, True),
                                        _tensor("SEED", seeds, True)], headers=auth())
    images = res.as_numpy("IMAGE")
    for i, (label, seed) in enumerate(zip(labels.tolist(), seeds.tolist(), strict=True)):
        native = native_generate(base, model=name, label=label, seed=seed)
        assert np.array_equal(images[i], native_images(native)[0]), i
    res = tc.infer(f"{name}-generate", [_tensor("SEED", np.array([5], np.int64), True)],
                   headers=auth())  # no LABEL: unconditional
    assert np.array_equal(res.as_numpy("IMAGE"), native_images(
        native_generate(base, model=name, seed=5)))


def test_triton_encode_and_decode_equal_native(tc, base, model):
    name = model["name"]
    source = native_generate(base, model=name, label=8, n=2, seed=21)
    images = native_images(source)
    res = tc.infer(f"{name}-encode", [_tensor("IMAGE", images, True)], headers=auth())
    tokens = res.as_numpy("TOKENS")
    files = [("files", (f"{i}.png", base64.b64decode(im["png"]), "image/png"))
             for i, im in enumerate(source["images"])]
    enc = httpx.post(f"{base}/encode", params={"model": name}, files=files, headers=auth())
    assert np.array_equal(tokens, np.asarray(enc.json()["tokens"]))
    res = tc.infer(f"{name}-decode", [_tensor("TOKENS", tokens, False)], headers=auth())
    dec = httpx.post(f"{base}/decode", json={"model": name, "tokens": tokens.tolist()},
                     headers={**AUTH, "Accept": "application/json"})
    assert np.array_equal(res.as_numpy("IMAGE"), native_images(dec.json()))


def test_triton_errors_reach_the_client(tc, base, model):
    name = model["name"]
    with pytest.raises(InferenceServerException) as e:
        tc.infer(f"{name}-generate", [_tensor("LABEL", np.array([99], np.int64), True)],
                 headers=auth())
    assert e.value.status() == "400" and "unknown class 99" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        tc.infer("no-such-decode", [_tensor("TOKENS", np.zeros((1, 2, 2), np.int64), True)],
                 headers=auth())
    assert e.value.status() == "404" and f"{name}-decode" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        tc.infer(f"{name}-decode", [_tensor("TOKENS", np.full((1, 2, 2), 10**6, np.int64),
                                            True)], headers=auth())
    assert e.value.status() == "400" and "token ids" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        tc.infer(f"{name}-generate", [_tensor("SEED", np.array([1], np.int64), True)],
                 parameters={"temprature": 0.5}, headers=auth())
    assert e.value.status() == "400" and "temprature" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        tc.get_model_metadata(f"{name}-generate", headers={"Authorization": "Bearer wrong"})
    assert e.value.status() == "401"


def test_protocol_requests_share_the_native_metrics_and_access_log(base, server, oai, tc,
                                                                  model):
    name = model["name"]
    before = httpx.get(f"{base}/metrics").text
    oai.images.generate(model=name, prompt="1", n=2, extra_body={"seed": 3})
    tc.infer(f"{name}-generate", [_tensor("SEED", np.array([3, 4], np.int64), True)],
             headers=auth())
    after = httpx.get(f"{base}/metrics").text
    for endpoint in ("/v1/images/generations", "/v2/models/{name}/infer"):
        assert metric(after, "taming_requests_total", endpoint=endpoint, model=name,
                      status="200") >= 1 + metric(before, "taming_requests_total",
                                                  endpoint=endpoint, model=name, status="200")
    made = metric(after, "taming_images_generated_total", model=name) - metric(
        before, "taming_images_generated_total", model=name)
    assert made == 4
    lines = [json.loads(x) for x in server[1].read_text().splitlines() if x.startswith("{")]
    v2 = [x for x in lines if x["endpoint"] == "/v2/models/{name}/infer" and x["status"] == 200]
    assert v2 and v2[-1]["model"] == name and v2[-1]["images"] == 2
    assert "queue_ms" in v2[-1] and "compute_ms" in v2[-1]
