"""The slot sampler (continuous batching's step) against the reference sampler: images that
join at random steps, in random rows, beside any other images, get the reference's tokens."""

from __future__ import annotations

import random

import pytest
import torch
from model_helpers import mixed_batch, tiny

from models.sampling import SamplingBatch, make_batch, reference_generate
from models.slots import SlotSampler, compiled_steps, padded_sizes, step_variants


def staggered(sampler: SlotSampler, batch: SamplingBatch, seed: int, step=None,
              move: bool = False) -> torch.Tensor:
    """Admit the images of `batch` a few at a time at random steps into random free rows,
    step every occupied size (moving rows between steps if asked), and collect each image's
    codes when it leaves."""
    rng = random.Random(seed)
    cfg = sampler.gpt.config
    T = cfg.seq_len
    step = step or sampler
    free = list(range(sampler.capacity))
    waiting = list(range(len(batch)))
    active: dict[int, tuple[int, int, int | None]] = {}
    out: dict[int, torch.Tensor] = {}
    t = 0
    while waiting or active:
        for _ in range(rng.randint(0, 2)):
            if not waiting:
                break
            row = batch.rows(waiting[0], waiting[0] + 1)
            guided = bool(row.cfg_scale[0] != 1)
            if len(free) < 1 + guided:
                break
            i = waiting.pop(0)
            c = free.pop(rng.randrange(len(free)))
            u = free.pop(rng.randrange(len(free))) if guided else None
            sampler.admit([c], [u], row, cfg.null_class)
            active[i] = (t, c, u)
        if move and active and free and rng.random() < 0.3:  # a row moves to a free one
            i, (start, c, u) = rng.choice(sorted(active.items()))
            which = rng.choice([0, 1] if u is not None else [0])
            old, new = (c, u)[which], free.pop(rng.randrange(len(free)))
            sampler.move([old], [new])
            free.append(old)
            active[i] = (start, new, u) if which == 0 else (start, c, new)
        if active:
            top = max(r for _, c, u in active.values() for r in (c, u) if r is not None) + 1
            size = next(s for s in sampler.sizes if s >= top)
            step(size)
        t += 1
        for i, (start, c, u) in list(active.items()):
            if t - start == T:
                out[i] = sampler.out[c].clone()
                rows = [c] if u is None else [c, u]
                sampler.release(rows)
                free += rows
                del active[i]
    return torch.stack([out[i] for i in range(len(batch))])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("window", [(1, 1), (3, 9)])
def test_images_joining_at_any_step_get_the_reference_tokens(seed, window):
    m = tiny(window)
    batch = mixed_batch(m, seed, sizes=(3, 2, 3))
    got = staggered(SlotSampler(m, 12), batch, seed)
    assert torch.equal(got, reference_generate(m, batch))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_that_move_between_steps_keep_their_tokens(seed):
    """Compaction moves a row (its cache, settings and guidance pairing) to a free one."""
    m = tiny((2, 3))
    batch = mixed_batch(m, seed, sizes=(3, 2, 3))
    got = staggered(SlotSampler(m, 14), batch, seed, move=True)
    assert torch.equal(got, reference_generate(m, batch))


def test_unfiltered_step_skips_the_sort_and_picks_the_same_codes():
    m = tiny()
    g = torch.Generator().manual_seed(3)
    batch = SamplingBatch.cat([make_batch(m.config, 2, m.config.grid, label=1, generator=g),
                               make_batch(m.config, 2, m.config.grid, cfg_scale=2.0, generator=g)])
    a, b = SlotSampler(m, 6), SlotSampler(m, 6)
    for s in (a, b):
        s.admit([0, 1, 2, 3], [None, None, 4, 5], batch, m.config.null_class)
    for _ in range(m.config.seq_len):
        a(6, True)
        b(6, False)
    assert torch.equal(a.out[:4], b.out[:4])
    assert torch.equal(a.out[:4], reference_generate(m, batch))


def test_compiled_steps_with_and_without_the_sort_pick_the_same_codes():
    """On CPU each size has a traced step with the sort and one without; for rows that use
    neither top-k nor top-p both pick the reference's codes."""
    m = tiny()
    g = torch.Generator().manual_seed(5)
    batch = SamplingBatch.cat([make_batch(m.config, 3, m.config.grid, label=2, generator=g),
                               make_batch(m.config, 2, m.config.grid, cfg_scale=2.0, generator=g)])
    assert step_variants("cpu") == (True, False) and step_variants("cuda") == (True,)
    outs = []
    with torch.inference_mode():
        for filtered in (True, False):
            sampler = SlotSampler(m, 8)
            run = compiled_steps(sampler)
            sampler.admit([0, 1, 2, 3, 4], [None, None, None, 5, 6], batch, m.config.null_class)
            for _ in range(m.config.seq_len):
                run(8, filtered)
            outs.append(sampler.out[:5].clone())
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[1], reference_generate(m, batch))


def test_padded_sizes():
    assert padded_sizes(128) == (8, 16, 32, 64, 128)
    assert padded_sizes(100) == (8, 16, 32, 64, 100)
    assert padded_sizes(2) == (2,)
    assert padded_sizes(64, linear=True) == (2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64)
    assert padded_sizes(18, linear=True) == (2, 4, 8, 12, 16, 18)
    assert padded_sizes(2, linear=True) == (2,)


def test_compiled_step_picks_the_eager_steps_tokens():
    """The compiled step (a frozen TorchScript graph per padded size on CPU): the same codes
    as the reference for images that join at random steps."""
    m = tiny()
    batch = mixed_batch(m, 5, sizes=(3, 2, 3))
    sampler = SlotSampler(m, 16)
    with torch.inference_mode():
        got = staggered(sampler, batch, 5, compiled_steps(sampler))
    assert torch.equal(got, reference_generate(m, batch))
