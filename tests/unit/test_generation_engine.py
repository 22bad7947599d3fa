"""The generation engine (service.engine.lanes) driven through its public methods with a fake
runner: no HTTP, no model. The fake writes code (seed * 7 + cell) % 97 at each cell of a row,
so a wrong join, move, release or delivery shows up as a wrong grid."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.engine.admission import Admission
from service.engine.lanes import GenerationEngine
from service.errors import ServiceError
from service.metrics import Metrics

GRID = (2, 3)
CELLS = GRID[0] * GRID[1]


def expected(seed: int) -> np.ndarray:
    return (seed * 7 + np.arange(CELLS)) % 97


class FakeRunner:
    """A lane's device side as the lane uses it: rows seeded, parked, moved and stepped.
    It checks what the engine must guarantee: a step covers every occupied row, a row is
    seeded only when free, and moves go from occupied rows to free ones."""

    def __init__(self, capacity: int = 4, sizes: tuple[int, ...] = (2, 4)) -> None:
        self.capacity, self.sizes = capacity, sizes
        self.grid, self.cols, self.seq_len = GRID, GRID[1], CELLS
        self.seeds = [-1] * capacity  # -1: free
        self.pos = [0] * capacity
        self.out = np.zeros((capacity, CELLS), dtype=np.int64)
        self.steps: list[int] = []  # padded size of each step
        self.moves: list[tuple[int, int]] = []
        self.fail_next = threading.Event()
        self.gate: threading.Semaphore | None = None  # when set, a step waits for a permit

    def prepare(self, compile: bool, compile_deadline: float) -> int:
        return 0

    def release(self, rows: list[int]) -> None:
        for r in rows:
            self.seeds[r] = -1

    def seed_row(self, row: int, seed: int) -> None:
        assert self.seeds[row] == -1, f"row {row} seeded while held"
        self.seeds[row], self.pos[row] = seed, 0

    def seed(self, images) -> None:
        for im in images:
            for row in im.rows:
                self.seed_row(row, im.job.image(im.index))

    def move(self, src: list[int], dst: list[int]) -> None:
        for s, d in zip(src, dst, strict=True):
            assert self.seeds[s] != -1 and self.seeds[d] == -1, (s, d)
            self.seeds[d], self.pos[d], self.out[d] = self.seeds[s], self.pos[s], self.out[s]
            self.seeds[s] = -1
            self.moves.append((s, d))

    def step(self, size: int, filtered: bool) -> None:
        if self.gate is not None:
            assert self.gate.acquire(timeout=10)
        if self.fail_next.is_set():
            self.fail_next.clear()
            raise RuntimeError("device fault")
        held = [r for r in range(self.capacity) if self.seeds[r] != -1]
        assert all(r < size for r in held), f"rows {held} held beyond the step's size {size}"
        self.steps.append(size)
        for r in held:
            self.out[r, self.pos[r]] = (self.seeds[r] * 7 + self.pos[r]) % 97
            self.pos[r] += 1

    def codes(self, images) -> dict[int, np.ndarray]:
        return {im.cond: self.out[im.cond].copy() for im in images}

    def pictures(self, rows, finished, codes, decode, patches) -> dict:
        out = {id(im): codes[im.cond].reshape(GRID).astype(np.uint8) for im in finished}
        for im in rows:
            out.setdefault(id(im), codes[im.cond][:im.pos].copy())
        return out


def engine(runners: list[FakeRunner], max_queue: int = 64) -> GenerationEngine:
    metrics = Metrics()
    return GenerationEngine("fake", runners, metrics, decode=lambda x: x,
                            admission=Admission(metrics, max_queue=max_queue))


async def generate(gen: GenerationEngine, n: int, seed: int, *, guided: bool = False,
                   on_row=None) -> np.ndarray:
    job = gen.submit(n, lambda i: seed + i, guided=guided, grid=GRID, on_row=on_row)
    return await job.future


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_every_image_gets_its_own_codes_through_joins_and_leaves() -> None:
    """More images than rows, guided and plain mixed, over two lanes: each image's grid is
    its own seed's, whichever rows and lane it held."""
    runners = [FakeRunner(), FakeRunner()]

    async def main():
        gen = engine(runners)
        await gen.start()
        jobs = [generate(gen, n, 100 * k, guided=k % 3 == 0) for k, n in
                enumerate([1, 3, 2, 1, 4, 1, 2])]
        out = await asyncio.gather(*jobs)
        await gen.close()
        return out

    for k, tokens in enumerate(run(main())):
        for i, grid in enumerate(tokens):
            assert grid.tolist() == expected(100 * k + i).tolist(), (k, i)
    assert all(r.seeds == [-1] * r.capacity for r in runners)  # every row freed
    assert sum(len(r.steps) for r in runners) >= CELLS
    assert any(r.steps for r in runners) and all(s in (2, 4) for r in runners for s in r.steps)


def test_streamed_rows_arrive_in_order_before_the_answer() -> None:
    rows: list[tuple[int, int, list[int]]] = []

    async def main():
        gen = engine([FakeRunner()])
        await gen.start()
        tokens = await generate(gen, 2, 5, on_row=lambda i, r, cells, _: rows.append(
            (i, r, cells.tolist())))
        await gen.close()
        return tokens

    tokens = run(main())
    for i in range(2):
        mine = [(r, cells) for j, r, cells in rows if j == i]
        assert [r for r, _ in mine] == [0, 1]
        for r, cells in mine:
            assert cells == expected(5 + i)[r * GRID[1]:(r + 1) * GRID[1]].tolist()
        assert tokens[i].tolist() == expected(5 + i).tolist()


def test_a_cancelled_job_leaves_and_the_others_finish() -> None:
    runner = FakeRunner(capacity=2, sizes=(2,))

    async def main():
        gen = engine([runner])
        await gen.start()
        first = gen.submit(1, lambda i: 1, guided=False, grid=GRID)
        waiting = gen.submit(2, lambda i: 20 + i, guided=False, grid=GRID)
        queued = gen.admission.queued
        gen.cancel(waiting, "client_gone", ServiceError(499, "client_gone", "gone"))
        left = gen.admission.queued
        later = await generate(gen, 1, 9)
        done = await first.future
        with pytest.raises(ServiceError):
            await waiting.future
        await gen.close()
        return queued, left, done, later

    queued, left, done, later = run(main())
    assert left < queued  # its waiting images left the queue at once
    assert done[0].tolist() == expected(1).tolist()
    assert later[0].tolist() == expected(9).tolist()
    assert runner.seeds == [-1, -1]


def test_rows_left_high_are_moved_down_and_keep_their_state() -> None:
    """Four images in rows 0-3; the two lowest leave: the other two move to rows 0 and 1,
    the step shrinks to size 2, and their grids carry on where they were."""
    runner = FakeRunner(capacity=4, sizes=(2, 4))
    runner.gate = threading.Semaphore(0)

    async def main():
        gen = engine([runner])
        await gen.start()
        jobs = [gen.submit(1, lambda i, k=k: 10 * k, guided=False, grid=GRID) for k in range(4)]
        while not all(j.started is not None for j in jobs):  # one step at a time until seated
            before = len(runner.steps)
            runner.gate.release()
            while len(runner.steps) == before:
                await asyncio.sleep(0.002)
        assert len(runner.steps) < CELLS  # none has finished
        for j in jobs[:2]:
            gen.cancel(j, "client_gone", ServiceError(499, "client_gone", "gone"))
        runner.gate.release(100)
        out = [await j.future for j in jobs[2:]]
        assert all(j.future.exception().status == 499 for j in jobs[:2])
        await gen.close()
        return out

    out = run(main())
    assert [o[0].tolist() for o in out] == [expected(20).tolist(), expected(30).tolist()]
    assert sorted(runner.moves) == [(2, 0), (3, 1)]
    assert runner.steps[-1] == 2


def test_a_failed_step_fails_its_lane_s_jobs_and_the_lane_serves_on() -> None:
    runner = FakeRunner()

    async def main():
        gen = engine([runner])
        await gen.start()
        runner.fail_next.set()
        with pytest.raises(ServiceError) as err:
            await generate(gen, 2, 3)
        after = await generate(gen, 1, 4)
        await gen.close()
        return err.value, after

    error, after = run(main())
    assert error.status == 500 and error.code == "internal_error"
    assert after[0].tolist() == expected(4).tolist()
    assert runner.seeds == [-1] * runner.capacity


def test_closing_finishes_what_was_admitted_and_refuses_the_rest() -> None:
    async def main():
        gen = engine([FakeRunner()])
        await gen.start()
        job = gen.submit(3, lambda i: 7 + i, guided=True, grid=GRID)
        closing = asyncio.ensure_future(gen.close())
        await asyncio.sleep(0)
        with pytest.raises(ServiceError) as refused:
            gen.submit(1, lambda i: 0, guided=False, grid=GRID)
        tokens = await job.future
        await closing
        return tokens, refused.value

    tokens, refused = run(main())
    assert [t.tolist() for t in tokens] == [expected(7 + i).tolist() for i in range(3)]
    assert refused.status == 503


def test_an_engine_without_a_canvas_runner_refuses_a_wider_grid() -> None:
    async def main():
        gen = engine([FakeRunner()])
        await gen.start()
        try:
            with pytest.raises(ValueError):
                gen.submit(1, lambda i: 0, guided=False, grid=(4, 4))
            assert gen.admission.queued == 0
        finally:
            await gen.close()

    run(main())
