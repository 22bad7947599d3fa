"""The collector (service.engine.batches) on fake runners, without HTTP or a model: closing
rules, admission (503), deadlines (504), dropped clients, out-of-memory splitting, draining,
workers side by side and the patience of a batch that runs alone."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

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

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


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
