"""Step-level sampling over a fixed set of slots: the core of continuous batching.

A `SlotSampler` owns one static KV cache of `capacity` rows and every row's sampling state.
Each `step(size)` advances rows [0, size) by one token, each at its own position: rows join
and leave between steps without waiting for each other. A row's first step feeds its class
token at position 0 (its prefill), its last one picks cell T - 1.

Guidance takes two rows: the conditional one (which carries the image's settings and
uniforms) and an unconditional partner. A row whose partner is itself samples unguided.
All state lives in tensors on the model's device, so a step is one fixed-shape call per
padded size: compiled once, replayed as a CUDA graph on GPU, never recompiled.

The per-row arithmetic is `models.sampling`'s, so a seeded image gets the tokens of the
reference sampler, whichever rows run beside it and whenever it joined.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from .canvas import generate_canvas
from .gpt import GPT, RowCache
from .sampling import FREE, SamplingBatch, filtering, generate_sliding, guide, pick

STEP_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def padded_sizes(capacity: int, linear: bool = False) -> tuple[int, ...]:
    """The row counts a sampler of `capacity` rows runs at, then capacity itself: powers of
    two from 8, or with `linear` 2 (one guided image), every multiple of 4 up to 32, then of
    8 (on CPU a step costs about what its rows cost, so padding 2 rows to 8 or 18 to 24 makes
    it dearer; past 32 rows a coarser step pads a few percent, and each size is a graph built
    at start-up; on a GPU a step costs about the same at any size)."""
    fine = (2, *range(4, 32, 4), *range(32, capacity, 8))
    sizes = (s for s in fine if s < capacity) if linear else (
        s for s in STEP_SIZES if s < capacity)
    return (*sizes, capacity)


class SlotState(NamedTuple):
    """Every row's state, in tensors the step updates in place (fixed addresses: a CUDA graph
    replays over them)."""

    cache_k: tuple[torch.Tensor, ...]  # per layer (rows, heads, T, head_dim)
    cache_v: tuple[torch.Tensor, ...]
    row_ids: torch.Tensor  # arange(rows)
    pos: torch.Tensor  # the cell each row picks next; its input sits at the same position
    token: torch.Tensor  # each row's next input id
    partner: torch.Tensor  # the unconditional row a conditional row is guided by
    owner: torch.Tensor  # the conditional row whose pick a row takes as its next input
    uniforms: torch.Tensor  # (rows, T)
    prefix: torch.Tensor  # (rows, T) code or FREE
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    cfg_scale: torch.Tensor
    out: torch.Tensor  # (rows, T) picked codes


class SlotSampler:
    """Sampling state and KV cache for `capacity` rows of one GPT; samplers of one GPT share
    its weights and, compiled, its graphs."""

    def __init__(self, gpt: GPT, capacity: int) -> None:
        cfg = gpt.config
        p = next(gpt.parameters())
        dev, T, K = p.device, cfg.seq_len, cfg.codebook_size
        self.gpt = gpt
        self.capacity = capacity
        self.sizes = padded_sizes(capacity, linear=dev.type == "cpu")
        cache = (capacity, cfg.n_head, T, cfg.d_model // cfg.n_head)
        rows = torch.arange(capacity, device=dev)

        def full(value, shape=(capacity,), dtype=torch.int64) -> torch.Tensor:
            return torch.full(shape, value, dtype=dtype, device=dev)

        self.state = SlotState(
            cache_k=tuple(torch.zeros(cache, dtype=p.dtype, device=dev)
                          for _ in range(cfg.n_layer)),
            cache_v=tuple(torch.zeros(cache, dtype=p.dtype, device=dev)
                          for _ in range(cfg.n_layer)),
            row_ids=rows, pos=full(0), token=full(cfg.null_class), partner=rows.clone(),
            owner=rows.clone(), uniforms=full(0.0, (capacity, T), torch.float32),
            prefix=full(FREE, (capacity, T)), temperature=full(1.0, dtype=torch.float32),
            top_k=full(K), top_p=full(1.0, dtype=torch.float32),
            cfg_scale=full(1.0, dtype=torch.float32), out=full(0, (capacity, T)))

    @property
    def out(self) -> torch.Tensor:
        return self.state.out

    # ---- admission (between steps) ---------------------------------------------------------
    @torch.no_grad()
    def admit(self, cond_rows: list[int], uncond_rows: list[int | None], batch: SamplingBatch,
              null_class: int) -> None:
        """Place image i of `batch` in row cond_rows[i], guided by uncond_rows[i] (None:
        unguided, one row). Both start at position 0 with their class token."""
        st = self.state
        dev = st.pos.device
        cond = torch.tensor(cond_rows, dtype=torch.int64, device=dev)
        b = batch.to(dev)
        for name in ("uniforms", "prefix", "temperature", "top_k", "top_p", "cfg_scale"):
            getattr(st, name)[cond] = getattr(b, name)
        st.token[cond] = b.class_ids
        st.pos[cond] = 0
        st.partner[cond] = cond
        st.owner[cond] = cond
        pairs = [(c, u) for c, u in zip(cond_rows, uncond_rows, strict=True) if u is not None]
        if pairs:
            c = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=dev)
            u = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=dev)
            st.partner[c] = u
            st.partner[u] = u
            st.owner[u] = c
            st.token[u] = null_class
            st.pos[u] = 0

    @torch.no_grad()
    def move(self, src: list[int], dst: list[int]) -> None:
        """Rows src[i] continue in rows dst[i] (free ones): cache, settings and position go
        along, and guidance pairs are re-linked. Keeps occupied rows low, so steps run at
        the smallest padded size that holds them."""
        st = self.state
        dev = st.pos.device
        s = torch.tensor(src, dtype=torch.int64, device=dev)
        d = torch.tensor(dst, dtype=torch.int64, device=dev)
        for t in (*st.cache_k, *st.cache_v, *st[3:]):
            t[d] = t[s]
        where = torch.arange(self.capacity, device=dev)
        where[s] = d  # old row -> new row, wherever a guidance pair points at a moved row
        st.partner.copy_(where[st.partner])
        st.owner.copy_(where[st.owner])
        self.release(src)

    @torch.no_grad()
    def release(self, rows: list[int]) -> None:
        """Park rows: they keep stepping (padding) on their own, guided by nobody."""
        st = self.state
        r = torch.tensor(rows, dtype=torch.int64, device=st.pos.device)
        st.partner[r] = r
        st.owner[r] = r
        st.pos[r] = 0

    @torch.no_grad()
    def __call__(self, size: int, filtered: bool = True) -> None:
        """One eager step of rows [0, size)."""
        step(self.gpt, self.state, size, filtered)


def step(gpt: GPT, st: SlotState, size: int, filtered: bool = True) -> None:
    """Advance rows [0, size) by one token: forward, guide, pick, record, move on.
    `filtered`: some row may use top-k or top-p (without, the sort is skipped)."""
    T = gpt.config.seq_len
    rows, pos = st.row_ids[:size], st.pos[:size]
    cache = RowCache(st.cache_k, st.cache_v, rows, pos)
    logits = gpt(st.token[:size, None], pos=pos[:, None], cache=cache)[0][:, 0]
    # guidance within the batch of rows: partner == self (or scale 1) leaves a row as is
    guided = guide(logits, logits[st.partner[:size]], st.cfg_scale[:size])
    u = st.uniforms[:size].gather(1, pos[:, None])[:, 0]
    forced = st.prefix[:size].gather(1, pos[:, None])[:, 0]
    picked = pick(guided, u, st.temperature[:size], st.top_k[:size], st.top_p[:size], forced,
                  filtered=filtered)
    st.out[:size].scatter_(1, pos[:, None], picked[:, None])
    st.token[:size] = picked[st.owner[:size]]
    st.pos[:size] = (pos + 1).clamp(max=T - 1)


_COMPILED: dict[str, Callable] = {}


def step_variants(device_type: str) -> tuple[bool, ...]:
    """The `filtered` values a compiled step is built for. On CPU both: a step without the
    sort costs less when no row uses top-k or top-p (BENCHMARKS.md). On CUDA the filtered
    step alone: it picks the same codes for every row, and each graph adds to start-up."""
    return (True,) if device_type == "cuda" else (True, False)


def compiled_steps(sampler: SlotSampler) -> Callable[[int, bool], None]:
    """`step` as a fixed-shape graph per padded size and `step_variants` value, shared by
    every sampler of one GPT (their states are inputs of equal shapes); each is built on its
    first call.

    On CUDA: torch.compile with CUDA graphs (mode "reduce-overhead") replayed over the
    state's fixed addresses, since a model this small is bound by kernel launches. On CPU:
    a frozen TorchScript trace (weights folded in, matmuls prepacked), which runs in C++
    with the GIL released: beside a busy event loop, and beside the other lanes, a step of
    Python-driven kernels waits for the GIL at every op (BENCHMARKS.md, "compiled step").
    """
    if sampler.out.device.type == "cuda":
        return _inductor_steps(sampler)
    return _traced_steps(sampler)


def _inductor_steps(sampler: SlotSampler) -> Callable[[int, bool], None]:
    compiled = _COMPILED.get("cuda")
    if compiled is None:
        compiled = _COMPILED["cuda"] = torch.compile(
            step, dynamic=False, options={"freezing": True, "triton.cudagraphs": True})
    limit = torch._dynamo.config  # each GPT and size adds a graph to the one cache of `step`
    limit.recompile_limit += len(sampler.sizes)
    limit.accumulated_recompile_limit += len(sampler.sizes)
    st = sampler.state
    for t in _flat(st):
        torch._dynamo.mark_static_address(t)
    gpt = sampler.gpt

    def run(size: int, filtered: bool = True) -> None:  # the filtered graph serves both
        compiled(gpt, st, size, True)

    return run


class _StepGraph(torch.nn.Module):
    """`step` at one size over the state's tensors, flat: the form torch.jit.trace takes."""

    def __init__(self, gpt: GPT, size: int, filtered: bool) -> None:
        super().__init__()
        self.gpt, self.size, self.filtered = gpt, size, filtered

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        n = len(self.gpt.blocks)
        st = SlotState(tensors[:n], tensors[n:2 * n], *tensors[2 * n:])
        step(self.gpt, st, self.size, self.filtered)
        return st.out


_TRACED: dict[tuple[int, int, bool], torch.jit.ScriptModule] = {}  # (id of GPT, size, filtered)


def _traced_steps(sampler: SlotSampler) -> Callable[[int, bool], None]:
    gpt, flat = sampler.gpt, _flat(sampler.state)

    def run(size: int, filtered: bool = True) -> None:
        key = (id(gpt), size, filtered)
        graph = _TRACED.get(key)
        if graph is None:
            with warnings.catch_warnings():  # TorchScript is deprecated; its trace still runs
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                graph = torch.jit.freeze(torch.jit.trace(
                    _StepGraph(gpt, size, filtered).eval(), flat, check_trace=False))
            _TRACED[key] = graph  # the trace ran one step: that was this call's
            return
        graph(*flat)

    return run


def graphs_built() -> int:
    """Step graphs built so far in this process (traced, and compiled by torch.compile)."""
    from torch._dynamo.utils import counters

    return len(_TRACED) + counters["stats"]["unique_graphs"]


def _flat(st: SlotState) -> tuple[torch.Tensor, ...]:
    return (*st.cache_k, *st.cache_v, *st[2:])


@torch.no_grad()
def generate(model: GPT, batch: SamplingBatch) -> torch.Tensor:
    """Batched sampling on the training grid -> codes (B, T): every image enters a
    `SlotSampler` at once and leaves after T steps (the server's engine, run to completion)."""
    cfg = model.config
    T = cfg.seq_len
    if batch.prefix.shape[1] != T:
        raise ValueError(f"this sampler runs the training grid ({T} cells); use generate_sliding")
    B = len(batch)
    guided = (batch.cfg_scale != 1).tolist()
    sampler = SlotSampler(model, B + sum(guided))
    uncond = iter(range(B, B + sum(guided)))
    sampler.admit(list(range(B)), [next(uncond) if g else None for g in guided], batch,
                  cfg.null_class)
    filtered = filtering(batch.top_k, batch.top_p, cfg.codebook_size)
    for _ in range(T):
        sampler(sampler.capacity, filtered)
    return sampler.out[:B].clone()


def sample(model: GPT, batch: SamplingBatch, grid: tuple[int, int]) -> torch.Tensor:
    """Codes (B, rows*cols) for `grid`, from the sampler that serves it: the step engine's
    on the training grid; beyond it, the cached canvas for a relative model and the paper's
    re-forwarding sliding window for an absolute one."""
    if batch.prefix.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"batch was made for {batch.prefix.shape[1]} cells, grid {list(grid)} has "
                         f"{grid[0] * grid[1]}")
    if tuple(grid) == tuple(model.config.grid):
        return generate(model, batch)
    if model.relative and bool((batch.cfg_scale == 1).all()):
        return generate_canvas(model, batch, grid)
    return generate_sliding(model, batch, grid)
