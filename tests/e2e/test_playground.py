"""The playground at / in a real headless Chromium (Debian's `chromium`, driven by Playwright):
what the page shows is what the API answers, pixel for pixel; the page calls no other host and
logs no errors; a screenshot is kept in build/test-artifacts/.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import ROOT, live_server, serving_models, settings, tiny_models

from service.app import create_app

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install chromium; `make test` does)",
                allow_module_level=True)

ARTEFACTS = ROOT / "build" / "test-artifacts"
TIMEOUT_MS = 60_000
# Chromium reports every 4xx/5xx answer to fetch() on the console; pages that expect one
# (the error tests) allow exactly these lines.
HTTP_ERROR_LINE = "Failed to load resource: the server responded with a status of"


@pytest.fixture(scope="module")
def server():
    app = create_app(settings(**serving_models()))
    with live_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


class Watched:
    """A page with everything it logs and every request it makes recorded."""

    def __init__(self, browser, base: str) -> None:
        self.base = base
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.set_default_timeout(TIMEOUT_MS)
        self.console: list[str] = []
        self.requests: list = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r))

    def open(self) -> Watched:
        self.page.goto(self.base + "/")
        self.page.wait_for_selector("#model option", state="attached")
        return self

    def foreign_requests(self) -> list[str]:
        host = urlsplit(self.base).netloc
        return [r.url for r in self.requests
                if urlsplit(r.url).scheme != "data" and urlsplit(r.url).netloc != host]

    def posts(self, path: str) -> list:
        return [r for r in self.requests if r.method == "POST" and urlsplit(r.url).path == path]

    def generate(self) -> None:
        self.page.click("#generate")
        self.page.wait_for_selector("#result[data-state=done]", state="attached")

    def pixels(self, selector: str) -> np.ndarray:
        """The pixels the browser decoded for an <img>, at its natural size (RGBA)."""
        data, w, h = self.page.eval_on_selector(selector, """img => {
            const c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext('2d');
            g.drawImage(img, 0, 0);
            return [Array.from(g.getImageData(0, 0, c.width, c.height).data), c.width, c.height];
        }""")
        return np.asarray(data, dtype=np.uint8).reshape(h, w, 4)

    def token_ids(self) -> list[int]:
        return [int(x) for x in self.page.eval_on_selector_all(
            "#tokens .cell", "cells => cells.map(c => c.dataset.id)")]

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def watched(browser, server):
    w = Watched(browser, server)
    yield w
    w.close()


def rgba(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


def api_generate(base: str, body: dict) -> dict:
    r = httpx.post(f"{base}/generate", json=body, headers={"Accept": "application/json"},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def draw_stroke(page, points: list[tuple[float, float]], target: str = "#draw") -> None:
    """A mouse stroke over the canvas `target` (the drawing; the editor's mask), through
    points given as fractions of it."""
    box = page.locator(target).bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


@pytest.mark.parametrize("model,label,seed,grid", [
    ("mnist", 7, 1, None), ("fashion-mnist", 7, 3, None), ("mnist", 4, 2, [7, 10])])
def test_generate_shows_what_the_api_answers_pixel_for_pixel(watched, server, model, label,
                                                            seed, grid):
    page = watched.open().page
    page.select_option("#model", model)
    page.select_option("#label", str(label))
    page.fill("#seed", str(seed))
    if grid:
        page.fill("#grid-cols", str(grid[1]))
    watched.generate()
    # the untouched form asks for what a bare API call with model, class and seed gets
    request = {"model": model, "label": label, "seed": seed}
    if grid:
        request["grid"] = grid
    answer = api_generate(server, request)
    image = answer["images"][0]
    assert np.array_equal(watched.pixels("#result"), rgba(base64.b64decode(image["png"])))
    assert watched.token_ids() == [t for row in image["tokens"] for t in row]
    assert page.get_attribute("#result", "data-seed") == str(seed)
    assert [r.post_data_json for r in watched.posts("/generate")] == [request]
    assert watched.console == []
    assert watched.foreign_requests() == []


def test_draw_encode_decode_and_screenshot(watched, server):
    page = watched.open().page
    page.select_option("#label", "3")
    page.fill("#seed", "5")
    watched.generate()
    draw_stroke(page, [(0.35, 0.2), (0.65, 0.25), (0.5, 0.5), (0.65, 0.75), (0.35, 0.8)])
    page.click("#encode")
    page.wait_for_selector("#reconstruction[data-state=done]", state="attached")
    ids = watched.token_ids()
    assert len(ids) == 49

    # the canvas as the page sent it: the API gives the grid the page shows
    canvas_png = base64.b64decode(page.eval_on_selector(
        "#draw", "c => c.toDataURL('image/png')").split(",", 1)[1])
    drawn = np.asarray(Image.open(io.BytesIO(canvas_png)).convert("L"))
    assert drawn.max() == 255 and (drawn == 255).mean() > 0.02  # a stroke is there
    r = httpx.post(f"{server}/encode", params={"model": "mnist"},
                   files={"files": ("d.png", canvas_png, "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    assert [t for row in r.json()["tokens"][0] for t in row] == ids

    # the reconstruction is the API's decoding of those tokens
    grid = np.asarray(ids).reshape(7, 7).tolist()
    r = httpx.post(f"{server}/decode", json={"model": "mnist", "tokens": grid},
                   headers={"Accept": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text
    expected = rgba(base64.b64decode(r.json()["images"][0]["png"]))
    assert np.array_equal(watched.pixels("#reconstruction"), expected)
    shown = page.locator("#reconstruction").bounding_box()
    assert shown["width"] > 100 and shown["height"] > 100  # shown large, beside the input

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] >= 1000
    assert watched.console == []
    assert watched.foreign_requests() == []


def test_an_image_file_is_encoded_and_decoded(watched, server, tmp_path):
    png = httpx.post(f"{server}/generate", json={"model": "mnist", "label": 6, "seed": 2},
                     timeout=60).content
    (tmp_path / "six.png").write_bytes(png)
    page = watched.open().page
    page.set_input_files("#file", str(tmp_path / "six.png"))
    page.wait_for_selector("#reconstruction[data-state=done]", state="attached")
    # the file is drawn on the canvas, scaled up 10x with its pixels kept sharp
    canvas_png = base64.b64decode(page.eval_on_selector(
        "#draw", "c => c.toDataURL('image/png')").split(",", 1)[1])
    canvas = np.asarray(Image.open(io.BytesIO(canvas_png)).convert("L"))
    assert np.array_equal(canvas[5::10, 5::10], np.asarray(Image.open(io.BytesIO(png))))
    # and what the page shows is the API's answer for what it sent
    r = httpx.post(f"{server}/encode", files={"files": ("c.png", canvas_png, "image/png")},
                   timeout=60)
    assert r.status_code == 200, r.text
    grid = r.json()["tokens"][0]
    assert watched.token_ids() == [t for row in grid for t in row]
    r = httpx.post(f"{server}/decode", json={"tokens": grid},
                   headers={"Accept": "application/json"}, timeout=60)
    expected = rgba(base64.b64decode(r.json()["images"][0]["png"]))
    assert np.array_equal(watched.pixels("#reconstruction"), expected)
    assert watched.console == []


def test_keep_a_prefix_and_resample_the_rest(watched, server):
    page = watched.open().page
    page.select_option("#label", "2")
    page.fill("#seed", "11")
    watched.generate()
    before = watched.token_ids()
    page.click("#tokens .cell[data-index='9']")  # keep row 0 and 3 cells of row 1
    assert page.locator("#tokens .cell.kept").count() == 10
    page.click("#resample")
    page.wait_for_selector("#result[data-state=done]", state="attached")
    sent = watched.posts("/generate")[-1].post_data_json
    assert sent["prefix"] == [before[:7], before[7:10]]
    assert sent["seed"] != 11 and sent["label"] == 2
    after = watched.token_ids()
    assert after[:10] == before[:10]
    # the image is the API's answer to the request the page sent
    answer = api_generate(server, sent)
    assert np.array_equal(watched.pixels("#result"),
                          rgba(base64.b64decode(answer["images"][0]["png"])))
    assert [t for row in answer["images"][0]["tokens"] for t in row] == after
    assert watched.console == []


def test_errors_are_shown_in_the_page(watched):
    page = watched.open().page
    page.fill("#top-p", "5")
    page.click("#generate")
    page.wait_for_selector("#result[data-state=error]", state="attached")
    error = page.locator("#error")
    assert error.is_visible()
    assert "top_p" in error.inner_text() and "422" in error.inner_text()
    assert all(HTTP_ERROR_LINE in line for line in watched.console), watched.console
    # the next good request clears it
    page.click("#defaults")
    watched.generate()
    assert not error.is_visible()


def test_streaming_grows_the_image_row_by_row(watched):
    page = watched.open().page
    page.select_option("#label", "8")
    page.fill("#seed", "4")
    # every value src took: each record's old value is the one before it (an observer's
    # callback can carry several records when rows arrive together)
    page.evaluate("""() => {
        window.olds = [];
        const img = document.querySelector('#result');
        new MutationObserver((records) => records.forEach((r) => window.olds.push(r.oldValue)))
            .observe(img, {attributes: true, attributeFilter: ['src'], attributeOldValue: true});
    }""")
    watched.generate()
    shown = page.evaluate("[...window.olds.slice(1), document.querySelector('#result').src]")
    # one preview per token row, then the final image
    assert len(set(shown)) >= 7, len(shown)
    assert watched.posts("/generate")[-1].headers["accept"].startswith("text/event-stream")
    assert len(watched.posts("/generate")) == 1  # the stream answered; no second request
    assert watched.console == []


def test_a_landscape_canvas_is_painted_strip_by_strip(browser):
    """A canvas of the landscapes model streams: each row's strip is painted in place on
    #painting as it arrives, then #result shows the answer, pixel for pixel the API's."""
    if not (ROOT / "checkpoints" / "landscapes" / "transformer.safetensors").is_file():
        pytest.skip("the shipped landscapes model is not here")
    app = create_app(settings(checkpoint_dir=ROOT / "checkpoints", models=["landscapes"]))
    grid = [20, 36]
    request = {"model": "landscapes", "seed": 12, "grid": grid}
    with live_server(app) as base:
        w = Watched(browser, base)
        page = w.open().page
        page.fill("#seed", "12")
        page.fill("#grid-rows", str(grid[0]))
        page.fill("#grid-cols", str(grid[1]))
        page.evaluate("""() => {
            window.painted = false;
            new MutationObserver(() => {
                if (!document.querySelector('#painting').hidden) window.painted = true;
            }).observe(document.querySelector('#painting'), {attributes: true});
        }""")
        w.generate()
        with httpx.stream("POST", f"{base}/generate", json=request, timeout=120,
                          headers={"Accept": "text/event-stream"}) as s:
            strips = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and '"top"' in line]
        answer = api_generate(base, request)
        assert page.evaluate("window.painted"), page.text_content("#error-text")
        assert not page.text_content("#error-text"), page.text_content("#error-text")
        assert page.evaluate("document.querySelector('#painting').hidden")
        data, width, height = page.eval_on_selector("#painting", """c => [
            Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data),
            c.width, c.height]""")
        painted = np.asarray(data, dtype=np.uint8).reshape(height, width, 4)
        expected = np.concatenate([rgba(base64.b64decode(e["png"])) for e in strips])
        assert len(strips) == grid[0] and np.array_equal(painted, expected)
        image = answer["images"][0]
        assert np.array_equal(w.pixels("#result"), rgba(base64.b64decode(image["png"])))
        assert w.console == [] and w.foreign_requests() == []
        w.close()


def test_a_server_with_keys_asks_for_one(browser):
    app = create_app(settings(**tiny_models("mnist"), api_keys=["playground-key"]))
    with live_server(app) as base:
        w = Watched(browser, base)
        try:
            page = w.page
            page.goto(base + "/")
            page.wait_for_selector("#error:not([hidden])")
            assert "API key" in page.inner_text("#error")
            page.fill("#api-key", "playground-key")
            page.press("#api-key", "Enter")
            page.wait_for_selector("#model option", state="attached")
            assert page.locator("#error").is_hidden()
            page.fill("#seed", "2")
            w.generate()
            assert all(r.headers.get("authorization") == "Bearer playground-key"
                       for r in w.posts("/generate"))
            assert all(HTTP_ERROR_LINE in line for line in w.console), w.console
            assert w.foreign_requests() == []
        finally:
            w.close()


# ---- the editor: repaint a brushed region, extend into a wider canvas ---------------------
def data_url(url: str) -> bytes:
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64", head
    return base64.b64decode(data)


def encoded_tokens(base: str, model: str, png: bytes) -> np.ndarray:
    r = httpx.post(f"{base}/encode", params={"model": model}, content=png,
                   headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["tokens"][0])


def test_repaint_a_brushed_region(watched, server):
    page = watched.open().page
    page.select_option("#label", "3")
    page.fill("#seed", "5")
    watched.generate()
    source = watched.pixels("#result")
    page.click("#edit-use")
    page.wait_for_selector("#repaint:not([disabled])")
    draw_stroke(page, [(0.1, 0.45), (0.9, 0.45)], "#edit-mask")
    page.click("#repaint")
    page.wait_for_selector("#result[data-state=done]", state="attached")
    post = watched.posts("/generate")[-1]
    sent = post.post_data_json
    assert post.headers["accept"].startswith("text/event-stream")  # streamed
    assert (sent["model"], sent["label"], sent["seed"]) == ("mnist", 3, 5)
    assert "grid" not in sent and "prefix" not in sent
    image = data_url(sent["image"])
    assert np.array_equal(rgba(image), source)  # the result, as the editor holds it
    alpha = rgba(data_url(sent["mask"]))[..., 3]
    assert alpha.shape == (28, 28) and 0 < (alpha == 0).mean() < 0.5
    cells = (alpha < 128).reshape(7, 4, 7, 4).any(axis=(1, 3))
    assert cells[3].all() and not cells[0].any()  # the brushed band, in cells
    answer = api_generate(server, sent)["images"][0]
    assert np.array_equal(watched.pixels("#result"), rgba(base64.b64decode(answer["png"])))
    after = np.asarray(watched.token_ids()).reshape(7, 7)
    assert np.array_equal(after, np.asarray(answer["tokens"]))
    kept = encoded_tokens(server, "mnist", image)
    assert np.array_equal(after[~cells], kept[~cells])
    assert watched.console == [] and watched.foreign_requests() == []


def test_extend_into_a_wider_canvas(watched, server):
    page = watched.open().page
    page.select_option("#label", "1")
    page.fill("#seed", "2")
    watched.generate()
    page.click("#edit-use")
    page.wait_for_selector("#extend:not([disabled])")
    page.fill("#extend-by", "2")
    page.click("#extend")
    page.wait_for_selector("#result[data-state=done]", state="attached")
    sent = watched.posts("/generate")[-1].post_data_json
    assert sent["grid"] == [7, 11] and "mask" not in sent and "offset" not in sent
    answer = api_generate(server, sent)["images"][0]
    shown = watched.pixels("#result")
    assert shown.shape[:2] == (28, 44)
    assert np.array_equal(shown, rgba(base64.b64decode(answer["png"])))
    tokens = np.asarray(answer["tokens"])
    source = encoded_tokens(server, "mnist", data_url(sent["image"]))
    assert np.array_equal(tokens[:, 2:9], source)  # centred
    assert watched.console == [] and watched.foreign_requests() == []


def test_a_landscape_is_extended_strip_by_strip(browser):
    """Extending a landscape streams the wider canvas's strips onto #painting."""
    if not (ROOT / "checkpoints" / "landscapes" / "transformer.safetensors").is_file():
        pytest.skip("the shipped landscapes model is not here")
    app = create_app(settings(checkpoint_dir=ROOT / "checkpoints", models=["landscapes"],
                              generate_slots=8))
    with live_server(app) as base:
        w = Watched(browser, base)
        page = w.open().page
        page.fill("#seed", "3")
        w.generate()
        page.click("#edit-use")
        page.wait_for_selector("#extend:not([disabled])")
        page.fill("#extend-by", "4")
        page.evaluate("""() => {
            window.painted = false;
            new MutationObserver(() => {
                if (!document.querySelector('#painting').hidden) window.painted = true;
            }).observe(document.querySelector('#painting'), {attributes: true});
        }""")
        page.click("#extend")
        page.wait_for_selector("#result[data-state=done]", state="attached")
        sent = w.posts("/generate")[-1].post_data_json
        assert sent["grid"] == [16, 24]
        assert page.evaluate("window.painted"), page.text_content("#error-text")
        answer = api_generate(base, sent)["images"][0]
        assert np.array_equal(w.pixels("#result"), rgba(base64.b64decode(answer["png"])))
        source = encoded_tokens(base, "landscapes", data_url(sent["image"]))
        assert np.array_equal(np.asarray(answer["tokens"])[:, 4:20], source)
        assert w.console == [] and w.foreign_requests() == []
        w.close()
