"""Batching: the collector (service.engine.batches) on fake runners — closing rules, admission
(503), deadlines (504), dropped clients, out-of-memory splitting, draining — and over HTTP,
that /encode, /decode and wide-grid /generate batch, that /generate's steps hold several
requests, and that seeded results do not depend on their company."""

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
from service.engine.admission import Admission
from service.engine.batches import (
    GONE_CHECK_AFTER_S,
    LONG_BATCH_PATIENCE,
    Arrivals,
    BatchPolicy,
    Collector,
)
from service.errors import ServiceError
from service.metrics import Metrics
from service.state import MODEL_THREAD_NICE

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
JSON = {"Accept": "application/json"}


class FakeRunner:
    """Rows are numbers; the result doubles them. Records each forward's size."""

    operation = "op"
    model = "m"
    pipelined = True

    def __init__(self, delay: float = 0.0, oom_on=None, oom_above: int | None = None,
                 fail: bool = False) -> None:
        self.calls: list[int] = []
        self.delay, self.oom_on, self.oom_above, self.fail = delay, oom_on, oom_above, fail

    def collate(self, payloads):
        return np.concatenate(payloads)

    def run(self, batch, lo, hi):
        rows = batch[lo:hi]
        if (self.oom_on is not None and self.oom_on in rows) or (
                self.oom_above is not None and hi - lo > self.oom_above):
            raise RuntimeError(OOM)
        if self.fail:
            raise ValueError("boom")
        self.calls.append(hi - lo)
        time.sleep(self.delay)
        return {"x": rows * 2}


class Bench:
    """An event loop of its own; the collectors made on it are closed at teardown, whatever
    the test did, so no worker task or device thread outlives it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.made: list[Collector] = []

    def run(self, coro, timeout: float = 60):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def collector(self, max_batch_size: int = 64, max_wait: float = 0.05, eager: bool = True,
                  max_queue: int = 512, timeout_s: float = 30.0, **kw) -> Collector:
        metrics = Metrics()
        admission = Admission(metrics, max_queue=max_queue, timeout_s=timeout_s)
        c = Collector(metrics, BatchPolicy(max_batch_size, max_wait, eager),
                      admission=admission, **kw)
        self.made.append(c)
        self.run(c.start())
        return c

    def close(self) -> None:
        try:
            for c in self.made:
                try:
                    self.run(c.close(), 30)
                finally:
                    c._thread.shutdown(wait=True, cancel_futures=True)
        finally:
            self.loop.close()


@pytest.fixture
def bench():
    b = Bench()
    try:
        yield b
    finally:
        b.close()


def _job(e: Collector, runner, values, shape=None, **kw):
    return e.submit(runner, shape, np.asarray(values), len(values), **kw)


def test_batch_closes_when_full_without_waiting(bench):
    e = bench.collector(max_batch_size=4, max_wait=10, eager=False)

    async def main():
        r = FakeRunner()
        t0 = time.monotonic()
        jobs = [_job(e, r, [i]) for i in range(4)]
        out = [await e.result(j) for j in jobs]
        assert time.monotonic() - t0 < 5
        assert r.calls == [4]
        assert [o["x"].tolist() for o in out] == [[0], [2], [4], [6]]
    bench.run(main())


def test_batch_closes_max_wait_after_the_first_arrival(bench):
    e = bench.collector(max_batch_size=64, max_wait=0.15, eager=False)

    async def main():
        r = FakeRunner()
        t0 = time.monotonic()
        jobs = [_job(e, r, [1])]
        await asyncio.sleep(0.05)
        jobs.append(_job(e, r, [2, 3]))
        await asyncio.gather(*(e.result(j) for j in jobs))
        waited = time.monotonic() - t0
        assert 0.14 <= waited < 2, waited
        assert r.calls == [3]  # one batch, counted in images
    bench.run(main())


def test_images_not_requests_fill_a_batch_and_big_jobs_run_alone_in_chunks(bench):
    e = bench.collector(max_batch_size=4, max_wait=0.05)

    async def main():
        r = FakeRunner()
        a, b = _job(e, r, [1, 2, 3]), _job(e, r, [4, 5])
        big = _job(e, r, list(range(10)))
        ra, rb, rbig = await e.result(a), await e.result(b), await e.result(big)
        assert ra["x"].tolist() == [2, 4, 6] and rb["x"].tolist() == [8, 10]
        assert rbig["x"].tolist() == [2 * i for i in range(10)]
        assert r.calls == [3, 2, 4, 4, 2]
    bench.run(main())


def test_different_shapes_never_share_a_batch(bench):
    e = bench.collector(max_batch_size=8, max_wait=0.05)

    async def main():
        r = FakeRunner()
        jobs = [_job(e, r, [i], shape=(7, 7 + i % 2)) for i in range(4)]
        await asyncio.gather(*(e.result(j) for j in jobs))
        assert sorted(r.calls) == [2, 2]
    bench.run(main())


def test_full_queue_is_503_with_retry_after(bench):
    e = bench.collector(max_batch_size=64, max_wait=0.3, max_queue=3)

    async def main():
        r = FakeRunner()
        first = _job(e, r, [1, 2])
        with pytest.raises(ServiceError) as err:
            _job(e, r, [3, 4])
        assert err.value.status == 503 and err.value.code == "overloaded"
        assert int(err.value.headers["Retry-After"]) >= 1
        assert (await e.result(first))["x"].tolist() == [2, 4]
        assert e.metrics.rejected.labels("queue_full")._value.get() == 1
        # a job bigger than the whole queue can never be queued: refused as such, even by an
        # empty queue (the bound holds for every job), and not counted as a refusal for load
        with pytest.raises(ServiceError) as err:
            _job(e, r, [1] * 4)
        assert err.value.status == 422 and err.value.code == "too_many_images"
        assert "TAMING_MAX_QUEUE" in err.value.message and "3" in err.value.message
        assert e.admission.queued == 0
        assert e.metrics.rejected.labels("queue_full")._value.get() == 1
        # one exactly as large as the bound is queued when the queue is empty
        assert (await e.result(_job(e, r, [1] * 3)))["x"].tolist() == [2] * 3
    bench.run(main())


def test_passed_deadline_is_504_and_not_computed(bench):
    e = bench.collector(max_batch_size=64, max_wait=2, eager=False, timeout_s=0.1)

    async def main():
        r = FakeRunner()
        job = _job(e, r, [1])
        t0 = time.monotonic()
        with pytest.raises(ServiceError) as err:
            await e.result(job)
        assert err.value.status == 504 and time.monotonic() - t0 < 1.5
        await asyncio.sleep(0.05)
        assert r.calls == [] and e.queued_images == 0
        assert e.metrics.rejected.labels("deadline")._value.get() == 1
    bench.run(main())


def test_a_job_that_barely_waited_is_not_asked_whether_its_client_left(bench):
    e = bench.collector(max_batch_size=64, max_wait=0.001)

    async def main():
        r = FakeRunner()
        asked = []

        async def gone():
            asked.append(1)
            return True

        assert (await e.result(_job(e, r, [1], is_gone=gone)))["x"].tolist() == [2]
        assert asked == [] and r.calls == [1]
    bench.run(main())


def test_gone_and_cancelled_clients_cost_no_compute(bench):
    # the batch waits long enough for its jobs to be asked whether their client is still there
    e = bench.collector(max_batch_size=64, max_wait=GONE_CHECK_AFTER_S + 0.1, eager=False)

    async def main():
        r = FakeRunner()

        async def gone():
            return True

        async def here():
            return False

        a = _job(e, r, [1], is_gone=gone)
        b = _job(e, r, [2, 3], is_gone=here)
        c = _job(e, r, [4])
        waiter = asyncio.ensure_future(e.result(c))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(ServiceError) as err:
            await e.result(a)
        assert err.value.code == "client_gone"
        assert (await e.result(b))["x"].tolist() == [4, 6]
        assert r.calls == [2]
        assert e.metrics.rejected.labels("client_gone")._value.get() == 1
        assert e.queued_images == 0
    bench.run(main())


def test_out_of_memory_splits_and_every_request_succeeds(bench):
    e = bench.collector(max_batch_size=64, max_wait=0.05)

    async def main():
        r = FakeRunner(oom_above=2)
        jobs = [_job(e, r, [i, i + 100]) for i in range(3)] + [_job(e, r, [7])]
        out = [await e.result(j) for j in jobs]
        assert [o["x"].tolist() for o in out] == [[0, 200], [2, 202], [4, 204], [14]]
        assert max(r.calls) <= 2 and sum(r.calls) == 7
        assert e.metrics.oom_splits.labels("op", "m")._value.get() >= 2
    bench.run(main())


def test_out_of_memory_on_one_image_fails_only_its_request(bench):
    e = bench.collector(max_batch_size=64, max_wait=0.05)

    async def main():
        r = FakeRunner(oom_on=-1)
        ok1, bad, ok2 = _job(e, r, [1, 2]), _job(e, r, [-1]), _job(e, r, [3])
        assert (await e.result(ok1))["x"].tolist() == [2, 4]
        assert (await e.result(ok2))["x"].tolist() == [6]
        with pytest.raises(ServiceError) as err:
            await e.result(bad)
        assert err.value.status == 503 and err.value.code == "out_of_memory"
        assert err.value.headers.get("Retry-After")
        assert e.metrics.rejected.labels("out_of_memory")._value.get() == 1
    bench.run(main())


def test_a_failing_batch_does_not_stop_the_collector(bench):
    e = bench.collector(max_batch_size=64, max_wait=0.01)

    async def main():
        bad, good = FakeRunner(fail=True), FakeRunner()
        with pytest.raises(ServiceError) as err:
            await e.result(_job(e, bad, [1]))
        assert err.value.status == 500
        assert (await e.result(_job(e, good, [5])))["x"].tolist() == [10]
    bench.run(main())


def test_close_drains_every_queued_job_and_then_refuses(bench):
    e = bench.collector(max_batch_size=2, max_wait=5, eager=False)

    async def main():
        r = FakeRunner(delay=0.02)
        jobs = [_job(e, r, [i]) for i in range(5)]
        waiters = [asyncio.ensure_future(e.result(j)) for j in jobs]
        await e.close()
        assert [w.result()["x"].tolist() for w in waiters] == [[0], [2], [4], [6], [8]]
        with pytest.raises(ServiceError) as err:
            _job(e, r, [1])
        assert err.value.code == "draining"
    bench.run(main())


def test_draining_refuses_new_jobs_but_serves_admitted_ones(bench):
    e = bench.collector(max_batch_size=64, max_wait=5, eager=False, max_queue=1)

    async def main():
        r = FakeRunner()
        queued = _job(e, r, [1])
        e.drain()
        with pytest.raises(ServiceError) as err:
            _job(e, r, [2])
        assert err.value.status == 503 and err.value.code == "draining"
        assert err.value.headers.get("Retry-After")
        # part of a request accepted before: served, past the queue's limit too
        admitted = _job(e, r, [3, 4], admitted=True)
        t0 = time.monotonic()
        assert (await e.result(queued))["x"].tolist() == [2]
        assert (await e.result(admitted))["x"].tolist() == [6, 8]
        assert time.monotonic() - t0 < 2  # draining: no batch waits for company
        assert e.metrics.rejected.labels("draining")._value.get() == 1
    bench.run(main())


def test_eager_batching_closes_when_no_request_is_on_its_way(bench):
    arrivals = Arrivals()
    e = bench.collector(max_batch_size=64, max_wait=5, arrivals=arrivals)

    async def main():
        r = FakeRunner()
        t0 = time.monotonic()
        assert (await e.result(_job(e, r, [1])))["x"].tolist() == [2]  # nobody else coming
        assert time.monotonic() - t0 < 2
        arrivals.n = 1  # one more request is being received: the batch waits for it
        first = _job(e, r, [2])
        await asyncio.sleep(0.2)
        assert not first.future.done()
        arrivals.n = 0
        second = _job(e, r, [3])
        await asyncio.gather(e.result(first), e.result(second))
        assert r.calls == [1, 2]
    bench.run(main())


class SpanRunner(FakeRunner):
    """Records when each forward ran, to tell which overlapped."""

    def __init__(self, name: str, delay: float, pipelined: bool) -> None:
        super().__init__(delay)
        self.model, self.pipelined = name, pipelined
        self.spans: list[tuple[float, float]] = []

    def run(self, batch, lo, hi):
        t0 = time.monotonic()
        out = super().run(batch, lo, hi)
        self.spans.append((t0, time.monotonic()))
        return out


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_workers_compute_batches_side_by_side_but_long_batches_alone(bench):
    e = bench.collector(max_batch_size=2, max_wait=0, workers=2)

    async def main():
        tok = SpanRunner("tok", 0.3, pipelined=True)
        gen = SpanRunner("gen", 0.3, pipelined=False)
        jobs = [_job(e, tok, [i, i]) for i in range(2)]  # two full batches at once
        await asyncio.gather(*(e.result(j) for j in jobs))
        assert _overlap(*tok.spans)  # side by side, not one after the other
        jobs = [_job(e, gen, [1, 1]), _job(e, tok, [2, 2]), _job(e, gen, [3, 3])]
        out = await asyncio.gather(*(e.result(j) for j in jobs))
        assert [o["x"].tolist() for o in out] == [[2, 2], [4, 4], [6, 6]]
        assert not _overlap(*gen.spans)  # never two wide-grid generate batches at once
    bench.run(main())


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


def test_a_batch_that_runs_alone_waits_a_share_of_its_run_for_company(bench):
    e = bench.collector(max_batch_size=8, max_wait=0, arrivals=Arrivals())

    async def main():
        gen = SpanRunner("gen", 0.5, pipelined=False)
        first = [_job(e, gen, [1]), _job(e, gen, [2])]  # a batch of two: not a lone client
        await asyncio.gather(*(e.result(j) for j in first))
        a = _job(e, gen, [3])
        await asyncio.sleep(LONG_BATCH_PATIENCE * gen.delay / 3)  # past max_wait, in patience
        b = _job(e, gen, [4])
        await asyncio.gather(e.result(a), e.result(b))
        assert gen.calls == [2, 2]  # the latecomer joined the batch
    bench.run(main())


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
