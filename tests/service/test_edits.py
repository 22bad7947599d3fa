"""Editing over HTTP on the shipped models (grayscale mnist, colour landscapes): /generate
with a source (`tokens`, or an `image` encoded first) keeps the cells a mask leaves and
samples the rest, on the training grid and on canvases (outpainting with `grid` and
`offset`); bad masks and offsets are refused before anything is sampled."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import (
    REAL,
    assert_error,
    live_server,
    metric,
    png_array,
    png_of,
    settings,
    sse_events,
)

from service.app import create_app

JSON = {"Accept": "application/json"}
STREAM = {"Accept": "text/event-stream"}

pytestmark = pytest.mark.skipif(
    not all((REAL / m / "transformer.safetensors").is_file() for m in ("mnist", "landscapes")),
    reason="the shipped mnist and landscapes models are not here")

# per model: its training grid, a class (None: unconditional), a pixel size per cell
MODELS = {"mnist": ((7, 7), 3, 4), "landscapes": ((16, 16), None, 8)}


@pytest.fixture(scope="module")
def server():
    app = create_app(settings(checkpoint_dir=REAL, models=["mnist", "landscapes"],
                              generate_slots=8))
    with live_server(app) as base:
        yield base


def post(base: str, body: dict | None = None, headers=JSON, **kw) -> httpx.Response:
    return httpx.post(f"{base}/generate", json=body, headers=headers, timeout=300, **kw)


def generated(base: str, model: str, seed: int, **kw) -> dict:
    grid, label, _ = MODELS[model]
    r = post(base, {"model": model, "seed": seed, "label": label, **kw})
    assert r.status_code == 200, r.text
    return r.json()["images"][0]


def edit(base: str, model: str, seed: int, **kw) -> dict:
    label = MODELS[model][1]
    r = post(base, {"model": model, "seed": seed, "label": label, **kw})
    assert r.status_code == 200, r.text
    return r.json()["images"][0]


def encoded(base: str, model: str, png: bytes) -> np.ndarray:
    r = httpx.post(f"{base}/encode?model={model}", content=png,
                   headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    return np.array(r.json()["tokens"][0])


def decoded(base: str, model: str, tokens) -> np.ndarray:
    r = httpx.post(f"{base}/decode", json={"model": model, "tokens": np.asarray(tokens).tolist()},
                   headers=JSON, timeout=60)
    assert r.status_code == 200, r.text
    return png_array(base64.b64decode(r.json()["images"][0]["png"]))


def pixels(image: dict) -> np.ndarray:
    return png_array(base64.b64decode(image["png"]))


def band(shape: tuple[int, int], rows: range) -> np.ndarray:
    """A cell mask sampling whole rows `rows` (true: sample)."""
    m = np.zeros(shape, dtype=bool)
    m[list(rows)] = True
    return m


def transparent_png(size: tuple[int, int], cells: np.ndarray, f: int) -> bytes:
    """An RGBA mask of `size` pixels, transparent over the true cells."""
    a = np.full((*size, 4), 255, dtype=np.uint8)
    a[..., 3] = np.where(np.kron(cells, np.ones((f, f), dtype=bool)), 0, 255)
    return png_of(a)


@pytest.mark.parametrize("model", list(MODELS))
def test_kept_cells_are_the_sources_tokens_and_masked_ones_are_sampled(server, model):
    grid, _, _ = MODELS[model]
    src = np.array(generated(server, model, 11)["tokens"])
    mask = band(grid, range(grid[0] // 3, 2 * grid[0] // 3))
    outs = [np.array(edit(server, model, s, tokens=src.tolist(), mask=mask.tolist())["tokens"])
            for s in (1, 2)]
    for out in outs:
        assert (out[~mask] == src[~mask]).all()
    assert (outs[0][mask] != outs[1][mask]).any()  # sampled: another seed, other codes
    assert (outs[0][mask] != src[mask]).any()


@pytest.mark.parametrize("model", list(MODELS))
def test_an_image_source_keeps_its_encoded_tokens_outside_a_png_mask(server, model):
    grid, _, f = MODELS[model]
    png = base64.b64decode(generated(server, model, 12)["png"])
    src = encoded(server, model, png)
    cells = band(grid, range(1, 3)) | band(grid, range(grid[0] - 2, grid[0]))
    mask = transparent_png((grid[0] * f, grid[1] * f), cells, f)
    image = edit(server, model, 5, image=base64.b64encode(png).decode(),
                 mask=base64.b64encode(mask).decode())
    out = np.array(image["tokens"])
    assert (out[~cells] == src[~cells]).all()
    assert (out[cells] != src[cells]).any()
    assert (pixels(image) == decoded(server, model, out)).all()  # the answer is its decode
    # the same edit sent as multipart files
    label = MODELS[model][1]
    fields = {"model": model, "seed": "5", **({"label": str(label)} if label is not None else {})}
    r = httpx.post(f"{server}/generate", data=fields, files={"image": png, "mask": mask},
                   headers=JSON, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["images"][0]["tokens"] == image["tokens"]


def test_black_pixels_of_an_opaque_mask_mark_the_region(server):
    png = base64.b64decode(generated(server, "mnist", 13)["png"])
    src = encoded(server, "mnist", png)
    gray = np.full((28, 28), 255, dtype=np.uint8)
    gray[9:14, 5:10] = 0  # cells (2..3, 1..2)
    out = np.array(edit(server, "mnist", 6, image=base64.b64encode(png).decode(),
                        mask=base64.b64encode(png_of(gray)).decode())["tokens"])
    cells = np.zeros((7, 7), dtype=bool)
    cells[2:4, 1:3] = True
    assert (out[~cells] == src[~cells]).all()
    assert (out[cells] != src[cells]).any()


@pytest.mark.parametrize("model", list(MODELS))
def test_a_mask_over_everything_is_plain_sampling(server, model):
    grid, _, _ = MODELS[model]
    src = generated(server, model, 21)["tokens"]
    plain = generated(server, model, 4)
    full = edit(server, model, 4, tokens=src, mask=np.ones(grid, bool).tolist())
    assert full["tokens"] == plain["tokens"]
    assert full["png"] == plain["png"]


def test_a_mask_over_every_cell_of_a_canvas_is_the_plain_canvas(server):
    src = generated(server, "landscapes", 22)["tokens"]
    plain = generated(server, "landscapes", 8, grid=[18, 20])
    full = edit(server, "landscapes", 8, tokens=src, grid=[18, 20], offset=[1, 2],
                mask=np.ones((16, 16), bool).tolist())
    assert full["tokens"] == plain["tokens"]


@pytest.mark.parametrize("model", list(MODELS))
def test_an_empty_mask_returns_the_source(server, model):
    grid, _, _ = MODELS[model]
    src = generated(server, model, 31)["tokens"]
    for mask in (None, np.zeros(grid, bool).tolist()):
        body = {"tokens": src} if mask is None else {"tokens": src, "mask": mask}
        out = edit(server, model, 9, **body)
        assert out["tokens"] == src
        assert (pixels(out) == decoded(server, model, src)).all()


@pytest.mark.parametrize("model", list(MODELS))
def test_outpainting_places_the_source_at_the_offset(server, model):
    (h, w), _, f = MODELS[model]
    src = np.array(generated(server, model, 41)["tokens"])
    canvas = [h + 3, w + 5]
    out = np.array(edit(server, model, 2, tokens=src.tolist(), grid=canvas,
                        offset=[3, 1])["tokens"])
    assert out.shape == tuple(canvas)
    assert (out[3:3 + h, 1:1 + w] == src).all()
    # an image source, centred by default
    png = base64.b64decode(generated(server, model, 42)["png"])
    img = edit(server, model, 3, image=base64.b64encode(png).decode(), grid=canvas)
    out = np.array(img["tokens"])
    assert (out[1:1 + h, 2:2 + w] == encoded(server, model, png)).all()
    assert pixels(img).shape[:2] == (canvas[0] * f, canvas[1] * f)


def test_an_image_of_whole_tokens_is_edited_at_its_own_size(server):
    wide = generated(server, "landscapes", 43, grid=[16, 24])
    png = base64.b64decode(wide["png"])
    r = httpx.post(f"{server}/encode?model=landscapes", content=png,
                   headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200
    cells = band((16, 24), range(6, 9))
    out = np.array(edit(server, "landscapes", 1, image=base64.b64encode(png).decode(),
                        mask=cells.tolist())["tokens"])
    assert out.shape == (16, 24)
    # its tokens are those of the whole image encoded at 192x128 (a /encode fits it to 128)
    kept = np.array(edit(server, "landscapes", 1, image=base64.b64encode(png).decode())["tokens"])
    assert (out[~cells] == kept[~cells]).all()
    assert (out[cells] != kept[cells]).any()


def test_edits_are_the_same_alone_and_beside_others(server):
    src = generated(server, "landscapes", 51)["tokens"]
    mask = band((16, 16), range(4, 12)).tolist()
    bodies = [{"model": "landscapes", "seed": 60 + i, "tokens": src, "mask": mask,
               **({"grid": [18, 20], "offset": [1, 2]} if i % 2 else {})} for i in range(4)]
    alone = [post(server, b).json()["images"][0]["tokens"] for b in bodies]
    with ThreadPoolExecutor(6) as pool:
        mnist = [pool.submit(post, server, {"model": "mnist", "n": 4, "seed": i})
                 for i in range(2)]
        together = list(pool.map(lambda b: post(server, b), bodies))
        assert all(f.result().status_code == 200 for f in mnist)
    assert [r.json()["images"][0]["tokens"] for r in together] == alone


@pytest.mark.parametrize("model,grid", [("mnist", None), ("landscapes", [18, 20])])
def test_an_edit_streams_its_rows(server, model, grid):
    (h, w), label, _ = MODELS[model]
    src = generated(server, model, 71)["tokens"]
    body = {"model": model, "seed": 7, "label": label, "tokens": src,
            "mask": band((h, w), range(2, 4)).tolist(), **({"grid": grid} if grid else {})}
    r = post(server, body, headers=STREAM)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    rows = [d for e, d in events if e == "row"]
    name, done = events[-1]
    assert name == "done"
    final = done["images"][0]["tokens"]
    assert [d["row"] for d in rows] == list(range(len(final)))
    assert all(d["tokens"] == final[d["row"]] for d in rows)
    assert final == post(server, body).json()["images"][0]["tokens"]


def metrics(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics").text
    return (metric(text, "taming_images_generated_total"),
            metric(text, "taming_tokens_sampled_total"))


def test_an_edit_counts_only_its_sampled_cells(server):
    src = generated(server, "mnist", 81)["tokens"]
    before = metrics(server)
    edit(server, "mnist", 1, tokens=src, mask=band((7, 7), range(0, 2)).tolist())
    after = metrics(server)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 14)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_bad_sources_masks_and_offsets_are_refused_and_change_nothing(server):
    src = generated(server, "mnist", 91)
    tokens, png = src["tokens"], src["png"]
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.new("RGB", (28, 28)).save(jpeg, "JPEG")
    bad = {
        "a mask of another size": {"image": png, "mask": b64(png_of(rgba[:27]))},
        "a mask of another size for tokens": {"tokens": tokens, "mask": b64(png_of(rgba[:, :20]))},
        "a mask that is no image": {"image": png, "mask": b64(b"not an image at all")},
        "a mask that is no base64": {"image": png, "mask": "!!!"},
        "a ragged mask grid": {"tokens": tokens, "mask": [[True] * 7] * 6 + [[True] * 6]},
        "a mask grid of another shape": {"tokens": tokens, "mask": [[True] * 7] * 6},
        "a ragged token grid": {"tokens": tokens[:6] + [tokens[6][:5]]},
        "token ids past K": {"tokens": [[256] * 7] * 7},
        "a source left of the canvas": {"tokens": tokens, "grid": [9, 9], "offset": [0, -1]},
        "a source past the canvas": {"tokens": tokens, "grid": [9, 9], "offset": [1, 3]},
        "an image past the canvas": {"image": png, "grid": [8, 8], "offset": [2, 0]},
        "a canvas smaller than the source": {"tokens": tokens + tokens, "grid": [7, 7]},
        "a source and a prefix": {"tokens": tokens, "prefix": [1, 2]},
        "two sources": {"tokens": tokens, "image": png},
        "a mask without a source": {"mask": [[True] * 7] * 7},
        "an offset without a source": {"offset": [0, 0], "grid": [9, 9]},
        "an image that is no image": {"image": b64(b"GIF89a")},
        "a canvas past max_grid": {"tokens": tokens, "grid": [7, 40]},
        "a huge canvas": {"tokens": tokens, "grid": [7, 2**40]},
        "a huge offset": {"tokens": tokens, "grid": [9, 9], "offset": [2**70, 0]},
    }
    before = metrics(server)
    for why, body in bad.items():
        r = post(server, {"model": "mnist", "seed": 1, **body})
        assert 400 <= r.status_code < 500, (why, r.status_code, r.text)
        assert_error(r, r.status_code)
        assert r.status_code in (413, 415, 422), why
    r = httpx.post(f"{server}/generate", data={"model": "mnist"},
                   files={"image": base64.b64decode(png), "mask": png_of(rgba[:20])},
                   headers=JSON, timeout=60)
    assert_error(r, 422)
    assert "mask" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/generate", data={"model": "mnist", "offset": "[0, 5]",
                                               "grid": "[7, 9]"},
                   files={"image": base64.b64decode(png)}, headers=JSON, timeout=60)
    assert_error(r, 422)
    assert metrics(server) == before  # nothing was sampled


def test_an_image_of_another_size_is_fitted_with_its_mask(server):
    """A 30x30 upload to mnist is fitted to 28x28 as /encode fits it; its mask goes through
    the same geometry, a cell sampled when any pixel under it is marked."""
    digit = pixels(generated(server, "mnist", 14))
    png = png_of(np.asarray(Image.fromarray(digit).resize((30, 30), Image.Resampling.BILINEAR)))
    mask = np.full((30, 30, 4), 255, dtype=np.uint8)
    mask[:14, :, 3] = 0  # pixel rows 0..13 of 30: cells 0..3 of 7 (cell 3 spans 12.9..17.1)
    out = np.array(edit(server, "mnist", 3, image=b64(png), mask=b64(png_of(mask)))["tokens"])
    src = encoded(server, "mnist", png)
    assert out.shape == (7, 7)
    assert (out[4:] == src[4:]).all()
    assert (out[:4] != src[:4]).any()
