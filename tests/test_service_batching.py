"""The batching engine: closing rules, admission (503), deadlines (504), dropped clients,
out-of-memory splitting, draining; and over HTTP, that batching happens and that seeded
results do not depend on batch-mates."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest
from service_helpers import (
    assert_error,
    async_client,
    metric,
    serving_models,
    settings,
    tiny_models,
)

from service.app import create_app
from service.batching import Arrivals, Engine
from service.errors import ServiceError
from service.metrics import Metrics


class FakeRunner:
    """Rows are numbers; the result doubles them. Records each forward's size."""

    operation = "op"
    model = "m"

    def __init__(self, delay: float = 0.0, oom_on=None, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.delay, self.oom_on, self.fail = delay, oom_on, fail

    def collate(self, payloads):
        return np.concatenate(payloads)

    def run(self, batch, lo, hi):
        rows = batch[lo:hi]
        if self.oom_on is not None and self.oom_on in rows:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        if self.fail:
            raise ValueError("boom")
        self.calls.append(hi - lo)
        time.sleep(self.delay)
        return {"x": rows * 2}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _engine(**kw) -> Engine:
    e = Engine(Metrics(), **kw)
    await e.start()
    return e


def _job(e: Engine, runner, values, shape=None, **kw):
    return e.submit(runner, shape, np.asarray(values), len(values), **kw)


def test_batch_closes_when_full_without_waiting():
    async def main():
        e = await _engine(max_batch_size=4, max_wait_ms=10_000)
        r = FakeRunner()
        t0 = time.monotonic()
        jobs = [_job(e, r, [i]) for i in range(4)]
        out = [await e.result(j) for j in jobs]
        assert time.monotonic() - t0 < 5
        assert r.calls == [4]
        assert [o["x"].tolist() for o in out] == [[0], [2], [4], [6]]
        await e.close()
    run(main())


def test_batch_closes_max_wait_after_the_first_arrival():
    async def main():
        e = await _engine(max_batch_size=64, max_wait_ms=150)
        r = FakeRunner()
        t0 = time.monotonic()
        jobs = [_job(e, r, [1])]
        await asyncio.sleep(0.05)
        jobs.append(_job(e, r, [2, 3]))
        await asyncio.gather(*(e.result(j) for j in jobs))
        waited = time.monotonic() - t0
        assert 0.14 <= waited < 2, waited
        assert r.calls == [3]  # one batch, counted in images
        await e.close()
    run(main())


def test_images_not_requests_fill_a_batch_and_big_jobs_run_alone_in_chunks():
    async def main():
        e = await _engine(max_batch_size=4, max_wait_ms=50)
        r = FakeRunner()
        a, b = _job(e, r, [1, 2, 3]), _job(e, r, [4, 5])
        big = _job(e, r, list(range(10)))
        ra, rb, rbig = await e.result(a), await e.result(b), await e.result(big)
        assert ra["x"].tolist() == [2, 4, 6] and rb["x"].tolist() == [8, 10]
        assert rbig["x"].tolist() == [2 * i for i in range(10)]
        assert r.calls == [3, 2, 4, 4, 2]
        await e.close()
    run(main())


def test_different_shapes_never_share_a_batch():
    async def main():
        e = await _engine(max_batch_size=8, max_wait_ms=50)
        r = FakeRunner()
        jobs = [_job(e, r, [i], shape=(7, 7 + i % 2)) for i in range(4)]
        await asyncio.gather(*(e.result(j) for j in jobs))
        assert sorted(r.calls) == [2, 2]
        await e.close()
    run(main())


def test_full_queue_is_503_with_retry_after():
    async def main():
        e = await _engine(max_batch_size=64, max_wait_ms=300, max_queue=3, retry_after_s=2)
        r = FakeRunner()
        first = _job(e, r, [1, 2])
        with pytest.raises(ServiceError) as err:
            _job(e, r, [3, 4])
        assert err.value.status == 503 and err.value.headers["Retry-After"] == "2"
        assert (await e.result(first))["x"].tolist() == [2, 4]
        assert e.metrics.rejected.labels("queue_full")._value.get() == 1
        await e.close()
    run(main())


def test_passed_deadline_is_504_and_not_computed():
    async def main():
        e = await _engine(max_batch_size=64, max_wait_ms=2000, timeout_s=0.1)
        r = FakeRunner()
        job = _job(e, r, [1])
        t0 = time.monotonic()
        with pytest.raises(ServiceError) as err:
            await e.result(job)
        assert err.value.status == 504 and time.monotonic() - t0 < 1.5
        await asyncio.sleep(0.05)
        assert r.calls == [] and e.queued_images == 0
        assert e.metrics.rejected.labels("deadline")._value.get() == 1
        await e.close()
    run(main())


def test_a_job_that_barely_waited_is_not_asked_whether_its_client_left():
    async def main():
        e = await _engine(max_batch_size=64, max_wait_ms=1, gone_check_after_s=10)
        r = FakeRunner()
        asked = []

        async def gone():
            asked.append(1)
            return True

        assert (await e.result(_job(e, r, [1], is_gone=gone)))["x"].tolist() == [2]
        assert asked == [] and r.calls == [1]
        await e.close()
    run(main())


def test_gone_and_cancelled_clients_cost_no_compute():
    async def main():
        e = await _engine(max_batch_size=64, max_wait_ms=50, gone_check_after_s=0)
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
        await e.close()
    run(main())


def test_out_of_memory_splits_and_every_request_succeeds():
    async def main():
        e = await _engine(max_batch_size=64, max_wait_ms=50, fault_oom_above=2)
        r = FakeRunner()
        jobs = [_job(e, r, [i, i + 100]) for i in range(3)] + [_job(e, r, [7])]
        out = [await e.result(j) for j in jobs]
        assert [o["x"].tolist() for o in out] == [[0, 200], [2, 202], [4, 204], [14]]
        assert max(r.calls) <= 2 and sum(r.calls) == 7
        assert e.metrics.oom_splits.labels("op", "m")._value.get() >= 2
        await e.close()
    run(main())


def test_out_of_memory_on_one_image_fails_only_its_request():
    async def main():
        e = await _engine(max_batch_size=64, max_wait_ms=50)
        r = FakeRunner(oom_on=-1)
        ok1, bad, ok2 = _job(e, r, [1, 2]), _job(e, r, [-1]), _job(e, r, [3])
        assert (await e.result(ok1))["x"].tolist() == [2, 4]
        assert (await e.result(ok2))["x"].tolist() == [6]
        with pytest.raises(ServiceError) as err:
            await e.result(bad)
        assert err.value.status == 503 and err.value.code == "out_of_memory"
        await e.close()
    run(main())


def test_a_failing_batch_does_not_stop_the_engine():
    async def main():
        e = await _engine(max_batch_size=64, max_wait_ms=10)
        bad, good = FakeRunner(fail=True), FakeRunner()
        with pytest.raises(ServiceError) as err:
            await e.result(_job(e, bad, [1]))
        assert err.value.status == 500
        assert (await e.result(_job(e, good, [5])))["x"].tolist() == [10]
        await e.close()
    run(main())


def test_close_drains_every_queued_job_and_then_refuses():
    async def main():
        e = await _engine(max_batch_size=2, max_wait_ms=5000)
        r = FakeRunner(delay=0.02)
        jobs = [_job(e, r, [i]) for i in range(5)]
        waiters = [asyncio.ensure_future(e.result(j)) for j in jobs]
        await e.close()
        assert [w.result()["x"].tolist() for w in waiters] == [[0], [2], [4], [6], [8]]
        with pytest.raises(ServiceError) as err:
            _job(e, r, [1])
        assert err.value.code == "draining"
    run(main())


# ---- over HTTP ------------------------------------------------------------------------------
def _batches(text: str, op: str = "generate", model: str = "mnist") -> tuple[float, float]:
    return (metric(text, "taming_batch_size_count", operation=op, model=model),
            metric(text, "taming_batch_size_sum", operation=op, model=model))


def test_concurrent_requests_run_in_fewer_batches():
    app = create_app(settings(**tiny_models("mnist"), eager_batching=False, max_wait_ms=300))

    async def main():
        async with async_client(app) as c:
            rs = await asyncio.gather(*(c.post("/generate", json={"seed": i}) for i in range(16)))
            assert all(r.status_code == 200 for r in rs)
            rs = await asyncio.gather(*(c.post("/decode", json={"tokens": [[i % 16] * 7] * 7})
                                        for i in range(8)))
            assert all(r.status_code == 200 for r in rs)
            text = (await c.get("/metrics")).text
            count, total = _batches(text)
            assert total == 16 and count <= 4, (count, total)
            count, total = _batches(text, "decode")
            assert total == 8 and count <= 2, (count, total)
    run(main())


def test_batching_off_with_max_batch_size_1():
    app = create_app(settings(**tiny_models("mnist"), max_batch_size=1, max_wait_ms=50))

    async def main():
        async with async_client(app) as c:
            rs = await asyncio.gather(*(c.post("/generate", json={"seed": i}) for i in range(4)))
            assert all(r.status_code == 200 for r in rs)
            r = await c.post("/generate", json={"seed": 9, "n": 3})
            assert r.status_code == 200
            count, total = _batches((await c.get("/metrics")).text)
            assert count == total == 7
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


def test_seeded_generate_is_identical_alone_and_in_a_burst_of_32():
    app = create_app(settings(**serving_models(), eager_batching=False, max_wait_ms=100))
    target = {"seed": 1234, "label": 7, "n": 2}

    async def main():
        async with async_client(app) as c:
            alone = await c.post("/generate", json=target)
            alone_json = await c.post("/generate", json=target,
                                      headers={"Accept": "application/json"})
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
            # the burst really was batched
            count, total = _batches((await c.get("/metrics")).text)
            b_count, b_total = _batches(before)
            images = sum(b.get("n", 1) for b in bodies)
            assert total - b_total == images and count - b_count < len(bodies)
            # and a request of the burst gives, alone, what it gave in the burst
            again = await c.post("/generate", json=bodies[3])
            assert again.content == rs[3].content
    run(main())


def test_64_identical_seeded_requests_at_once_give_64_identical_answers():
    app = create_app(settings(**serving_models(), eager_batching=False, max_wait_ms=50))
    body = {"seed": 77, "label": 4}

    async def main():
        async with async_client(app) as c:
            alone = await c.post("/generate", json=body, headers={"Accept": "application/json"})
            rs = await asyncio.gather(*(c.post("/generate", json=body,
                                               headers={"Accept": "application/json"})
                                        for _ in range(64)))
            assert all(r.status_code == 200 for r in rs)
            answers = {r.content for r in rs}
            assert answers == {alone.content}, f"{len(answers)} different answers"
            count, total = _batches((await c.get("/metrics")).text)
            assert total == 65 and count < 65  # they were batched, not run one by one
    run(main())


def test_full_queue_over_http_is_503_with_retry_after():
    app = create_app(settings(**tiny_models("mnist"), max_queue=2, eager_batching=False, max_wait_ms=1500,
                              retry_after_s=3))

    async def main():
        async with async_client(app) as c:
            first = asyncio.ensure_future(c.post("/generate", json={"seed": 1, "n": 2}))
            await asyncio.sleep(0.3)
            r = await c.post("/generate", json={"seed": 2})
            err = assert_error(r, 503, "overloaded")
            assert "queue" in err["message"] and r.headers["retry-after"] == "3"
            assert (await first).status_code == 200
            text = (await c.get("/metrics")).text
            assert metric(text, "taming_rejected_total", reason="queue_full") == 1
            assert metric(text, "taming_requests_total", endpoint="/generate", status="503") == 1
    run(main())


def test_a_full_queue_refuses_before_reading_the_body():
    """Under a retry storm a refusal must be cheap: no multipart parsing, no image decoding."""
    app = create_app(settings(**tiny_models("mnist"), max_queue=2, eager_batching=False,
                              max_wait_ms=1500))

    async def main():
        async with async_client(app) as c:
            first = asyncio.ensure_future(c.post("/generate", json={"seed": 1, "n": 2}))
            await asyncio.sleep(0.3)
            # bodies that would be 422 if they were read: the queue answers first
            assert_error(await c.post("/encode", content=b"not an image",
                                      headers={"content-type": "image/png"}), 503, "overloaded")
            assert_error(await c.post("/decode", json={"tokens": [[99999]]}), 503, "overloaded")
            assert_error(await c.post("/generate", json={"label": 99}), 503, "overloaded")
            assert (await first).status_code == 200
            # with room again, the same bodies get their own answers
            assert_error(await c.post("/encode", content=b"not an image",
                                      headers={"content-type": "image/png"}), 422)
            text = (await c.get("/metrics")).text
            assert metric(text, "taming_rejected_total", reason="queue_full") == 3
    run(main())


def test_passed_deadline_over_http_is_504():
    app = create_app(settings(**tiny_models("mnist"), request_timeout_s=0.2, eager_batching=False,
                              max_wait_ms=3000))

    async def main():
        async with async_client(app) as c:
            t0 = time.monotonic()
            r = await c.post("/generate", json={"seed": 1})
            assert_error(r, 504, "deadline_exceeded")
            assert time.monotonic() - t0 < 2
            text = (await c.get("/metrics")).text
            assert metric(text, "taming_rejected_total", reason="deadline") == 1
            assert _batches(text)[0] == 0  # never computed
    run(main())


def test_injected_out_of_memory_splits_and_answers_the_same():
    body = {"seed": 5, "n": 8, "label": 4}
    json_accept = {"Accept": "application/json"}

    async def fetch(app):
        async with async_client(app) as c:
            r = await c.post("/generate", json=body, headers=json_accept)
            assert r.status_code == 200, r.text
            return r.json(), (await c.get("/metrics")).text

    plain, _ = run(fetch(create_app(settings(**tiny_models("mnist")))))
    split, text = run(fetch(create_app(settings(**tiny_models("mnist"), fault_oom_above=2))))
    assert split == plain
    assert metric(text, "taming_oom_splits_total", operation="generate", model="mnist") >= 3
    # every forward that ran held at most 2 images
    assert metric(text, "taming_batch_size_bucket", operation="generate", model="mnist",
                  le="2.0") == _batches(text)[0]


def test_draining_turns_readyz_and_inference_503_but_health_stays():
    app = create_app(settings(**tiny_models("mnist"), warmup=False))

    async def main():
        async with async_client(app) as c:
            assert (await c.get("/readyz")).status_code == 200
            app.state.service.begin_drain()
            r = await c.get("/readyz")
            assert_error(r, 503, "draining")
            assert r.headers["retry-after"]
            r = await c.post("/generate", json={"seed": 1})
            assert_error(r, 503, "draining")
            assert r.headers["retry-after"]
            assert (await c.get("/healthz")).status_code == 200
            text = (await c.get("/metrics")).text
            assert metric(text, "taming_rejected_total", reason="draining") == 1
    run(main())


def test_eager_batching_closes_when_no_request_is_on_its_way():
    async def main():
        arrivals = Arrivals()
        e = await _engine(max_batch_size=64, max_wait_ms=5000, arrivals=arrivals)
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
        await e.close()
    run(main())


def test_eager_batching_over_http():
    app = create_app(settings(**tiny_models("mnist"), max_wait_ms=3000, eager_batching=True))

    async def main():
        async with async_client(app) as c:
            t0 = time.monotonic()
            assert (await c.post("/generate", json={"seed": 1})).status_code == 200
            assert time.monotonic() - t0 < 2.5  # did not wait max_wait_ms for company
            rs = await asyncio.gather(*(c.post("/generate", json={"seed": i}) for i in range(8)))
            assert all(r.status_code == 200 for r in rs)
            count, total = _batches((await c.get("/metrics")).text)
            assert total == 9 and count <= 3, (count, total)
    run(main())


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


def test_workers_compute_batches_side_by_side_but_generate_alone():
    async def main():
        e = await _engine(max_batch_size=2, max_wait_ms=0, workers=2)
        tok = SpanRunner("tok", 0.3, pipelined=True)
        gen = SpanRunner("gen", 0.3, pipelined=False)
        jobs = [_job(e, tok, [i, i]) for i in range(2)]  # two full batches at once
        await asyncio.gather(*(e.result(j) for j in jobs))
        assert _overlap(*tok.spans)  # side by side, not one after the other
        jobs = [_job(e, gen, [1, 1]), _job(e, tok, [2, 2]), _job(e, gen, [3, 3])]
        out = await asyncio.gather(*(e.result(j) for j in jobs))
        assert [o["x"].tolist() for o in out] == [[2, 2], [4, 4], [6, 6]]
        assert not _overlap(*gen.spans)  # never two generate batches at once
        await e.close()
    run(main())


def test_model_threads_run_at_the_niceness_asked_for():
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def main():
        base = niceness()
        e = await _engine(workers=2, nice=3)
        assert await e.call(niceness) == min(19, base + 3)
        assert niceness() == base  # the event loop's thread keeps its own
        await e.close()
    run(main())


def test_a_batch_that_runs_alone_waits_a_tenth_of_its_run_for_company():
    async def main():
        e = await _engine(max_batch_size=8, max_wait_ms=0, arrivals=Arrivals())
        gen = SpanRunner("gen", 0.5, pipelined=False)
        first = [_job(e, gen, [1]), _job(e, gen, [2])]  # a batch of two: not a lone client
        await asyncio.gather(*(e.result(j) for j in first))
        a = _job(e, gen, [3])
        await asyncio.sleep(0.02)  # past max_wait, well within 0.1 x 0.5 s
        b = _job(e, gen, [4])
        await asyncio.gather(e.result(a), e.result(b))
        assert gen.calls == [2, 2]  # the latecomer joined the batch
        await e.close()
    run(main())
