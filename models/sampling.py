"""Sampling from the GPT: per-request settings, the choice of a code, and the samplers
(batched on the training grid through models.slots, sliding-window beyond it, and the
reference every fast path must match).

Randomness: every image carries its own row of uniforms (one per cell), drawn from its
request's generator, and a token is chosen by inverse CDF over the filtered distribution.
So a seeded image gets the same tokens whatever it is batched with, and the reference
sampler (one image, full re-forward, no cache) fed the same uniforms picks the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .gpt import GPT

FREE = -1  # prefix value of a cell the sampler must choose
# what a request that sets nothing gets, unless its checkpoint ships sampling_defaults
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": None, "top_p": 1.0, "cfg_scale": 1.0}
# float32 holds the per-row settings: bounds far outside any useful value, inside its range
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4
MAX_CFG_SCALE = 1e3


@dataclass
class SamplingBatch:
    """Per-image settings, one row per image. Build with `make_batch`."""

    class_ids: torch.Tensor  # (B,) int64 input ids (K + label, or the null class)
    uniforms: torch.Tensor  # (B, T) float in [0, 1)
    temperature: torch.Tensor  # (B,) > 0
    top_k: torch.Tensor  # (B,) int64 in 1..K (K = off)
    top_p: torch.Tensor  # (B,) in (0, 1] (1 = off)
    cfg_scale: torch.Tensor  # (B,) guidance scale (1 = off)
    prefix: torch.Tensor  # (B, T) int64 code or FREE

    def __len__(self) -> int:
        return self.class_ids.shape[0]

    def to(self, device: torch.device) -> SamplingBatch:
        return SamplingBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    @staticmethod
    def cat(batches: list[SamplingBatch]) -> SamplingBatch:
        return SamplingBatch(**{k: torch.cat([getattr(b, k) for b in batches])
                                for k in SamplingBatch.__dataclass_fields__})

    def rows(self, start: int, stop: int) -> SamplingBatch:
        return SamplingBatch(**{k: v[start:stop] for k, v in self.__dict__.items()})


def check_settings(model_cfg, n: int, grid: tuple[int, int], *, label: int | None = None,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                   cfg_scale: float = 1.0, prefix: list[int] | None = None,
                   cells: Sequence[int] | None = None) -> None:
    """Raise ValueError for settings `make_batch` cannot take (no tensor is built but the
    check of `cells`)."""
    K = model_cfg.codebook_size
    rows, cols = grid
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not (MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise ValueError(f"temperature must lie in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                         f"got {temperature}")
    if top_k is not None and not (1 <= top_k <= K):
        raise ValueError(f"top_k must lie in 1..{K}, got {top_k}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if not (-MAX_CFG_SCALE <= cfg_scale <= MAX_CFG_SCALE):
        raise ValueError(f"cfg_scale must lie in [{-MAX_CFG_SCALE:g}, {MAX_CFG_SCALE:g}], "
                         f"got {cfg_scale}")
    if label is not None and not (0 <= label < model_cfg.n_classes):
        raise ValueError(f"unknown class {label}: this model has classes 0..{model_cfg.n_classes - 1}")
    if rows < model_cfg.grid[0] or cols < model_cfg.grid[1]:
        raise ValueError(f"grid {list(grid)} is smaller than the training grid {list(model_cfg.grid)}")
    if prefix:
        if len(prefix) > rows * cols:
            raise ValueError(f"prefix has {len(prefix)} tokens, longer than the grid's {rows * cols}")
        if not all(0 <= t < K for t in prefix):  # in Python first: huge ints overflow int64
            raise ValueError(f"prefix token ids must lie in [0, {K})")
    if cells is not None:
        if prefix:
            raise ValueError("give either a prefix or every cell, not both")
        kept = _cells(cells)
        if kept.shape != (rows * cols,):
            raise ValueError(f"cells has {kept.numel()} entries; the grid has {rows * cols}")
        if bool(((kept != FREE) & ((kept < 0) | (kept >= K))).any()):
            raise ValueError(f"kept token ids must lie in [0, {K}) (or be {FREE}: sampled)")


def _cells(cells: Sequence[int]) -> torch.Tensor:
    """A raster-order sequence of codes and FREE -> int64 (T,); ValueError for what is not."""
    try:
        return torch.as_tensor(cells, dtype=torch.int64).reshape(-1)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"cells must be integer token ids or {FREE}: {e}") from None


def make_batch(model_cfg, n: int, grid: tuple[int, int], *, label: int | None = None,
               temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
               cfg_scale: float = 1.0, prefix: list[int] | None = None,
               cells: Sequence[int] | None = None,
               generator: torch.Generator | None = None) -> SamplingBatch:
    """Validate one request's settings and turn them into n rows. Raises ValueError.

    `prefix` keeps the first cells in raster order; `cells` gives every cell of the grid in
    raster order, a code to keep or FREE to sample (an inpainting mask, an outpainting
    border). The uniforms do not depend on what is kept, so `cells` all FREE samples what a
    plain request of the same seed does."""
    check_settings(model_cfg, n, grid, label=label, temperature=temperature, top_k=top_k,
                   top_p=top_p, cfg_scale=cfg_scale, prefix=prefix, cells=cells)
    return build_batch(model_cfg, n, grid, label=label, temperature=temperature, top_k=top_k,
                       top_p=top_p, cfg_scale=cfg_scale, prefix=prefix, cells=cells,
                       generator=generator)


def build_batch(model_cfg, n: int, grid: tuple[int, int], *, label: int | None = None,
                temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                cfg_scale: float = 1.0, prefix: list[int] | None = None,
                cells: Sequence[int] | None = None,
                generator: torch.Generator | None = None) -> SamplingBatch:
    """`make_batch` for settings `check_settings` passed already (a server checks each
    request once, when it admits it, not once per image again)."""
    K = model_cfg.codebook_size
    T = grid[0] * grid[1]
    pre = torch.full((T,), FREE, dtype=torch.int64)
    if prefix:
        pre[: len(prefix)] = torch.tensor(prefix, dtype=torch.int64)
    elif cells is not None:
        pre = _cells(cells)
    return SamplingBatch(
        class_ids=torch.full((n,), model_cfg.class_token(label), dtype=torch.int64),
        uniforms=torch.rand(n, T, generator=generator),
        temperature=torch.full((n,), float(temperature)),
        top_k=torch.full((n,), K if top_k is None else int(top_k), dtype=torch.int64),
        top_p=torch.full((n,), float(top_p)),
        cfg_scale=torch.full((n,), float(cfg_scale)),
        prefix=pre.expand(n, T).clone(),
    )


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance of (B, K) logits by their unconditional partners; a row of
    scale 1 keeps its conditional logits exactly."""
    return torch.where(scale[:, None] == 1, cond, uncond + scale[:, None] * (cond - uncond))


def filtering(top_k: torch.Tensor, top_p: torch.Tensor, codebook_size: int) -> bool:
    """Whether any row uses top-k or top-p (a sampler asks once, not every step)."""
    return bool((top_k < codebook_size).any() or (top_p < 1).any())


def choose(logits: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor,
           top_k: torch.Tensor, top_p: torch.Tensor, filtered: bool | None = None) -> torch.Tensor:
    """Pick one code per row by inverse CDF of u, in code-index order, over the
    temperature/top-k/top-p distribution. The order never depends on the other rows, so a
    row's choice is the same in any batch. `filtered`: the answer of `filtering`, if known."""
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    K = probs.shape[-1]
    if filtered is None:
        filtered = filtering(top_k, top_p, K)
    if filtered:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(K, device=probs.device)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each rank
        keep_sorted = (rank[None] < top_k[:, None]) & ((before < top_p[:, None]) | (rank[None] == 0))
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        probs = probs * keep
    cdf = probs.cumsum(-1)
    pick = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1)
    # rounding can push u*total to the very end: fall back to the last code with mass
    last = K - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(pick, last)


def pick(logits: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor,
         top_k: torch.Tensor, top_p: torch.Tensor, forced: torch.Tensor,
         filtered: bool | None = None) -> torch.Tensor:
    """Every sampler's choice of a cell: its forced code (a prefix; FREE: none) where it has
    one, else `choose`'s."""
    chosen = choose(logits, u, temperature, top_k, top_p, filtered=filtered)
    return torch.where(forced >= 0, forced, chosen)


def _inputs(batch: SamplingBatch, guided: bool, null_id: int) -> torch.Tensor:
    if not guided:
        return batch.class_ids
    return torch.cat([batch.class_ids, torch.full_like(batch.class_ids, null_id)])


def _step_choice(logits: torch.Tensor, batch: SamplingBatch, t: int, guided: bool) -> torch.Tensor:
    """Cell t of every image of a re-forwarding sampler (conditional rows first)."""
    if guided:
        logits = guide(*logits.chunk(2), batch.cfg_scale)
    return pick(logits, batch.uniforms[:, t], batch.temperature, batch.top_k, batch.top_p,
                batch.prefix[:, t])


def _dup(x: torch.Tensor, guided: bool) -> torch.Tensor:
    return torch.cat([x, x]) if guided else x


@torch.no_grad()
def generate_sliding(model: GPT, batch: SamplingBatch, grid: tuple[int, int]) -> torch.Tensor:
    """Taming's high-resolution sampling on a grid at least as large as the training grid.

    Each cell (i, j) is sampled from the training-size window that contains it, placed so
    the cell sits at the window's centre, clamped at the canvas edges. No cache: every step
    re-forwards the window's tokens before the cell (at most one training sequence).
    """
    cfg = model.config
    h, w = cfg.grid
    H, W = grid
    dev = next(model.parameters()).device
    batch = batch.to(dev)
    guided = bool((batch.cfg_scale != 1).any())
    canvas = torch.zeros(len(batch), H, W, dtype=torch.int64, device=dev)
    cls = _inputs(batch, guided, cfg.null_class)[:, None]
    for i in range(H):
        top = min(max(i - h // 2, 0), H - h)
        for j in range(W):
            left = min(max(j - w // 2, 0), W - w)
            t_local = (i - top) * w + (j - left)
            window = canvas[:, top: top + h, left: left + w].reshape(len(batch), -1)[:, :t_local]
            logits, _ = model(torch.cat([cls, _dup(window, guided)], dim=1))
            canvas[:, i, j] = _step_choice(logits[:, -1], batch, i * W + j, guided)
    return canvas.view(len(batch), H * W)


@torch.no_grad()
def reference_generate(model: GPT, batch: SamplingBatch) -> torch.Tensor:
    """The simple sampler the fast one must match: one image at a time, a full re-forward
    of the whole prefix at every step, no cache."""
    cfg = model.config
    T = cfg.seq_len
    batch = batch.to(next(model.parameters()).device)
    out = torch.empty(len(batch), T, dtype=torch.int64)
    for b in range(len(batch)):
        row = batch.rows(b, b + 1)
        guided = bool(row.cfg_scale[0] != 1)
        seq = _inputs(row, guided, cfg.null_class)[:, None]
        for t in range(T):
            logits, _ = model(seq)
            tok = _step_choice(logits[:, -1], row, t, guided)
            out[b, t] = tok[0]
            seq = torch.cat([seq, _dup(tok[:, None], guided)], dim=1)
    return out
