"""Canvases: grids larger than the training grid, sampled with a cached sliding window.

A relative model (models/gpt.py) never learned where in its crop a cell sits, so a key it
computed once stays valid wherever the window later sits: each cell of a canvas costs one
query, whatever the canvas size. The layout of queries and keys:

- every cell (r, c) has a query; its input is the code of its left neighbour (r, c - 1),
  and that is also where its key sits (its own key is the window's offset (0, 1));
- a first-column query's input is the code of (r - 1, wc // 2 + 1), a cell of the row above
  that the window does not show, so it is seen only as the query's own key (the bias a
  training crop gives its first column, whose input is the previous row's last cell);
  cell (0, 0) is the class token's query, and the class key every other query sees;
- each row but the last ends with a tail query at (r, W): it picks nothing, but puts the key
  of (r, W - 1) in place for the rows below.

A query sees the class key, its own, and the keys of the window's cells before it in raster
order. So (r, c) needs (r - 1, c + wc // 2 + 1) to have run, and a row can trail the one
above by wc // 2 + 2 cells: every row of the canvas samples in the same step, one cell each
(a wavefront). Keys live in a ring of canvas rows, enough for every row the wavefront spans
and the window rows above them.

`canvas_reference` is the same computation without a cache (every query re-forwards all
positions before it): the cached sampler must pick its codes. Absolute-position models keep
the paper's re-forwarding sampler (`models.sampling.generate_sliding`).
"""

from __future__ import annotations

import math

import torch

from .gpt import GPT, CanvasCache
from .sampling import SamplingBatch, filtering, pick


def lag(window: tuple[int, int]) -> int:
    """Columns a canvas row trails the row above by."""
    return window[1] // 2 + 2


def ring_rows(grid: tuple[int, int], window: tuple[int, int]) -> int:
    """Canvas rows of keys held at once: the rows a full wavefront spans, the window's rows
    above them, one spare."""
    H, W = grid
    return min(H, window[0] + math.ceil((W + 1) / lag(window)) + 1)


class CanvasSampler:
    """One canvas of one image: its codes, its key store, and which cells come next.

    `plan(limit)` says which cells may run now (at most `limit`, top rows first), `step`
    runs them as one batch and records their picks. Picks use the image's row of `batch`
    (uniform, temperature, top-k, top-p, prefix): the same codes in any schedule.
    """

    def __init__(self, gpt: GPT, batch: SamplingBatch, grid: tuple[int, int]) -> None:
        cfg = gpt.config
        if not gpt.relative:
            raise ValueError("a cached canvas needs a model with relative positions")
        if len(batch) != 1 or batch.prefix.shape[1] != grid[0] * grid[1]:
            raise ValueError("a canvas samples one image of the canvas's cells")
        if bool(batch.cfg_scale[0] != 1):
            raise ValueError("guidance is not available on canvases")
        p = next(gpt.parameters())
        self.gpt, self.grid, self.device = gpt, tuple(grid), p.device
        H, W = grid
        wr, wc = cfg.window
        self.window, self.lag = (wr, wc), lag(cfg.window)
        self.ring = ring_rows(grid, cfg.window)
        self.class_entry, self.trash_entry = self.ring * W, self.ring * W + 1
        shape = (cfg.n_layer, self.ring * W + 2, cfg.n_head, cfg.d_model // cfg.n_head)
        self.store_k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.store_v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.batch = batch.to(p.device)
        # asked once: whether picks need the top-k/top-p sort (not a device sync a step)
        self.filtered = filtering(batch.top_k, batch.top_p, cfg.codebook_size)
        self.class_id = int(batch.class_ids[0])
        self.codes = torch.zeros(H * W, dtype=torch.int64, device=p.device)
        self.next_col = [0] * H  # per row: the next query's column; W + 1 when done
        self.first = 0  # rows above it are done
        # the window's offsets, in the order of the model's relative biases
        self._offsets = torch.arange(wr * wc + 1, device=p.device)  # then the class key's bias
        j = self._offsets[:-1]
        self._dr, self._dc = j // wc, wc // 2 - j % wc  # key cell = (r - dr, c + dc)
        # the bias of a query's own key, at offset (0, 1): in the window unless it is narrow
        self._own = 1 + wc // 2 if 1 + wc // 2 < wc else wr * wc + 1

    # ---- bookkeeping (host) ----------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.first == self.grid[0]

    def _last(self, r: int) -> int:
        """The last query of row r: its tail, except in the last row."""
        return self.grid[1] - (r == self.grid[0] - 1)

    def _ready(self, r: int, c: int) -> bool:
        W = self.grid[1]
        if r and self.next_col[r - 1] <= min(c + self.lag - 1, W):
            return False
        # a row's keys overwrite those of the row `ring` above: no row may need those still
        older = r - self.ring + self.window[0] - 1
        return c > 0 or r < self.ring or self.next_col[older] > self._last(older)

    def plan(self, limit: int) -> list[tuple[int, int]]:
        """Cells (row, column) that may run in the next step, top rows first."""
        cells: list[tuple[int, int]] = []
        for r in range(self.first, self.grid[0]):
            c = self.next_col[r]
            if c > self._last(r):
                continue
            if not self._ready(r, c):
                if c == 0:
                    break  # rows below have not started either
                continue
            cells.append((r, c))
            if len(cells) == limit:
                break
        return cells

    # ---- the step (device) -----------------------------------------------------------------
    @torch.no_grad()
    def step(self, cells: list[tuple[int, int]]) -> list[int]:
        """Run `cells` (from `plan`) as one batch; returns the canvas rows they completed."""
        H, W = self.grid
        rc = torch.tensor(cells, dtype=torch.int64, device=self.device)
        r, c = rc[:, 0], rc[:, 1]
        cache = CanvasCache(self.store_k, self.store_v, *self._layout(r, c))
        logits = self.gpt(self._inputs(r, c)[:, None], cache=cache)[0][:, 0]
        picks = [i for i, (_, col) in enumerate(cells) if col < W]  # tails pick nothing
        if picks:
            at = torch.tensor(picks, dtype=torch.int64, device=self.device)
            cell = r[at] * W + c[at]
            b = self.batch
            n = len(picks)
            self.codes[cell] = pick(logits[at], b.uniforms[0, cell], b.temperature.expand(n),
                                    b.top_k.expand(n), b.top_p.expand(n), b.prefix[0, cell],
                                    filtered=self.filtered)
        completed = []
        for row, col in cells:
            self.next_col[row] = col + 1
            if col == W - 1:
                completed.append(row)
        while self.first < H and self.next_col[self.first] > self._last(self.first):
            self.first += 1
        return completed

    def _inputs(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        W = self.grid[1]
        left = r * W + (c - 1).clamp(min=0)
        above = (r - 1).clamp(min=0) * W + min(self.lag - 1, W - 1)
        codes = self.codes[torch.where(c > 0, left, above)]
        return torch.where((r == 0) & (c == 0), torch.full_like(codes, self.class_id), codes)

    def _layout(self, r: torch.Tensor, c: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(read, write, bias) of the queries at cells (r, c): the window's store entries and the
        class key, where each query's own key goes, and the additive biases."""
        W = self.grid[1]
        wr, wc = self.window
        kr = r[:, None] - self._dr[None]
        kc = c[:, None] + self._dc[None]
        seen = (kr >= 0) & (kc >= 0) & (kc < W) & ((self._dr[None] > 0) | (kc < c[:, None] - 1))
        read = torch.where(seen, (kr % self.ring) * W + kc, torch.zeros_like(kr))
        first = (r == 0) & (c == 0)  # the class token's own query: nothing before it
        write = torch.where(c > 0, (r % self.ring) * W + c - 1,
                            torch.where(first, self.class_entry, self.trash_entry))
        # the class key, then the query's own (written before the reads: no query of a step
        # reads an entry another one writes, and at most one first-column query runs a step)
        read = torch.cat([read, torch.full_like(r, self.class_entry)[:, None], write[:, None]],
                         dim=1)
        seen = torch.cat([seen, ~first[:, None], torch.ones_like(first)[:, None]], dim=1)
        own = torch.where(c > 0, self._own, torch.where(first, wr * wc, wr * wc + 1))
        index = torch.cat([self._offsets.expand(len(r), -1), own[:, None]], dim=1)
        bias = self.gpt.rel_bias[:, index].transpose(0, 1)  # (cells, heads, entries)
        bias = bias.masked_fill(~seen[:, None], float("-inf"))[:, :, None].contiguous()
        return read, write, bias

    def run(self, limit: int | None = None) -> torch.Tensor:
        """Every cell, `limit` at most per step (None: the whole wavefront) -> codes (H*W,)."""
        while not self.done:
            self.step(self.plan(limit or self.grid[0]))
        return self.codes


@torch.no_grad()
def generate_canvas(gpt: GPT, batch: SamplingBatch, grid: tuple[int, int]) -> torch.Tensor:
    """Codes (B, H*W): each image of `batch` sampled on its own cached canvas."""
    return torch.stack([CanvasSampler(gpt, batch.rows(i, i + 1), grid).run()
                        for i in range(len(batch))])


# ---- the reference: the same layout, no cache -------------------------------------------------
def canvas_queries(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Every query of a canvas, in raster order: row r's columns 0..W (W: the tail), the
    last row without its tail."""
    H, W = grid
    return [(r, c) for r in range(H) for c in range(W + (r < H - 1))]


def canvas_bias(gpt: GPT, grid: tuple[int, int]) -> torch.Tensor:
    """(heads, N, N) additive biases between the canvas's N queries, from where each key
    sits: the class key, a query's own, and window keys before it; -inf elsewhere."""
    wr, wc = gpt.config.window
    queries = canvas_queries(grid)
    n = len(queries)
    index = torch.full((n, n), -1, dtype=torch.int64)
    for i, (r, c) in enumerate(queries):
        index[i, 0] = wr * wc  # the class key (query 0's own)
        for j in range(1, i + 1):
            kr, kc = queries[j][0], queries[j][1] - 1  # where key j sits (none: column 0)
            dr, dc = r - kr, c - kc + wc // 2
            if kc >= 0 and 0 <= dr < wr and 0 <= dc < wc:
                index[i, j] = dr * wc + dc
            elif j == i:
                index[i, j] = wr * wc + 1
    bias = gpt.rel_bias[:, index.clamp(min=0)]
    return bias.masked_fill((index < 0)[None], float("-inf"))


@torch.no_grad()
def canvas_reference(gpt: GPT, batch: SamplingBatch, grid: tuple[int, int]) -> torch.Tensor:
    """The canvas sampler without a cache: one image at a time, every query re-forwarding
    all queries before it -> codes (B, H*W)."""
    H, W = grid
    lag_col = min(lag(gpt.config.window) - 1, W - 1)
    queries = canvas_queries(grid)
    bias = canvas_bias(gpt, grid).to(next(gpt.parameters()).device)
    out = []
    for b in range(len(batch)):
        row = batch.rows(b, b + 1).to(bias.device)
        codes = torch.zeros(H * W, dtype=torch.int64, device=bias.device)
        ids = []
        for i, (r, c) in enumerate(queries):
            ids.append(int(row.class_ids[0]) if i == 0 else
                       int(codes[r * W + c - 1]) if c else int(codes[(r - 1) * W + lag_col]))
            if c == W:
                continue
            logits, _ = gpt(torch.tensor(ids, device=bias.device)[None],
                            bias=bias[:, : i + 1, : i + 1])
            cell = r * W + c
            codes[cell] = pick(logits[:, -1], row.uniforms[:, cell], row.temperature, row.top_k,
                               row.top_p, row.prefix[:, cell])[0]
        out.append(codes)
    return torch.stack(out)
