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

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from .gpt import GPT
from .sampling import SamplingBatch, choose, filtering, generate_sliding

STEP_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def padded_sizes(capacity: int) -> tuple[int, ...]:
    """The row counts a sampler of `capacity` rows runs at: powers of two from 8, then capacity."""
    sizes = tuple(s for s in STEP_SIZES if s < capacity)
    return (*sizes, capacity)


class SlotSampler(nn.Module):
    """Per-row sampling state and KV cache for `capacity` rows of one GPT (weights shared)."""

    def __init__(self, gpt: GPT, capacity: int) -> None:
        super().__init__()
        cfg = gpt.config
        p = next(gpt.parameters())
        dev, T, K = p.device, cfg.seq_len, cfg.codebook_size
        self.gpt = gpt
        self.capacity = capacity
        self.sizes = padded_sizes(capacity)
        hd = cfg.d_model // cfg.n_head
        cache = (capacity, cfg.n_head, T, hd)

        def buf(name: str, value: torch.Tensor) -> None:
            self.register_buffer(name, value, persistent=False)

        for i in range(cfg.n_layer):  # one buffer per layer: written in place, never copied
            buf(f"cache_k{i}", torch.zeros(cache, dtype=p.dtype, device=dev))
            buf(f"cache_v{i}", torch.zeros(cache, dtype=p.dtype, device=dev))
        rows = torch.arange(capacity, device=dev)
        buf("row_ids", rows)
        buf("pos", torch.zeros(capacity, dtype=torch.int64, device=dev))
        buf("token", torch.full((capacity,), cfg.null_class, dtype=torch.int64, device=dev))
        buf("partner", rows.clone())  # the unconditional row a conditional row is guided by
        buf("owner", rows.clone())  # the conditional row whose pick a row takes as its next input
        buf("uniforms", torch.zeros(capacity, T, device=dev))
        buf("prefix", torch.full((capacity, T), -1, dtype=torch.int64, device=dev))
        buf("temperature", torch.ones(capacity, device=dev))
        buf("top_k", torch.full((capacity,), K, dtype=torch.int64, device=dev))
        buf("top_p", torch.ones(capacity, device=dev))
        buf("cfg_scale", torch.ones(capacity, device=dev))
        buf("out", torch.zeros(capacity, T, dtype=torch.int64, device=dev))  # picked codes

    # ---- admission (between steps) ---------------------------------------------------------
    @torch.no_grad()
    def admit(self, cond_rows: list[int], uncond_rows: list[int | None], batch: SamplingBatch,
              null_class: int) -> None:
        """Place image i of `batch` in row cond_rows[i], guided by uncond_rows[i] (None:
        unguided, one row). Both start at position 0 with their class token."""
        dev = self.pos.device
        cond = torch.tensor(cond_rows, dtype=torch.int64, device=dev)
        b = batch.to(dev)
        for name in ("uniforms", "prefix", "temperature", "top_k", "top_p", "cfg_scale"):
            getattr(self, name)[cond] = getattr(b, name)
        self.token[cond] = b.class_ids
        self.pos[cond] = 0
        self.partner[cond] = cond
        self.owner[cond] = cond
        pairs = [(c, u) for c, u in zip(cond_rows, uncond_rows, strict=True) if u is not None]
        if pairs:
            c = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=dev)
            u = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=dev)
            self.partner[c] = u
            self.partner[u] = u
            self.owner[u] = c
            self.token[u] = null_class
            self.pos[u] = 0

    @torch.no_grad()
    def release(self, rows: list[int]) -> None:
        """Park rows: they keep stepping (padding) on their own, guided by nobody."""
        r = torch.tensor(rows, dtype=torch.int64, device=self.pos.device)
        self.partner[r] = r
        self.owner[r] = r
        self.pos[r] = 0

    # ---- one step --------------------------------------------------------------------------
    def forward(self, size: int, filtered: bool = True) -> None:
        """Advance rows [0, size) by one token: forward, guide, pick, record, move on.
        `filtered`: some row uses top-k or top-p (without, the sort is skipped)."""
        gpt, cfg = self.gpt, self.gpt.config
        T = cfg.seq_len
        rows, pos = self.row_ids[:size], self.pos[:size]
        x = gpt.tok_emb(self.token[:size]) + gpt.row_emb(gpt.pos_row[pos]) + gpt.col_emb(
            gpt.pos_col[pos])
        mask = gpt.mask_bias[pos]  # (size, T): each row's own window over its own cache
        n_head = cfg.n_head
        hd = cfg.d_model // n_head
        for i, blk in enumerate(gpt.blocks):
            x = x + _cached_attention(blk, blk.ln1(x), getattr(self, f"cache_k{i}"),
                                      getattr(self, f"cache_v{i}"), rows,
                                      pos, mask, n_head, hd)
            x = x + blk.mlp(blk.ln2(x))
        logits = gpt.head(gpt.ln_f(x))
        # guidance within the batch of rows: partner == self (or scale 1) leaves a row as is
        uncond = logits[self.partner[:size]]
        scale = self.cfg_scale[:size, None]
        guided = torch.where(scale == 1, logits, uncond + scale * (logits - uncond))
        u = self.uniforms[:size].gather(1, pos[:, None])[:, 0]
        forced = self.prefix[:size].gather(1, pos[:, None])[:, 0]
        picked = choose(guided, u, self.temperature[:size], self.top_k[:size], self.top_p[:size],
                        filtered=filtered)
        picked = torch.where(forced >= 0, forced, picked)
        self.out[:size].scatter_(1, pos[:, None], picked[:, None])
        self.token[:size] = picked[self.owner[:size]]
        self.pos[:size] = (pos + 1).clamp(max=T - 1)


def _cached_attention(blk, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      rows: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, n_head: int,
                      hd: int) -> torch.Tensor:
    """One query per row at its own position: write its key and value, attend over its cache.
    Same arithmetic as the cached path of `CausalSelfAttention` (one additive baddbmm)."""
    B, C = x.shape
    q, k, v = blk.attn.qkv(x).split(C, dim=1)
    cache_k[rows, :, pos] = k.view(B, n_head, hd)
    cache_v[rows, :, pos] = v.view(B, n_head, hd)
    T = cache_k.shape[2]
    keys = cache_k[:B].reshape(B * n_head, T, hd)
    att = torch.baddbmm(mask.repeat_interleave(n_head, 0)[:, None, :],
                        q.reshape(B * n_head, 1, hd), keys.transpose(1, 2),
                        alpha=1.0 / math.sqrt(hd))
    y = torch.bmm(att.softmax(dim=-1), cache_v[:B].reshape(B * n_head, T, hd))
    return blk.attn.proj(y.view(B, C))


def compiled_steps(sampler: SlotSampler, mode: str | None = None
                   ) -> Callable[[int, bool], None]:
    """torch.compile `sampler.forward` for fixed shapes: one graph per padded size and
    filtering, weights frozen in (prepacked matmuls on CPU), CUDA graphs with
    mode="reduce-overhead". Each shape compiles on its first call."""
    options = {"freezing": True}
    # every sampler adds its own graphs to the one cache of `forward`'s code
    limit = torch._dynamo.config
    limit.recompile_limit += 2 * len(sampler.sizes)
    limit.accumulated_recompile_limit += 2 * len(sampler.sizes)
    if mode == "reduce-overhead":
        options["triton.cudagraphs"] = True
    elif mode is not None:
        raise ValueError(f"unsupported mode {mode!r}: None or 'reduce-overhead'")
    return torch.compile(sampler.forward, dynamic=False, options=options)


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
    """Codes (B, rows*cols) for `grid`: the cached sampler on the training grid, the
    sliding-window one on larger grids."""
    if batch.prefix.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"batch was made for {batch.prefix.shape[1]} cells, grid {list(grid)} has "
                         f"{grid[0] * grid[1]}")
    if tuple(grid) == tuple(model.config.grid):
        return generate(model, batch)
    return generate_sliding(model, batch, grid)
