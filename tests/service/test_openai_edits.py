"""OpenAI's `POST /v1/images/edits` through the official `openai` client, on the shipped mnist
and landscapes models: the same pixels as /generate with `image` and `mask` (transparent =
edit) or a larger `grid` (the image centred), and errors in OpenAI's shape."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
from service_helpers import REAL, live_server, metric, png_array, png_of, settings

from service.app import create_app

JSON = {"Accept": "application/json"}
MODELS = {"mnist": ("3", 3, 4), "landscapes": ("", None, 8)}  # prompt, label, pixels a cell

pytestmark = pytest.mark.skipif(
    not all((REAL / m / "transformer.safetensors").is_file() for m in MODELS),
    reason="the shipped mnist and landscapes models are not here")


@pytest.fixture(scope="module")
def base():
    app = create_app(settings(checkpoint_dir=REAL, models=list(MODELS), generate_slots=8))
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def oai(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)


def native(base: str, **body) -> list[dict]:
    r = httpx.post(f"{base}/generate", json=body, headers=JSON, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["images"]


def source(base: str, model: str, seed: int) -> bytes:
    label = MODELS[model][1]
    return base64.b64decode(native(base, model=model, label=label, seed=seed)[0]["png"])


def hole(png: bytes, rows: slice, cols: slice) -> bytes:
    """An RGBA mask of the image's size, transparent over rows x cols."""
    h, w = png_array(png).shape[:2]
    a = np.full((h, w, 4), 255, dtype=np.uint8)
    a[rows, cols, 3] = 0
    return png_of(a)


@pytest.mark.parametrize("model", list(MODELS))
def test_an_edit_is_native_inpainting_with_the_same_seed(oai, base, model):
    prompt, label, f = MODELS[model]
    png = source(base, model, 3)
    mask = hole(png, slice(2 * f, 4 * f), slice(None))
    out = oai.images.edit(image=("in.png", png, "image/png"), mask=("m.png", mask, "image/png"),
                          prompt=prompt, model=model, n=2, response_format="b64_json",
                          extra_body={"seed": 30})
    want = native(base, model=model, label=label, n=2, seed=30, image=base64.b64encode(png).decode(),
                  mask=base64.b64encode(mask).decode())
    assert [d.b64_json for d in out.data] == [im["png"] for im in want]
    assert [d.model_extra["seed"] for d in out.data] == [30, 31]
    h, w = png_array(png).shape[:2]
    assert out.size == f"{w}x{h}"


@pytest.mark.parametrize("model", list(MODELS))
def test_a_larger_size_extends_the_image_centred(oai, base, model):
    prompt, label, f = MODELS[model]
    png = source(base, model, 4)
    h, w = png_array(png).shape[:2]
    size = f"{w + 4 * f}x{h + 2 * f}"
    out = oai.images.edit(image=("in.png", png, "image/png"), prompt=prompt, model=model,
                          size=size, extra_body={"seed": 8})
    grid = [(h + 2 * f) // f, (w + 4 * f) // f]
    want = native(base, model=model, label=label, seed=8, image=base64.b64encode(png).decode(),
                  grid=grid)
    assert out.data[0].b64_json == want[0]["png"]
    assert out.size == size
    tokens = np.array(want[0]["tokens"])
    enc = httpx.post(f"{base}/encode?model={model}", content=png,
                     headers={"Content-Type": "image/png"}).json()["tokens"][0]
    assert (tokens[1:1 + h // f, 2:2 + w // f] == np.array(enc)).all()


def test_without_a_mask_the_images_transparent_pixels_are_edited(oai, base):
    png = source(base, "mnist", 5)
    gray = png_array(png)
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., :3] = gray[..., None]
    rgba[..., 3] = 255
    rgba[20:, :, 3] = 0
    out = oai.images.edit(image=("in.png", png_of(rgba), "image/png"), prompt="3",
                          model="mnist", extra_body={"seed": 2})
    want = native(base, model="mnist", label=3, seed=2, image=base64.b64encode(png_of(rgba)).decode(),
                  mask=base64.b64encode(hole(png, slice(20, None), slice(None))).decode())
    assert out.data[0].b64_json == want[0]["png"]


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_bad_edits_raise_bad_request_error_and_sample_nothing(oai, base):
    png = source(base, "mnist", 6)
    good_mask = ("m.png", hole(png, slice(0, 8), slice(None)), "image/png")
    before = metric(httpx.get(f"{base}/metrics").text, "taming_images_generated_total")
    cases = [
        (dict(mask=("m.png", png_of(np.zeros((20, 28, 4), np.uint8)), "image/png")), "mask"),
        (dict(mask=("m.png", b"not an image", "image/png")), "mask"),
        (dict(mask=("m.png", png, "image/png")), "mask"),  # no alpha channel
        (dict(), "mask"),  # nothing to edit: no mask, no transparency, its own size
        (dict(mask=good_mask, size="20x20"), "size"),
        (dict(mask=good_mask, size="30x28"), "size"),  # not whole tokens
        (dict(mask=good_mask, response_format="url"), "response_format"),
        (dict(mask=good_mask, prompt="a zebra"), "prompt"),
        (dict(mask=good_mask, n=65), "n"),
    ]
    for kw, param in cases:
        kw = {"prompt": "3", **kw}
        with pytest.raises(openai.BadRequestError) as e:
            oai.images.edit(image=("in.png", png, "image/png"), model="mnist", **kw)
        err = _error(e.value)
        assert (err["param"], err["type"]) == (param, "invalid_request_error"), (kw, err)
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.edit(image=("in.png", b"no image", "image/png"), mask=good_mask, prompt="3",
                        model="mnist")
    assert (_error(e.value)["param"], _error(e.value)["code"]) == ("image", "invalid_image")
    after = metric(httpx.get(f"{base}/metrics").text, "taming_images_generated_total")
    assert after == before
