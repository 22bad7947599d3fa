"""A lane's scheduler (service.engine.scheduler) on its own, without a model: seating,
compaction, finished rows and release are plain bookkeeping."""

from __future__ import annotations

import random
from dataclasses import dataclass

from service.engine.jobs import Image
from service.engine.scheduler import Scheduler


@dataclass(eq=False)
class FakeJob:
    guided: bool = False
    filtered: bool = False
    on_row: object = None
    first_row: float | None = None
    cancelled: str | None = None


def images(n: int, **job) -> list[Image]:
    j = FakeJob(**job)
    return [Image(j, i) for i in range(n)]


def sched(capacity: int = 8, sizes=(2, 4, 8), cols: int = 3, seq_len: int = 9) -> Scheduler:
    return Scheduler(capacity, sizes, cols, seq_len)


def occupied(s: Scheduler) -> list[int]:
    return [r for im in s.active for r in im.rows]


def consistent(s: Scheduler) -> None:
    rows = occupied(s)
    assert len(rows) == len(set(rows)), rows  # no row held twice
    assert sorted(rows + s.free) == list(range(s.capacity))  # every row free or held
    assert s.free == sorted(s.free)
    assert s.filtering == sum(im.job.filtered for im in s.active)


def test_unguided_images_take_one_row_guided_two_lowest_first():
    s = sched()
    a, = images(1)
    g, = images(1, guided=True)
    assert s.seat(a) and s.seat(g)
    assert (a.cond, a.uncond, g.cond, g.uncond) == (0, None, 1, 2)
    s.admit([a, g])
    consistent(s)


def test_an_image_that_does_not_fit_changes_nothing():
    s = sched(capacity=3)
    first = images(1, guided=True)[0]
    assert s.seat(first)
    s.admit([first])
    late = images(1, guided=True)[0]
    assert not s.seat(late)
    assert s.free == [2] and late.cond == -1
    consistent(s)


def test_compaction_moves_high_rows_into_free_rows_below_the_padded_size():
    s = sched()
    ims = images(6)
    for im in ims:
        assert s.seat(im)
    s.admit(ims)
    assert s.compact() == (8, [], [])  # six rows step at size 8
    s.release(ims[:4])  # rows 0-3 leave: rows 4 and 5 fit in size 2 once moved down
    size, src, dst = s.compact()
    assert size == 2 and src == [4, 5] and dst == [0, 1]
    assert [im.cond for im in s.active] == [0, 1]
    consistent(s)
    assert max(occupied(s)) < size


def test_a_guided_pair_moves_each_of_its_rows():
    s = sched()
    filler = images(3)
    pair = images(1, guided=True)[0]
    for im in [*filler, pair]:
        assert s.seat(im)
    s.admit([*filler, pair])
    assert (pair.cond, pair.uncond) == (3, 4)
    s.release(filler)
    size, src, dst = s.compact()
    assert size == 2 and sorted(src) == [3, 4] and sorted(dst) == [0, 1]
    assert {pair.cond, pair.uncond} == {0, 1}
    consistent(s)


def test_advance_reports_rows_of_streamed_jobs_and_the_first_row_of_others():
    s = sched(cols=3, seq_len=9)
    plain = images(1)[0]
    streamed = images(1, on_row=print)[0]
    for im in (plain, streamed):
        s.seat(im)
    s.admit([plain, streamed])
    reported = []
    for step in range(1, 10):
        rows, finished = s.advance()
        reported.append((step, [im is streamed for im in rows], len(finished)))
        if plain in rows:
            plain.job.first_row = float(step)  # the event loop records it
    assert [r for r in reported if r[1]] == [(3, [False, True], 0), (6, [True], 0),
                                             (9, [True], 2)]
    assert all(f == 0 for step, _, f in reported if step < 9)


def test_release_frees_rows_and_filtering_and_clear_empties_the_lane():
    s = sched()
    top = images(2, filtered=True)
    rest = images(2, guided=True)
    for im in [*top, *rest]:
        assert s.seat(im)
    s.admit([*top, *rest])
    assert s.filtered
    assert sorted(s.release(top)) == [0, 1]
    assert not s.filtered
    consistent(s)
    rest[0].job.cancelled = "client_gone"
    assert s.cancelled() == rest
    assert s.clear() == rest
    assert s.active == [] and s.free == list(range(8))


def test_random_joins_leaves_and_compactions_keep_the_books_straight():
    rng = random.Random(0)
    s = sched(capacity=16, sizes=(2, 4, 8, 12, 16))
    waiting: list[Image] = []
    for _ in range(500):
        op = rng.random()
        if op < 0.4:
            waiting += images(rng.randint(1, 3), guided=rng.random() < 0.5,
                              filtered=rng.random() < 0.3)
            joined = []
            while waiting and s.seat(waiting[0]):
                joined.append(waiting.pop(0))
            s.admit(joined)
        elif op < 0.7 and s.active:
            s.release(rng.sample(s.active, rng.randint(1, len(s.active))))
        elif s.active:
            size, src, dst = s.compact()
            assert len(src) == len(dst) and all(d < size for d in dst)
            assert max(occupied(s)) < size
            assert size == min(x for x in s.sizes if x >= len(occupied(s)))
        consistent(s)
