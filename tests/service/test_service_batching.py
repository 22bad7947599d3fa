"""Batching over HTTP: /encode, /decode and wide-grid /generate batch, /generate's steps hold
several requests, seeded results do not depend on their company, the queue bound, deadlines,
out-of-memory and draining through the API (the collector alone: tests/unit/test_collector.py),
and the priorities of the model threads."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_helpers import (
    assert_error,
    async_client,
    metric,
    png_of,
    record_queue,
    serving_models,
    settings,
    tiny_models,
)

from service.app import create_app
from service.state import MODEL_THREAD_NICE

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
JSON = {"Accept": "application/json"}


def test_tokenizer_threads_run_at_a_lower_priority_on_cpu_and_lanes_do_not():
    """The collector's model threads are niced so that the event loop gets a core first; the
    generation lanes are not (a niced lane lost its core whenever the loop woke)."""
    def niceness(native_id: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, native_id)

    base = niceness(threading.get_native_id())
    with TestClient(create_app(settings(**tiny_models("mnist"), compile=False))):
        threads = {t.name: t.native_id for t in threading.enumerate()}
        tokenizer = [i for name, i in threads.items() if name.startswith("taming-cpu")]
        lanes = [i for name, i in threads.items() if name.startswith("taming-gen-mnist")]
        assert tokenizer and lanes
        assert {niceness(i) for i in tokenizer} == {min(19, base + MODEL_THREAD_NICE)}
        assert {niceness(i) for i in lanes} == {base}
    assert niceness(threading.get_native_id()) == base  # the event loop's thread keeps its own


def test_full_collections_while_serving_skip_what_start_up_loaded():
    """Start-up's objects (models, libraries) are frozen out of the garbage collector while the
    service runs, so a full collection under load scans only what requests made; after
    shutdown the collector sees them again."""
    app = create_app(settings(**tiny_models("mnist"), compile=False))
    with TestClient(app) as c:
        gpt = app.state.service.models["mnist"].bundle.gpt
        assert c.post("/generate", json={"model": "mnist", "seed": 1}).status_code == 200
        assert gc.get_freeze_count() > 0
        gc.collect()  # a full collection during service: the model is not among its objects
        assert not any(o is gpt for o in gc.get_objects())
    assert gc.get_freeze_count() == 0
    assert any(o is gpt for o in gc.get_objects())


# ---- over HTTP ------------------------------------------------------------------------------
def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def patient(app) -> None:
    """Batches of the collector wait max_wait for company even for a lone client."""
    app.state.service.collector.policy.eager = False


def _batches(text: str, op: str = "generate", model: str = "mnist") -> tuple[float, float]:
    """(forwards, images) of one operation."""
    return (metric(text, "taming_batch_size_count", operation=op, model=model),
            metric(text, "taming_batch_size_sum", operation=op, model=model))


def _steps(text: str, model: str = "mnist") -> float:
    return metric(text, "taming_step_duration_seconds_count", model=model)


async def _until(c, what: str, **labels) -> None:
    """Poll /metrics until the sample `what` with `labels` is positive."""
    for _ in range(500):
        if metric((await c.get("/metrics")).text, what, **labels) > 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} {labels} stayed at 0")


GRID = [[(i * 7 + j) % 16 for j in range(7)] for i in range(7)]


@pytest.mark.slow
def test_concurrent_requests_share_steps_and_batches():
    app = create_app(settings(**tiny_models("mnist"), max_wait_ms=300))

    async def main():
        async with async_client(app) as c:
            patient(app)
            rs = await asyncio.gather(*(c.post("/generate", json={"seed": i}) for i in range(16)))
            assert all(r.status_code == 200 for r in rs)
            text = (await c.get("/metrics")).text
            # every image takes 49 steps; steps hold several requests' images
            assert _batches(text)[1] == 16 * 49
            assert _steps(text) < 16 * 49 / 2, _steps(text)
            before = text
            rs = await asyncio.gather(*(c.post("/decode", json={"tokens": [[i % 16] * 7] * 7})
                                        for i in range(8)))
            rs += await asyncio.gather(*(c.post("/generate", json={"seed": i, "grid": [7, 9]})
                                         for i in range(4)))
            assert all(r.status_code == 200 for r in rs)
            text = (await c.get("/metrics")).text
            for op, n in (("decode", 8), ("generate", 4)):
                count, total = np.subtract(_batches(text, op), _batches(before, op))
                assert total == n and count <= 2, (op, count, total)
    run(main())


def test_batching_off_with_max_batch_size_1():
    app = create_app(settings(**tiny_models("mnist"), max_batch_size=1, max_wait_ms=50))

    async def main():
        async with async_client(app) as c:
            rs = await asyncio.gather(*(c.post("/decode", json={"tokens": GRID})
                                        for _ in range(4)))
            rs.append(await c.post("/decode", json={"tokens": [GRID] * 3}))
            rs += await asyncio.gather(*(c.post("/generate", json={"seed": i, "grid": [7, 8]})
                                         for i in range(2)))
            rs.append(await c.post("/generate", json={"seed": 9, "n": 3, "grid": [7, 8]}))
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
            text = (await c.get("/metrics")).text
            assert _batches(text, "decode") == (7, 7)
            assert _batches(text, "generate") == (5, 5)
    run(main())


MIXED = [
    {"seed": 11, "label": 3},
    {"seed": 12, "n": 3, "temperature": 0.8, "top_k": 5},
    {"seed": 13, "label": 1, "cfg_scale": 2.5},
    {"seed": 14, "top_p": 0.7, "n": 2},
    {"seed": 15, "prefix": [1, 2, 3]},
    {"seed": 16, "grid": [7, 9], "label": 2},
    {"seed": 17, "label": 0, "temperature": 1.3},
    {"seed": 18, "n": 4, "label": 9, "top_k": 1},
]


@pytest.mark.slow
def test_seeded_generate_is_identical_alone_and_in_a_burst_of_32():
    app = create_app(settings(**serving_models("mnist"), max_wait_ms=100))
    target = {"seed": 1234, "label": 7, "n": 2}

    async def main():
        async with async_client(app) as c:
            patient(app)
            alone = await c.post("/generate", json=target)
            alone_json = await c.post("/generate", json=target, headers=JSON)
            assert alone.status_code == 200
            before = (await c.get("/metrics")).text
            burst = [dict(MIXED[i % len(MIXED)], seed=100 + i) for i in range(29)]
            bodies = burst[:10] + [target] + burst[10:20] + [target] + burst[20:] + [target]
            accepts = ["image/png"] * len(bodies)
            accepts[21] = "application/json"
            rs = await asyncio.gather(*(c.post("/generate", json=b, headers={"Accept": a})
                                        for b, a in zip(bodies, accepts, strict=True)))
            assert len(rs) == 32 and all(r.status_code == 200 for r in rs), \
                [r.text for r in rs if r.status_code != 200]
            assert rs[10].content == alone.content and rs[31].content == alone.content
            assert rs[21].json() == alone_json.json()
            # the burst really shared steps: far fewer than one image at a time would take
            text = (await c.get("/metrics")).text
            images = sum(b.get("n", 1) for b in bodies if "grid" not in b)
            steps = _steps(text) - _steps(before)
            assert _batches(text)[1] - _batches(before)[1] >= images * 49
            assert steps < images * 49 / 2, (steps, images)
            # and a request of the burst gives, alone, what it gave in the burst
            again = await c.post("/generate", json=bodies[3])
            assert again.content == rs[3].content
    run(main())


@pytest.mark.slow
def test_64_identical_seeded_requests_at_once_give_64_identical_answers():
    app = create_app(settings(**serving_models("mnist"), max_wait_ms=50))
    body = {"seed": 77, "label": 4}

    async def main():
        async with async_client(app) as c:
            patient(app)
            alone = await c.post("/generate", json=body, headers=JSON)
            before = (await c.get("/metrics")).text
            rs = await asyncio.gather(*(c.post("/generate", json=body, headers=JSON)
                                        for _ in range(64)))
            assert all(r.status_code == 200 for r in rs)
            answers = {r.content for r in rs}
            assert answers == {alone.content}, f"{len(answers)} different answers"
            steps = _steps((await c.get("/metrics")).text) - _steps(before)
            assert steps < 64 * 49 / 2, steps  # they shared steps, not run one by one
    run(main())


def test_full_queue_over_http_is_503_with_retry_after():
    app = create_app(settings(**tiny_models("mnist"), max_queue=64, max_wait_ms=1000,
                              generate_slots=1, max_batch_size=128))

    async def main():
        async with async_client(app) as c:
            patient(app)
            # the collector: a decode of 64 grids waits for company, filling the queue
            first = asyncio.ensure_future(c.post("/decode", json={"tokens": [GRID] * 64}))
            await _until(c, "taming_queue_depth", operation="decode", model="mnist")
            r = await c.post("/decode", json={"tokens": GRID})
            err = assert_error(r, 503, "overloaded")
            assert "queue" in err["message"] and int(r.headers["retry-after"]) >= 1
            assert (await first).status_code == 200
            # the generation engine: 64 images through one slot, most of them waiting
            first = asyncio.ensure_future(c.post("/generate", json={"seed": 1, "n": 64}))
            await _until(c, "taming_queue_depth", operation="generate", model="mnist")
            r = await c.post("/generate", json={"seed": 2, "n": 3})
            err = assert_error(r, 503, "overloaded")
            assert "queue" in err["message"] and int(r.headers["retry-after"]) >= 1
            assert (await first).status_code == 200
            text = (await c.get("/metrics")).text
            assert metric(text, "taming_rejected_total", reason="queue_full") == 2
            assert metric(text, "taming_requests_total", status="503") == 2
    run(main())


def test_max_queue_bounds_every_queue_together_when_two_models_and_the_tokenizer_flood():
    """TAMING_MAX_QUEUE is one bound: two transformers and the tokenizer flooded at once
    queue at most max_queue images between them, and each is refused once it is reached."""
    models = serving_models()
    a, b = models["models"][:2]
    app = create_app(settings(**models, max_queue=8, max_wait_ms=1000, generate_slots=1))
    peaks: list[int] = []

    async def main():
        async with async_client(app) as c:
            patient(app)
            gate = app.state.service.admission
            record_queue(gate, peaks)
            flood = ([c.post("/generate", json={"model": a, "seed": i, "n": 2}) for i in range(8)]
                     + [c.post("/generate", json={"model": b, "seed": i, "n": 2}) for i in range(8)]
                     + [c.post("/decode", json={"model": a, "tokens": [GRID, GRID]})
                        for _ in range(8)])
            pending = [asyncio.ensure_future(f) for f in flood]
            while not any(p.done() for p in pending):  # the first refusals come back at once
                await asyncio.sleep(0.01)
            depth = metric((await c.get("/metrics")).text, "taming_queue_depth")
            answers = await asyncio.gather(*pending)
            text = (await c.get("/metrics")).text
        return depth, answers, text

    depth, answers, text = run(main())
    assert max(peaks) <= 8 and depth <= 8, (max(peaks), depth)
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    for r in answers:
        if r.status_code == 503:
            assert_error(r, 503, "overloaded")
    assert metric(text, "taming_rejected_total", reason="queue_full") == statuses.count(503)
    assert metric(text, "taming_queue_depth") == 0  # everything admitted ran


def test_a_full_queue_refuses_before_reading_the_body():
    """Under a retry storm a refusal must be cheap: no multipart parsing, no image decoding,
    no sampling settings checked."""
    app = create_app(settings(**tiny_models("mnist"), max_queue=64, max_wait_ms=1000,
                              generate_slots=1, max_batch_size=128))
    not_png = {"content-type": "image/png"}

    async def main():
        async with async_client(app) as c:
            patient(app)
            first = asyncio.ensure_future(c.post("/decode", json={"tokens": [GRID] * 64}))
            await _until(c, "taming_queue_depth", operation="decode", model="mnist")
            # bodies that would be 422 if they were read: the queue answers first
            assert_error(await c.post("/encode", content=b"not an image", headers=not_png),
                         503, "overloaded")
            assert_error(await c.post("/decode", json={"tokens": [[99999]]}), 503, "overloaded")
            assert (await first).status_code == 200
            first = asyncio.ensure_future(c.post("/generate", json={"seed": 1, "n": 64}))
            await _until(c, "taming_queue_depth", operation="generate", model="mnist")
            assert_error(await c.post("/generate", json={"label": 99, "n": 3}), 503,
                         "overloaded")
            assert (await first).status_code == 200
            # with room again, the same bodies get their own answers
            assert_error(await c.post("/encode", content=b"not an image", headers=not_png), 422)
            assert_error(await c.post("/decode", json={"tokens": [[99999]]}), 422)
            assert_error(await c.post("/generate", json={"label": 99}), 422)
            text = (await c.get("/metrics")).text
            assert metric(text, "taming_rejected_total", reason="queue_full") == 3
    run(main())


def test_passed_deadline_over_http_is_504():
    app = create_app(settings(**tiny_models("mnist"), request_timeout_s=0.2, max_wait_ms=3000))

    async def main():
        async with async_client(app) as c:
            patient(app)
            t0 = time.monotonic()
            r = await c.post("/decode", json={"tokens": GRID})
            assert_error(r, 504, "deadline_exceeded")
            assert time.monotonic() - t0 < 2
            text = (await c.get("/metrics")).text
            assert metric(text, "taming_rejected_total", reason="deadline") == 1
            assert _batches(text, "decode")[0] == 0  # never computed
    run(main())


@pytest.fixture
def out_of_memory(monkeypatch):
    """inject(app, limit): the app's collector runners and the generation lanes' decoder run
    out of memory past `limit` rows, as a CUDA device would (undone at teardown)."""
    def inject(app, limit: int) -> None:
        for runner in app.state.service.runners.values():
            def run(batch, lo, hi, real=runner.run):
                if hi - lo > limit:
                    raise RuntimeError(OOM)
                return real(batch, lo, hi)
            monkeypatch.setattr(runner, "run", run)
        for engine in app.state.service.generators.values():
            def decode(grids, real=engine.decode):
                if len(grids) > limit:
                    raise RuntimeError(OOM)
                return real(grids)
            monkeypatch.setattr(engine, "decode", decode)
    return inject


def test_out_of_memory_splits_and_answers_the_same(out_of_memory):
    asks = [("/generate", {"seed": 5, "n": 8, "label": 4, "grid": [7, 8]}),
            ("/decode", {"tokens": [[[(j + k) % 16 for k in range(7)]] * 7 for j in range(8)]})]

    async def fetch(limit: int | None):
        app = create_app(settings(**tiny_models("mnist")))
        async with async_client(app) as c:
            if limit is not None:
                out_of_memory(app, limit)
            answers = []
            for path, body in asks:
                r = await c.post(path, json=body, headers=JSON)
                assert r.status_code == 200, r.text
                answers.append(r.json())
            return answers, (await c.get("/metrics")).text

    plain, _ = run(fetch(None))
    split, text = run(fetch(2))
    assert split == plain
    for op in ("generate", "decode"):
        assert metric(text, "taming_oom_splits_total", operation=op, model="mnist") >= 3
        # every forward that ran held at most 2 images, and all 8 ran
        forwards, images = _batches(text, op)
        assert images == 8
        assert metric(text, "taming_batch_size_bucket", operation=op, model="mnist",
                      le="2.0") == forwards


def test_out_of_memory_in_a_generation_lane_splits_its_decode_and_answers_the_same(
        out_of_memory):
    """Eight images finish at one step and their decode runs out of memory past two."""
    ask = {"seed": 5, "n": 8, "label": 4}

    async def fetch(limit: int | None):
        app = create_app(settings(**tiny_models("mnist")))
        async with async_client(app) as c:
            if limit is not None:
                out_of_memory(app, limit)
            r = await c.post("/generate", json=ask, headers=JSON)
            assert r.status_code == 200, r.text
            return r.json(), (await c.get("/metrics")).text

    plain, _ = run(fetch(None))
    split, text = run(fetch(2))
    assert split == plain
    assert metric(text, "taming_oom_splits_total", operation="decode", model="mnist") >= 3
    forwards, images = _batches(text, "decode")
    assert images == 8 and metric(text, "taming_batch_size_bucket", operation="decode",
                                  model="mnist", le="2.0") == forwards


def test_out_of_memory_on_a_single_image_is_503_and_the_server_keeps_serving(out_of_memory):
    app = create_app(settings(**tiny_models("mnist")))

    async def main():
        async with async_client(app) as c:
            out_of_memory(app, 0)
            r = await c.post("/decode", json={"tokens": [GRID, GRID]})
            assert_error(r, 503, "out_of_memory")
            assert r.headers["retry-after"]
            assert (await c.get("/readyz")).status_code == 200
            text = (await c.get("/metrics")).text
            assert metric(text, "taming_rejected_total", reason="out_of_memory") == 1
            # a sampled image whose decode cannot fit: the same answer, not a 500
            assert_error(await c.post("/generate", json={"seed": 1}), 503, "out_of_memory")
            # a stream's rows need no decode, so it has begun: the error is its last event
            streamed = await c.post("/generate", json={"seed": 1}, headers={
                "Accept": "text/event-stream"})
            assert streamed.status_code == 200
            last = streamed.text.strip().split("\n\n")[-1]
            assert last.startswith("event: error") and "out_of_memory" in last
            for _ in range(200):  # the streamed image leaves its lane at the next step
                text = (await c.get("/metrics")).text
                if metric(text, "taming_slots_active", model="mnist") == 0:
                    break
                await asyncio.sleep(0.01)
            assert metric(text, "taming_rejected_total", reason="out_of_memory") == 3
            assert metric(text, "taming_slots_active", model="mnist") == 0
    run(main())


def test_draining_turns_readyz_and_inference_503_but_health_stays():
    app = create_app(settings(**tiny_models("mnist")))

    async def main():
        async with async_client(app) as c:
            assert (await c.get("/readyz")).status_code == 200
            app.state.service.begin_drain()
            r = await c.get("/readyz")
            assert_error(r, 503, "draining")
            assert r.headers["retry-after"]
            for path, body in (("/generate", {"seed": 1}), ("/decode", {"tokens": GRID})):
                r = await c.post(path, json=body)
                assert_error(r, 503, "draining")
                assert r.headers["retry-after"]
            r = await c.post("/encode", content=png_of(np.zeros((28, 28), np.uint8)),
                             headers={"content-type": "image/png"})
            assert_error(r, 503, "draining")
            assert (await c.get("/healthz")).status_code == 200
            text = (await c.get("/metrics")).text
            assert metric(text, "taming_rejected_total", reason="draining") == 3
    run(main())


def test_eager_batching_over_http():
    app = create_app(settings(**tiny_models("mnist"), max_wait_ms=3000))

    async def main():
        async with async_client(app) as c:
            for path, body in (("/decode", {"tokens": GRID}),
                               ("/generate", {"seed": 1, "grid": [7, 8]})):
                t0 = time.monotonic()
                assert (await c.post(path, json=body)).status_code == 200
                assert time.monotonic() - t0 < 2.5, path  # did not wait max_wait for company
            rs = await asyncio.gather(*(c.post("/decode", json={"tokens": [[i % 16] * 7] * 7})
                                        for i in range(8)))
            assert all(r.status_code == 200 for r in rs)
            count, total = _batches((await c.get("/metrics")).text, "decode")
            assert total == 9 and count <= 3, (count, total)
    run(main())
