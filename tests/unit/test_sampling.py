"""The fast sampler against the reference sampler, and the sampler's contract."""

import pytest
import torch
from model_helpers import gen, mixed_batch, tiny

from models.canvas import canvas_reference, generate_canvas
from models.sampling import FREE, SamplingBatch, choose, make_batch, reference_generate
from models.slots import generate, sample


@pytest.mark.parametrize("window", [(1, 1), (2, 3), (3, 7), (3, 9)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_fast_sampler_equals_reference(window, seed):
    m = tiny(window)
    batch = mixed_batch(m, seed, sizes=(1, 3, 2))
    assert torch.equal(generate(m, batch), reference_generate(m, batch))


@pytest.mark.parametrize("window", [(1, 1), (2, 3), (3, 9)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_sampler_equals_reference_with_relative_positions(window, seed):
    m = tiny(window, positions="relative")
    batch = mixed_batch(m, seed, sizes=(1, 3, 2))
    assert torch.equal(generate(m, batch), reference_generate(m, batch))


@pytest.mark.parametrize("batch_sizes", [(1,), (8,), (5, 11)])
def test_equivalence_for_batch_sizes(batch_sizes):
    m = tiny()
    batch = mixed_batch(m, 3, sizes=batch_sizes)
    assert torch.equal(generate(m, batch), reference_generate(m, batch))


def test_seeded_rows_do_not_depend_on_batch_mates():
    m = tiny()
    cfg, grid = m.config, m.config.grid
    alone = generate(m, make_batch(cfg, 1, grid, label=2, top_k=6, generator=gen(7)))
    others = make_batch(cfg, 9, grid, label=None, cfg_scale=3.0, generator=gen(1))
    mine = make_batch(cfg, 1, grid, label=2, top_k=6, generator=gen(7))
    together = generate(m, SamplingBatch.cat([others, mine]))
    assert torch.equal(together[-1:], alone)


def test_guidance_scale_one_equals_conditional():
    m = tiny()
    cfg, grid = m.config, m.config.grid
    plain = make_batch(cfg, 4, grid, label=1, generator=gen(3))
    guided_mates = make_batch(cfg, 2, grid, label=0, cfg_scale=2.0, generator=gen(4))
    out = generate(m, SamplingBatch.cat([plain, guided_mates]))  # batch doubled for guidance
    assert torch.equal(out[:4], generate(m, plain))


def test_top_k_one_is_greedy():
    m = tiny()
    cfg, grid = m.config, m.config.grid
    out = generate(m, make_batch(cfg, 2, grid, label=1, top_k=1, generator=gen(0)))
    seq = torch.tensor([[cfg.class_token(1)]])
    for t in range(cfg.seq_len):
        logits, _ = m(seq)
        assert out[0, t] == logits[0, -1].argmax()
        seq = torch.cat([seq, out[:1, t: t + 1]], 1)
    assert torch.equal(out[0], out[1])


def test_choose_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    one = torch.ones(1)
    for u in torch.linspace(0, 0.999, 50):
        assert choose(logits, u[None], one, torch.tensor([2]), one) in (0, 1)
        assert choose(logits, u[None], one, torch.tensor([4]), torch.tensor([0.6])) in (0, 1)
        assert choose(logits, u[None], one, torch.tensor([4]), torch.tensor([0.5])) == 0
    # inverse CDF: u=0.6 lands on index 1 of the unfiltered distribution
    assert choose(logits, torch.tensor([0.6]), one, torch.tensor([4]), one) == 1


def test_seeds_reproducible():
    m = tiny()
    cfg, grid = m.config, m.config.grid
    a = generate(m, make_batch(cfg, 3, grid, generator=gen(11)))
    b = generate(m, make_batch(cfg, 3, grid, generator=gen(11)))
    c = generate(m, make_batch(cfg, 3, grid, generator=gen(12)))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_prefix_kept_verbatim_and_larger_grid_samples():
    m = tiny(grid=(3, 4))
    cfg = m.config
    prefix = [3, 1, 4, 1, 5, 9, 2]
    out = sample(m, make_batch(cfg, 2, (3, 4), prefix=prefix, generator=gen(0)), (3, 4))
    assert out[:, :7].tolist() == [prefix, prefix]
    big = sample(m, make_batch(cfg, 2, (5, 9), label=1, prefix=prefix, generator=gen(0)),
                 (5, 9))
    assert big.shape == (2, 45) and big[:, :7].tolist() == [prefix, prefix]
    assert big.min() >= 0 and big.max() < cfg.codebook_size


def kept_cells(T: int, seed: int) -> list[int]:
    """A scattered mask: about half the cells kept (codes), the rest FREE."""
    g = gen(seed)
    keep = torch.rand(T, generator=g) < 0.5
    return torch.where(keep, torch.randint(0, 24, (T,), generator=g), FREE).tolist()


@pytest.mark.parametrize("grid, positions", [((3, 4), "absolute"), ((3, 4), "relative"),
                                             ((5, 9), "absolute"), ((5, 9), "relative")])
def test_cells_keep_any_set_of_cells_in_every_sampler(grid, positions):
    m = tiny(grid=(3, 4), positions=positions)
    cfg = m.config
    T = grid[0] * grid[1]
    cells = kept_cells(T, 1)
    kept = [i for i, c in enumerate(cells) if c != FREE]
    out = sample(m, make_batch(cfg, 2, grid, label=1, cells=cells, generator=gen(3)), grid)
    assert all(out[b, i] == cells[i] for b in range(2) for i in kept)
    plain = sample(m, make_batch(cfg, 2, grid, label=1, generator=gen(3)), grid)
    every = sample(m, make_batch(cfg, 2, grid, label=1, cells=[FREE] * T, generator=gen(3)), grid)
    assert torch.equal(plain, every)
    if grid == cfg.grid:  # the step engine against the reference, any mask, guided too
        batch = make_batch(cfg, 2, grid, label=2, cfg_scale=2.0, cells=cells, generator=gen(4))
        assert torch.equal(generate(m, batch), reference_generate(m, batch))
    elif positions == "relative":  # the cached canvas against its reference
        batch = make_batch(cfg, 1, grid, cells=cells, generator=gen(5))
        assert torch.equal(generate_canvas(m, batch, grid), canvas_reference(m, batch, grid))


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
    (dict(top_k=25), "top_k"), (dict(label=4), "unknown class"), (dict(label=-1), "unknown class"),
    (dict(prefix=list(range(13))), "longer than the grid"), (dict(prefix=[24]), "ids"),
    (dict(prefix=[-2]), "ids"), (dict(n=0), "n must"), (dict(grid=(2, 4)), "smaller than"),
    (dict(temperature=float("nan")), "temperature"), (dict(cfg_scale=float("inf")), "cfg_scale"),
    (dict(temperature=1e308), "temperature"), (dict(temperature=1e-300), "temperature"),
    (dict(cfg_scale=-1e308), "cfg_scale"), (dict(prefix=[2**70]), "ids"),
    (dict(cells=[FREE] * 11), "entries"), (dict(cells=[24] + [FREE] * 11), "kept token ids"),
    (dict(cells=[-2] + [FREE] * 11), "kept token ids"), (dict(cells=[2**70] * 12), "cells"),
    (dict(cells=[FREE] * 12, prefix=[1]), "not both"),
])
def test_bad_arguments_raise_clear_errors(kw, match):
    m = tiny()
    args = dict(n=1, grid=m.config.grid)
    args.update(kw)
    n, grid = args.pop("n"), args.pop("grid")
    with pytest.raises(ValueError, match=match):
        make_batch(m.config, n, grid, **args)
