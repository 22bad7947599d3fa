"""Every bad input gets its status and the one error shape, and nothing else changes.
(Tiny models: validation does not depend on trained weights.)
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import assert_error, png_header, png_of, settings, tiny_models

from service.app import create_app


def _limited():
    return settings(**tiny_models("mnist", "fashion-mnist"), max_body_bytes=64 * 1024,
                    max_image_pixels=100 * 100, max_images=4, max_grid=12)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(_limited())) as c:
        yield c


BAD_GENERATE = [
    ({"n": 0}, "n"), ({"n": 65}, "n"), ({"n": "3"}, "n"), ({"n": 1.5}, "n"), ({"n": True}, "n"),
    ({"n": None}, "n"),
    ({"temperature": 0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": 1e308}, "temperature"),
    ({"temperature": 1e-300}, "temperature"), ({"cfg_scale": 1e308}, "cfg_scale"),
    ({"top_k": 0}, "top_k"), ({"top_k": 17}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_p": -0.5}, "top_p"),
    ({"label": 10}, "class"), ({"label": -1}, "class"), ({"label": "dragon"}, "class"),
    ({"label": True}, "label"), ({"label": [1]}, "label"),
    ({"grid": [6, 7]}, "smaller"), ({"grid": [7, 6]}, "smaller"), ({"grid": [13, 7]}, "maximum"),
    ({"grid": [7]}, "grid"), ({"grid": [7, 7, 7]}, "grid"), ({"grid": [7, "7"]}, "grid"),
    ({"grid": [7.0, 7]}, "grid"),
    ({"prefix": list(range(16)) * 4}, "prefix"), ({"prefix": [16]}, "prefix"),
    ({"prefix": [-1]}, "prefix"), ({"prefix": [2**70]}, "prefix"), ({"prefix": [1.5]}, "prefix"),
    ({"prefix": ["a"]}, "prefix"),
    ({"prefix": [[1, 2], [3]]}, "prefix"), ({"prefix": [1, [2]]}, "prefix"),
    ({"seed": -1}, "seed"), ({"seed": 2**70}, "seed"), ({"seed": "42"}, "seed"),
    ({"cfg_scale": "x"}, "cfg_scale"), ({"model": 5}, "model"),
    ({"temprature": 1.0}, "temprature"),
]


@pytest.mark.parametrize("body,word", BAD_GENERATE, ids=[str(b) for b, _ in BAD_GENERATE])
def test_bad_generate_parameters_are_422(client, body, word):
    err = assert_error(client.post("/generate", json=body), 422)
    assert word in err["message"], err


@pytest.mark.parametrize("raw", ['{"temperature": NaN}', '{"temperature": Infinity}',
                                 '{"cfg_scale": -Infinity}', '{"top_p": NaN}'])
def test_nan_and_infinity_are_422(client, raw):
    assert_error(client.post("/generate", content=raw,
                             headers={"content-type": "application/json"}), 422)


@pytest.mark.parametrize("raw", ["not json", "{", "[1, 2]", "3", '"s"', "null", b"\xff",
                                 "[" * 5000 + "]" * 5000])
def test_not_json_or_wrong_shape_is_422(client, raw):
    assert_error(client.post("/generate", content=raw,
                             headers={"content-type": "application/json"}), 422)
    assert_error(client.post("/decode", content=raw,
                             headers={"content-type": "application/json"}), 422)


def test_unknown_model_is_404(client):
    assert_error(client.post("/generate", json={"model": "cifar"}), 404, "model_not_found")
    assert_error(client.post("/decode", json={"model": "cifar", "tokens": [[1]]}), 404)
    assert_error(client.get("/models/cifar"), 404)
    assert_error(client.post("/encode?model=cifar", content=b"x",
                             headers={"content-type": "image/png"}), 404, "model_not_found")
    # a name longer than any model's is refused as a bad value, before any lookup
    assert_error(client.post("/encode?model=" + "m" * 129, content=b"x",
                             headers={"content-type": "image/png"}), 422)


def test_unknown_route_and_wrong_method(client):
    assert_error(client.get("/nope"), 404, "not_found")
    r = client.get("/generate")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["allow"]
    assert_error(client.post("/healthz"), 405)


def test_body_over_the_limit_is_413(client):
    big = {"prefix": [1] * 40000}
    assert_error(client.post("/generate", json=big), 413, "payload_too_large")
    assert client.get("/readyz").status_code == 200


@pytest.mark.slow  # under the test client, dropping the rest of the body waits out LINGER_S
def test_streamed_body_over_the_limit_is_413(client):
    def chunks():  # no Content-Length: the streamed size decides
        for _ in range(100):
            yield b" " * 1024

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    assert client.get("/readyz").status_code == 200


BAD_DECODE = [
    ({"tokens": [[16]]}, "[0, 16)"), ({"tokens": [[-1]]}, "[0, 16)"),
    ({"tokens": [[2**70]]}, "[0, 16)"), ({"tokens": [[-(2**70)]]}, "[0, 16)"),
    ({"tokens": [[1, 2], [3]]}, "ragged"), ({"tokens": [[[1, 2]], [[1], [2]]]}, "shape"),
    ({"tokens": [[1] * 13]}, "maximum"), ({"tokens": [[1]] * 13}, "maximum"),
    ({"tokens": []}, "empty"), ({"tokens": [[]]}, "empty"), ({"tokens": [[[]]]}, "empty"),
    ({"tokens": [[1.5]]}, "tokens"), ({"tokens": [["1"]]}, "tokens"),
    ({"tokens": [[True]]}, "tokens"), ({"tokens": 5}, "tokens"), ({}, "tokens"),
    ({"tokens": [[[1]]] * 5}, "at most 4"), ({"tokens": [[1]], "extra": 1}, "extra"),
]


@pytest.mark.parametrize("body,word", BAD_DECODE, ids=[str(b)[:40] for b, _ in BAD_DECODE])
def test_bad_decode_input_is_422(client, body, word):
    err = assert_error(client.post("/decode", json=body), 422)
    assert word in err["message"], err


def _digit_png() -> bytes:
    a = np.zeros((28, 28), np.uint8)
    a[5:20, 10:14] = 255
    return png_of(a)


def _post_image(client, data: bytes, ctype: str = "image/png"):
    return client.post("/encode", content=data, headers={"content-type": ctype})


def test_pixel_limit_is_decided_from_the_header(client):
    # 100 megapixels claimed, a few bytes sent: refused before any decoding
    assert_error(_post_image(client, png_header(10_000, 10_000)), 413, "image_too_large")
    assert_error(_post_image(client, png_header(101, 100)), 413, "image_too_large")
    # within the limit, the same kind of file fails later, as corrupt data
    assert_error(_post_image(client, png_header(100, 100)), 422, "invalid_image")


def test_not_an_image_truncated_and_bad_crc_are_422(client):
    assert_error(_post_image(client, b"hello, not an image"), 422, "invalid_image")
    good = _digit_png()
    assert_error(_post_image(client, good[: len(good) // 2]), 422, "invalid_image")
    bad_crc = bytearray(good)
    bad_crc[29] ^= 0xFF  # inside the IHDR chunk's CRC
    assert_error(_post_image(client, bytes(bad_crc)), 422, "invalid_image")
    assert_error(_post_image(client, b""), 422)


def test_unsupported_media_types_are_415(client):
    assert_error(_post_image(client, _digit_png(), "text/plain"), 415, "unsupported_media_type")
    assert_error(client.post("/encode", json={"x": 1}), 415)
    assert_error(client.post("/encode", content=_digit_png(), headers={}), 415)
    gif = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(gif, format="GIF")
    assert_error(_post_image(client, gif.getvalue()), 415, "unsupported_media_type")


def test_animated_images_are_422(client):
    frames = [Image.fromarray(np.full((28, 28), v, np.uint8)) for v in (0, 255)]
    apng = io.BytesIO()
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:])
    assert_error(_post_image(client, apng.getvalue()), 422, "animated_image")
    webp = io.BytesIO()
    frames[0].save(webp, format="WEBP", save_all=True, append_images=frames[1:])
    assert_error(_post_image(client, webp.getvalue(), "image/webp"), 422, "animated_image")


def test_multipart_limits(client):
    files = [("files", (f"{i}.png", _digit_png(), "image/png")) for i in range(5)]
    assert_error(client.post("/encode", files=files), 422)
    assert_error(client.post("/encode", data={"a": "b"},
                             headers={"content-type": "multipart/form-data; boundary=x"}), 422)
    bad = [("files", ("a.png", _digit_png(), "image/png")),
           ("files", ("b.png", b"xx", "image/png"))]
    err = assert_error(client.post("/encode", files=bad), 422, "invalid_image")
    assert "image 1" in err["message"]


def test_still_ready_and_serving_after_bad_input(client):
    assert client.get("/readyz").status_code == 200
    assert client.post("/generate", json={"seed": 1}).status_code == 200


@pytest.mark.parametrize("path,body", [("/generate", b'{"seed": 1}'),
                                       ("/decode", b'{"tokens": [[1]]}')])
@pytest.mark.parametrize("ctype", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_json_with_the_wrong_content_type_is_415_and_says_so(client, path, body, ctype):
    headers = {"content-type": ctype} if ctype else {}
    err = assert_error(client.post(path, content=body, headers=headers), 415,
                       "unsupported_media_type")
    assert "application/json" in err["message"]


def test_an_empty_body_is_422_where_one_is_needed(client):
    for headers in ({"content-type": "application/json"}, {}):
        err = assert_error(client.post("/decode", content=b"", headers=headers), 422)
        assert "JSON body" in err["message"]
    # /generate's body is optional: all defaults
    assert client.post("/generate", headers={"content-type": "application/json"}).status_code == 200


def test_header_pixels_reads_sizes_without_decoding():
    from service.imaging import header_pixels

    def encoded(w: int, h: int, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, format=fmt)
        return buf.getvalue()

    assert header_pixels([encoded(30, 20, "PNG")]) == 600
    assert header_pixels([encoded(30, 20, "PNG"), encoded(7, 5, "JPEG"),
                          encoded(9, 4, "WEBP")]) == 600 + 35 + 36
    assert header_pixels([png_header(10_000, 10_000)]) == 10**8
    assert header_pixels([encoded(3, 3, "PNG"), b"not an image"]) is None
