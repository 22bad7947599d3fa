"""The generation engine over HTTP, on the shipped checkpoints: requests join and leave at
every step, seeded answers do not depend on their company, rows stream as Server-Sent Events,
a client that leaves frees its slots, deadlines end requests at the next step, and the
compiled step never recompiles while serving."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from service_helpers import (
    async_client,
    live_server,
    metric,
    png_array,
    serving_models,
    settings,
    tiny_models,
)

from models.checkpoint import load_bundle
from models.sampling import make_batch, reference_generate
from models.slots import graphs_built
from service.app import create_app
from service.settings import cpu_budget

JSON = {"Accept": "application/json"}
STREAM = {"Accept": "text/event-stream"}


def sse(lines) -> list[tuple[str, str]]:
    """(event, data) pairs from the lines of a text/event-stream body."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, line[6:]))
    return events


@pytest.fixture(scope="module")
def server():
    """A live server on the shipped mnist model (eager step: the engine's logic, fast start)."""
    app = create_app(settings(**serving_models("mnist"), compile=False))
    with live_server(app) as base:
        yield base


@pytest.mark.slow
def test_seeded_requests_arriving_at_random_times_get_the_reference_tokens(server):
    """Whatever runs beside it and whenever it arrives, a seeded image gets the tokens of the
    reference sampler (one image, full re-forward, no cache) fed the same seed."""
    rng = random.Random(0)
    asks = [{"label": rng.randrange(10), "seed": rng.randrange(10**6), "n": rng.choice([1, 2, 3]),
             **rng.choice([{}, {"top_k": 40}, {"cfg_scale": 1.0}, {"temperature": 0.8,
                                                                   "top_p": 0.9}])}
            for _ in range(16)]

    def call(ask):
        time.sleep(rng.random() * 0.3)
        return httpx.post(f"{server}/generate", json={"model": "mnist", **ask}, headers=JSON,
                          timeout=120)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, asks))
    bundle = load_bundle(Path(serving_models()["checkpoint_dir"]) / "mnist")
    defaults = json.loads(httpx.get(f"{server}/models/mnist").content)["defaults"]
    cfg = bundle.gpt.config
    for ask, r in zip(asks, answers, strict=True):
        assert r.status_code == 200, r.text
        for i, image in enumerate(r.json()["images"]):
            kw = {**defaults, **{k: v for k, v in ask.items() if k not in ("seed", "n")}}
            g = torch.Generator().manual_seed(ask["seed"] + i)
            batch = make_batch(cfg, 1, cfg.grid, generator=g, **kw)
            want = reference_generate(bundle.gpt.eval(), batch)[0].view(cfg.grid).tolist()
            assert image["tokens"] == want, (ask, i)


def test_streamed_rows_arrive_in_order_and_done_is_the_plain_answer(server):
    ask = {"model": "mnist", "label": 3, "seed": 11, "n": 2}
    plain = httpx.post(f"{server}/generate", json=ask, headers=JSON, timeout=60)
    png = httpx.post(f"{server}/generate", json={**ask, "n": 1}, timeout=60)
    with httpx.stream("POST", f"{server}/generate", json=ask, headers=STREAM, timeout=60) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        assert s.headers["x-seed"] == "11"
        events = sse(s.iter_lines())
    names = [e for e, _ in events]
    assert names == ["row"] * 14 + ["done"]
    rows = [json.loads(d) for e, d in events if e == "row"]
    for k in (0, 1):
        mine = [r for r in rows if r["image"] == k]
        assert [r["row"] for r in mine] == list(range(7))
        tokens = plain.json()["images"][k]["tokens"]
        assert [r["tokens"] for r in mine] == tokens
        preview = png_array(base64.b64decode(mine[-1]["png"]))
        final = png_array(base64.b64decode(plain.json()["images"][k]["png"]))
        assert np.array_equal(preview, final)  # the last preview is the finished image
        first = png_array(base64.b64decode(mine[0]["png"]))
        assert not first[4:].any()  # below the first token row: not sampled yet, black
        # the image is the tokenizer's decode; a preview shows each code's patch: the centre
        # of a decode of the code amid copies of itself
        dec = httpx.post(f"{server}/decode", json={"model": "mnist", "tokens": tokens}, timeout=60)
        assert np.array_equal(png_array(dec.content), final)
        alone = httpx.post(f"{server}/decode", headers=JSON, timeout=60, json={
            "model": "mnist", "tokens": [[[code] * 3] * 3 for code in tokens[0]]})
        patches = [png_array(base64.b64decode(im["png"]))[4:8, 4:8] for im in alone.json()["images"]]
        assert np.array_equal(first[:4], np.concatenate(patches, axis=1))
    assert events[-1][1].encode() == plain.content
    done_png = base64.b64decode(json.loads(events[-1][1])["images"][0]["png"])
    assert np.array_equal(png_array(done_png), png_array(png.content))


def test_a_request_arriving_mid_batch_starts_at_the_next_step(server):
    """48 images sample; one more arrives once they hold their slots: its first row comes long
    before the 48 finish, and it finishes in about one sampling time, not after theirs plus
    its own."""
    def crowd():
        httpx.post(f"{server}/generate", json={"model": "mnist", "n": 48, "seed": 1},
                   timeout=120)
        return time.monotonic()

    def sampling() -> float:
        return metric(httpx.get(f"{server}/metrics").text, "taming_slots_active", model="mnist")

    t0 = time.monotonic()
    alone_48 = crowd() - t0
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(crowd)
        # arrive while the crowd samples (half its answer time could fall after its last
        # step: decoding and tiling 48 images take a good part of it on a fast machine)
        while sampling() < 48 and not first.done():
            time.sleep(0.001)
        assert not first.done()
        t1 = time.monotonic()
        with httpx.stream("POST", f"{server}/generate", json={"model": "mnist", "seed": 2},
                          headers=STREAM, timeout=120) as s:
            first_row = None
            for line in s.iter_lines():
                if first_row is None and line.startswith("event: row"):
                    first_row = time.monotonic()
        late_done = time.monotonic()
        crowd_done = first.result()
    # run to completion, it would wait for the crowd's batch to end before its first step
    assert first_row < crowd_done, (first_row - t1, crowd_done - t1)
    assert late_done - t1 < 1.5 * alone_48, (late_done - t1, alone_48)


def test_a_client_that_leaves_frees_its_slots_at_the_next_step(server):
    m0 = httpx.get(f"{server}/metrics").text
    gone0 = metric(m0, "taming_rejected_total", reason="client_gone")
    images0 = metric(m0, "taming_images_generated_total", model="mnist")
    # streamed: leave after the first row
    with httpx.stream("POST", f"{server}/generate", json={"model": "mnist", "n": 64, "seed": 5},
                      headers=STREAM, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("event: row"):
                break
    # plain: send the request, then hang up without reading
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"model": "mnist", "n": 64, "seed": 6}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = httpx.get(f"{server}/metrics").text
        if (metric(m, "taming_rejected_total", reason="client_gone") >= gone0 + 2
                and metric(m, "taming_slots_active", model="mnist") == 0):
            break
        time.sleep(0.05)
    assert metric(m, "taming_rejected_total", reason="client_gone") == gone0 + 2
    assert metric(m, "taming_slots_active", model="mnist") == 0
    assert metric(m, "taming_images_generated_total", model="mnist") == images0


def test_a_cancelled_handler_frees_its_slots():
    """A handler cancelled from outside (a wrapper's timeout, a server shutting down) takes
    its rows out of the sampler too."""
    app = create_app(settings(**serving_models("mnist"), compile=False))

    async def go():
        async with async_client(app) as c:
            task = asyncio.ensure_future(c.post("/generate", json={"model": "mnist", "n": 64}))
            svc = app.state.service
            while not svc.generators["mnist"].lanes[0].active:
                await asyncio.sleep(0.005)
            task.cancel()
            await asyncio.sleep(0.3)
            return sum(len(lane.active) for lane in svc.generators["mnist"].lanes), \
                (await c.get("/metrics")).text

    active, m = asyncio.run(go())
    assert active == 0
    assert metric(m, "taming_slots_active", model="mnist") == 0
    assert metric(m, "taming_images_generated_total", model="mnist") == 0


def test_a_failing_step_answers_500_and_the_engine_keeps_serving():
    """A fault in a lane (here its decoder) fails the images it holds with 500, plain or
    streamed, and the lane serves the next request as if nothing happened."""
    app = create_app(settings(**serving_models("mnist"), compile=False))
    ask = {"model": "mnist", "n": 3, "seed": 11}

    def broken(grids):
        raise RuntimeError("injected fault")

    async def go():
        async with async_client(app) as c:
            engine = app.state.service.generators["mnist"]
            good = await c.post("/generate", json=ask, headers=JSON)
            engine.decode, real = broken, engine.decode
            failed = [await c.post("/generate", json=ask, headers=h) for h in (JSON, STREAM)]
            engine.decode = real
            again = await c.post("/generate", json=ask, headers=JSON)
            return good, failed, again, (await c.get("/metrics")).text

    good, (plain, streamed), again, m = asyncio.run(go())
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "internal_error"
    # a stream's rows need no decode (patches), so it has begun: the fault is its last event
    events = sse(streamed.text.splitlines())
    assert streamed.status_code == 200 and events[-1][0] == "error"
    assert json.loads(events[-1][1])["error"]["code"] == "internal_error"
    assert again.status_code == 200 and again.content == good.content
    assert metric(m, "taming_slots_active", model="mnist") == 0


def test_engine_metrics_are_exported(server):
    httpx.post(f"{server}/generate", json={"model": "mnist", "seed": 1}, timeout=60)
    m = httpx.get(f"{server}/metrics").text
    assert metric(m, "taming_step_duration_seconds_count", model="mnist") >= 49
    assert metric(m, "taming_time_to_first_row_seconds_count", model="mnist") >= 1  # not streamed
    assert "taming_slots_active{" in m
    sizes = {line.split('size="')[1].split('"')[0] for line in m.splitlines()
             if line.startswith("taming_step_duration_seconds_count")}
    assert sizes and all(s.isdigit() for s in sizes)


def test_a_request_past_its_deadline_leaves_with_504_or_an_error_event():
    app = create_app(settings(**serving_models("mnist"), compile=False, request_timeout_s=0.05))

    async def go():
        async with async_client(app) as c:
            plain = await c.post("/generate", json={"model": "mnist", "n": 64}, headers=JSON)
            streamed = await c.post("/generate", json={"model": "mnist", "n": 64},
                                    headers=STREAM)
            await asyncio.sleep(0.5)  # its rows leave at the next step
            return plain, streamed, (await c.get("/metrics")).text

    plain, streamed, m = asyncio.run(go())
    assert plain.status_code == 504 and plain.json()["error"]["code"] == "deadline_exceeded"
    if streamed.status_code == 200:  # the first row came before the deadline
        last = sse(streamed.text.splitlines())[-1]
        assert last[0] == "error" and json.loads(last[1])["error"]["code"] == "deadline_exceeded"
    else:
        assert streamed.status_code == 504
    assert metric(m, "taming_rejected_total", reason="deadline") == 2
    assert metric(m, "taming_slots_active", model="mnist") == 0


@pytest.mark.slow  # compiles every padded step size
def test_compiled_steps_never_recompile_while_serving_and_pick_the_eager_tokens():
    """Start-up compiles every padded size (filtered and not); a mixed load then adds no
    graph, and its answers are the eager engine's, token for token."""
    kw = dict(**tiny_models("mnist"), generate_slots=8, torch_threads=1)
    asks = [{"seed": s, "n": n, "label": s % 10, **extra}
            for s, (n, extra) in enumerate([(1, {}), (3, {"top_k": 5}), (8, {"cfg_scale": 2.0}),
                                            (2, {"top_p": 0.5}), (5, {}), (1, {"cfg_scale": 3})])]

    async def answers(app, before=None):
        async with async_client(app) as c:
            compiled_at_start = graphs_built()
            rs = await asyncio.gather(*[c.post("/generate", json=a, headers=JSON) for a in asks])
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
            return [r.json()["images"] for r in rs], compiled_at_start

    compiled, at_start = asyncio.run(answers(create_app(settings(**kw, compile=True))))
    assert graphs_built() == at_start > 0
    eager, _ = asyncio.run(answers(create_app(settings(**kw, compile=False))))
    assert [[i["tokens"] for i in a] for a in compiled] == [[i["tokens"] for i in a] for a in eager]


def test_cpu_budget_reads_the_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_budget(tmp_path) == min(2, cpu_budget(tmp_path / "none"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_budget(tmp_path) == cpu_budget(tmp_path / "none")
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_budget(v1) == 1
