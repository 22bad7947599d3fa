"""Canvases over HTTP, on the shipped landscapes model: a grid beyond the model's samples in
the step engine with the cached sliding window, gets the same pixels alone or beside other
work, streams its rows as strips, leaves when its client does (counted 499), never starves
small requests, stays within its model's limits, and gets deadlines that follow its work."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from service_helpers import REAL, async_client, live_server, metric, png_array, settings, sse_events

from models.canvas import canvas_reference, generate_canvas
from models.checkpoint import load_bundle
from models.sampling import make_batch
from service.app import create_app
from service.engine.lanes import CANVAS_SLACK, canvas_deadline

JSON = {"Accept": "application/json"}
STREAM = {"Accept": "text/event-stream"}
LANDSCAPES = REAL / "landscapes"

pytestmark = pytest.mark.skipif(not (LANDSCAPES / "transformer.safetensors").is_file(),
                                reason="the shipped landscapes model is not here")


def models() -> dict:
    """The two models these tests use, with few slots: a lane's start-up runs each padded
    size of its rows once, and a canvas needs one lane, not many rows."""
    return {"checkpoint_dir": REAL, "models": ["mnist", "landscapes"], "generate_slots": 8}


@pytest.fixture(scope="module")
def server():
    app = create_app(settings(**models(), compile=False))
    with live_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(LANDSCAPES)


def expected_tokens(bundle, grid: tuple[int, int], seed: int, **kw) -> list[list[int]]:
    """The cached canvas sampler run in this process on the request's seeded row."""
    gpt = bundle.gpt.eval()
    batch = make_batch(gpt.config, 1, grid, generator=torch.Generator().manual_seed(seed), **kw)
    return generate_canvas(gpt, batch, grid)[0].view(grid).tolist()


def canvas(base: str, grid, seed: int, headers=JSON, **kw) -> httpx.Response:
    return httpx.post(f"{base}/generate", json={"model": "landscapes", "grid": list(grid),
                                                "seed": seed, **kw}, headers=headers,
                      timeout=300)


def test_a_canvas_is_the_cached_samplers_and_its_decode(server, bundle):
    grid = (20, 26)
    r = canvas(server, grid, 3, top_k=200)
    assert r.status_code == 200
    image = r.json()["images"][0]
    assert image["tokens"] == expected_tokens(bundle, grid, 3, top_k=200)
    pixels = png_array(base64.b64decode(image["png"]))
    assert pixels.shape == (grid[0] * 8, grid[1] * 8, 3)
    dec = httpx.post(f"{server}/decode", json={"model": "landscapes", "tokens": image["tokens"]},
                     timeout=60)
    assert np.array_equal(png_array(dec.content), pixels)  # decoded whole, as /decode does


@pytest.mark.slow
def test_the_served_canvas_is_the_uncached_references(server, bundle):
    """Against the reference (every query re-forwards all before it) on the real model."""
    grid = (17, 19)
    batch = make_batch(bundle.gpt.config, 1, grid, generator=torch.Generator().manual_seed(8))
    want = canvas_reference(bundle.gpt.eval(), batch, grid)[0].view(grid).tolist()
    assert canvas(server, grid, 8).json()["images"][0]["tokens"] == want


@pytest.mark.slow
def test_same_pixels_alone_and_beside_canvases_and_small_requests(server):
    asks = [((18, 30), 1), ((24, 17), 2), ((18, 30), 3)]
    alone = [canvas(server, g, s).json()["images"][0] for g, s in asks]
    small = [{"model": m, "seed": s, "n": 3} for m in ("landscapes", "mnist") for s in (4, 5)]
    with ThreadPoolExecutor(8) as pool:
        together = [pool.submit(canvas, server, g, s) for g, s in asks]
        beside = [pool.submit(httpx.post, f"{server}/generate", json=a, timeout=300)
                  for a in small]
        got = [f.result().json()["images"][0] for f in together]
        assert all(f.result().status_code == 200 for f in beside)
    for a, b in zip(alone, got, strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["png"] == b["png"]


def test_streamed_canvas_rows_are_strips_and_done_is_the_plain_answer(server):
    grid = (16, 30)
    plain = canvas(server, grid, 6)
    streamed = canvas(server, grid, 6, headers=STREAM)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert [e for e, _ in events] == ["row"] * grid[0] + ["done"]
    tokens = plain.json()["images"][0]["tokens"]
    for r, (_, ev) in enumerate(events[:-1]):
        assert (ev["image"], ev["row"], ev["top"]) == (0, r, r * 8)
        assert ev["tokens"] == tokens[r]
        strip = png_array(base64.b64decode(ev["png"]))
        assert strip.shape == (8, grid[1] * 8, 3) and strip.any()
    assert events[-1][1] == plain.json()


@pytest.mark.slow
def test_a_canvas_whose_client_leaves_frees_its_lane(server):
    m0 = httpx.get(f"{server}/metrics").text
    gone0 = metric(m0, "taming_rejected_total", reason="client_gone")
    left0 = metric(m0, "taming_requests_total", endpoint="/generate", status="499")
    ok0 = metric(m0, "taming_requests_total", endpoint="/generate", status="200")
    with httpx.stream("POST", f"{server}/generate", headers=STREAM, timeout=60,
                      json={"model": "landscapes", "grid": [128, 128], "seed": 1}) as s:
        for line in s.iter_lines():
            if line.startswith("event: row"):
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = httpx.get(f"{server}/metrics").text
        if (metric(m, "taming_rejected_total", reason="client_gone") > gone0
                and metric(m, "taming_slots_active", model="landscapes") == 0):
            break
        time.sleep(0.05)
    assert metric(m, "taming_rejected_total", reason="client_gone") == gone0 + 1
    assert metric(m, "taming_slots_active", model="landscapes") == 0
    # it read a 200 status line and one row, then left: counted (and logged) as 499
    assert metric(m, "taming_requests_total", endpoint="/generate", status="499") == left0 + 1
    assert metric(m, "taming_requests_total", endpoint="/generate", status="200") == ok0
    assert canvas(server, (18, 18), 2).status_code == 200  # the lane serves again


def test_a_client_that_leaves_a_plain_canvas_request_is_counted_499(server):
    m0 = httpx.get(f"{server}/metrics").text
    left0 = metric(m0, "taming_requests_total", endpoint="/generate", status="499")
    with pytest.raises(httpx.ReadTimeout):  # it leaves while its canvas samples
        httpx.post(f"{server}/generate", json={"model": "landscapes", "grid": [96, 96]},
                   headers=JSON, timeout=1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = httpx.get(f"{server}/metrics").text
        if metric(m, "taming_requests_total", endpoint="/generate", status="499") > left0:
            break
        time.sleep(0.05)
    assert metric(m, "taming_requests_total", endpoint="/generate", status="499") == left0 + 1


@pytest.mark.slow
def test_small_requests_finish_while_a_large_canvas_samples(server):
    """A canvas holds one lane's step beside its rows, never the lane: one-image requests
    of the same model, sent while it samples, finish long before it."""
    with ThreadPoolExecutor(3) as pool:
        big = pool.submit(lambda: (canvas(server, (96, 96), 9), time.monotonic()))
        while metric(httpx.get(f"{server}/metrics").text, "taming_slots_active",
                     model="landscapes") < 1:
            assert not big.done(), "the canvas never showed as sampling"
            time.sleep(0.01)
        t = time.monotonic()
        small = [pool.submit(lambda seed=seed: (httpx.post(
            f"{server}/generate", json={"model": "landscapes", "seed": seed}, timeout=300),
            time.monotonic())) for seed in range(2)]
        done = [f.result() for f in small]
        response, big_done = big.result()
    assert response.status_code == 200
    assert all(r.status_code == 200 for r, _ in done)
    assert max(at for _, at in done) < big_done, (big_done - t, [at - t for _, at in done])


def test_canvas_limits_come_from_the_models_config(server):
    info = httpx.get(f"{server}/models/landscapes").json()
    assert info["max_grid"] == [256, 256]  # 2048x2048 pixels
    assert httpx.get(f"{server}/models/mnist").json()["max_grid"] == [32, 32]
    too_big = canvas(server, (257, 64), 1)
    assert too_big.status_code == 422 and "[256, 256]" in too_big.json()["error"]["message"]
    guided = canvas(server, (20, 20), 1, cfg_scale=2.0)
    assert guided.status_code == 422 and "canvas" in guided.json()["error"]["message"]
    tokens = [[1] * 40] * 40  # past TAMING_MAX_GRID, within landscapes' own limit
    assert httpx.post(f"{server}/decode", json={"model": "landscapes", "tokens": tokens},
                      timeout=60).status_code == 200
    assert httpx.post(f"{server}/decode", json={"model": "mnist", "tokens": tokens},
                      timeout=60).status_code == 422


def test_a_started_canvas_is_judged_by_its_progress_not_a_fixed_time():
    started, timeout = 100.0, 30.0
    # before a request timeout of sampling: the first check comes then
    assert canvas_deadline(110.0, started, 4096, 500, 0, timeout) == 130.0
    # at a check: twice its remaining cells at its measured rate, plus a timeout
    rate = 2048 / 30.0
    assert canvas_deadline(130.0, started, 4096, 2048, 0, timeout) == pytest.approx(
        130.0 + CANVAS_SLACK * 2048 / rate + timeout)
    # all its cells sampled (it decodes): a timeout more
    assert canvas_deadline(190.0, started, 4096, 4096, 2048, timeout) == 190.0 + timeout
    # no progress since the last check: cut
    assert canvas_deadline(190.0, started, 4096, 2048, 2048, timeout) is None
    assert canvas_deadline(130.0, started, 4096, 0, 0, timeout) is None


@pytest.mark.slow
def test_canvas_deadlines_follow_the_work_under_load():
    """Under load (mnist requests in a loop), with a request timeout of 1 s: a canvas that
    takes several times that to sample gets its answer (the old rule, a fixed timeout per 16
    training grids of cells, cut it at 1 s), and a canvas that waits for the only lane past
    the timeout leaves with 504 having cost nothing."""
    app = create_app(settings(**models(), compile=False, request_timeout_s=1.0))
    times: dict[str, float] = {}

    async def go():
        async with async_client(app) as c:
            done = asyncio.Event()

            async def load() -> list[int]:
                codes = []
                while not done.is_set():
                    codes.append((await c.post("/generate", json={"model": "mnist", "n": 4},
                                               headers=JSON)).status_code)
                return codes

            async def timed(name: str, grid, delay: float) -> httpx.Response:
                await asyncio.sleep(delay)
                t0 = time.monotonic()
                r = await c.post("/generate", json={"model": "landscapes", "grid": grid,
                                                    "seed": 4}, headers=JSON)
                times[name] = time.monotonic() - t0
                return r

            loader = asyncio.ensure_future(load())
            big = asyncio.ensure_future(timed("big", [48, 48], 0.0))
            late = await timed("late", [24, 24], 0.2)  # one lane: it waits behind the big one
            r = await big
            done.set()
            return r, late, await loader, (await c.get("/metrics")).text

    r, late, codes, m = asyncio.run(go())
    assert r.status_code == 200, r.text
    assert times["big"] > 1.5, times  # it outlived the request timeout, and was not cut
    message = late.json()["error"]["message"]
    assert late.status_code == 504 and "did not start within 1 s" in message, late.text
    assert times["late"] < 3.0, times  # refused at its waiting deadline, not after the big one
    assert metric(m, "taming_rejected_total", reason="deadline") >= 1
    assert codes and codes.count(200) >= len(codes) // 2, codes
    assert metric(m, "taming_slots_active", model="landscapes") == 0


def test_bad_max_grid_in_a_checkpoint_is_refused(tmp_path):
    from models.checkpoint import CheckpointError
    from service.registry import load_models

    folder = tmp_path / "landscapes"
    folder.mkdir()
    for f in LANDSCAPES.iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f)
    cfg = json.loads((LANDSCAPES / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**cfg, "max_grid": [0, 8]}))
    with pytest.raises(CheckpointError, match="max_grid"):
        load_models(settings(checkpoint_dir=Path(tmp_path), models=["landscapes"]))


@pytest.mark.slow
def test_the_client_streams_canvas_strips_and_the_cli_paints_them(server):
    import io
    import sys

    sys.path.insert(0, str(REAL.parent / "client"))  # the client's source: httpx, numpy, Pillow
    from taming_client import GenerateParams, RowEvent, TamingClient
    from taming_client.terminal import RowPainter

    params = GenerateParams(model="landscapes", grid=(16, 20), seed=4, n=2)
    with TamingClient(server, timeout=300) as client:
        items = list(client.stream(params))
        plain = client.generate(params)
    rows = [i for i in items if isinstance(i, RowEvent)]
    assert len(rows) == 2 * 16 and all(r.top == r.row * 8 for r in rows)
    assert all(r.preview.size == (20 * 8, 8) for r in rows)
    assert np.array_equal(np.asarray(items[-1].tokens), np.asarray(plain.tokens))
    out = io.StringIO()
    painter = RowPainter(out, 2, colour=False)
    for r in rows:
        painter.add(r)
    assert painter.next_row == 16 and not painter.strips and out.getvalue()
