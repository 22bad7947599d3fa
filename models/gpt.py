"""Class-conditional GPT over raster-ordered token grids, with 2-D sliding-window attention.

Sequence layout (length T = rows * cols): position 0 holds the class token, position p >= 1
holds the code of cell p - 1, and the logits at position p predict cell p. So the input of a
grid of codes c[0..T-1] is [class, c[0], ..., c[T-2]] and its targets are c[0..T-1].

Vocabulary: ids 0..K-1 are codes, K..K+n_classes-1 are classes, K+n_classes is the null class
(unconditional / classifier-free guidance). The head predicts codes only, so a class or
special id can never be sampled.

Window convention (pinned by tests/unit/test_gpt.py): with window (wr, wc), the query at position p
(predicting cell (r, c)) sees the key at position q iff q == 0 (the class token), or q == p
(itself), or q < p and the key's cell (r', c') = cell q - 1 satisfies r - r' < wr and
|c - c'| <= wc // 2. Full causal attention is any window with wr >= rows and wc >= 2*cols - 1.

Vocabulary (`vocabulary`): "own" is the layout above. "shared" is the paper's
Net2NetTransformer's: the conditioning token shares the code vocabulary (vocab_size = K), a
class c goes in as id c (its Labelator) and an unconditional model's start token is id
`start_token` (its SOSProvider); such a model has no null class, so it cannot be guided,
and a class-conditional one has no unconditional mode.

The paper's minGPT (taming.modules.transformer.mingpt) is this same family, not a second one:
pre-LN blocks, GELU MLP, a head without bias and full causal attention are what this model
already is with a window covering the whole grid; what differs is where positions and the
conditioning token come from, and those are `positions="sequence"` and
`vocabulary="shared"`. So one forward (and its KV-cache steps) serves both, and the engine,
samplers and streaming need no second path. Its separate key, query and value projections
are this model's fused `qkv` (training/taming_import.py stacks them).

Positions (`positions`): "absolute" adds a learned embedding of each position's row and column
in the training grid (the shipped 28x28 models). "sequence" adds one learned embedding per
position of the training sequence, position 0 being the conditioning token's (minGPT's
`pos_emb` over its block size). "relative" adds none; instead each head adds
a learned bias to its attention scores that depends only on the offset (r - r', c - c') between
the query's cell and the key's, plus one bias for the class token and one for a position's own
key where the window leaves it out (the first column, whose input is the previous row's last
cell). A relative model never learns where in the training crop a cell is, so a key computed
once stays valid wherever the window later sits over a larger canvas.

One forward (`GPT.forward`, one attention computation) serves every caller, as in gpt-fast:
without a cache it runs whole sequences (training, the reference samplers); with a cache the
attention's keys and values are those the cache's `update` returns. A `RowCache` is the step
engine's (models/slots.py): one query per row against that row's own line of keys. A
`CanvasCache` is a canvas's (models/canvas.py): one query per cell against keys gathered by
entry from a shared store, valid for a relative model only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    codebook_size: int = 256  # K
    n_classes: int = 10
    grid: tuple[int, int] = (7, 7)  # training grid (rows, cols)
    window: tuple[int, int] = (7, 13)  # (rows incl. current, columns centred); see docstring
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.1
    positions: str = "absolute"  # or "relative" or "sequence"; see the module docstring
    vocabulary: str = "own"  # or "shared" (Net2NetTransformer's); see the module docstring
    start_token: int = 0  # "shared": the id an unconditional model starts from (SOSProvider)

    def __post_init__(self) -> None:
        self.grid = tuple(self.grid)
        self.window = tuple(self.window)
        if self.d_model % self.n_head:
            raise ValueError("d_model must be divisible by n_head")
        if self.window[0] < 1 or self.window[1] < 1:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.positions not in ("absolute", "relative", "sequence"):
            raise ValueError(f"positions must be 'absolute', 'relative' or 'sequence', got "
                             f"{self.positions!r}")
        if self.vocabulary not in ("own", "shared"):
            raise ValueError(f"vocabulary must be 'own' or 'shared', got {self.vocabulary!r}")
        if self.vocabulary == "shared" and not (
                self.n_classes <= self.codebook_size and 0 <= self.start_token < self.codebook_size):
            raise ValueError(f"a shared vocabulary of {self.codebook_size} ids cannot hold "
                             f"{self.n_classes} classes and start token {self.start_token}")

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def shared(self) -> bool:
        return self.vocabulary == "shared"

    @property
    def null_class(self) -> int:
        """The id of an unconditional row (and of an empty slot). "shared": the start token,
        which a class-conditional model was never trained on (`unconditional` is False)."""
        return self.start_token if self.shared else self.codebook_size + self.n_classes

    @property
    def vocab_size(self) -> int:
        return self.codebook_size if self.shared else self.codebook_size + self.n_classes + 1

    @property
    def unconditional(self) -> bool:
        """Whether a request may name no class (a null class, or a start-token model)."""
        return not self.shared or self.n_classes == 0

    @property
    def guidance(self) -> bool:
        """Whether classifier-free guidance has an unconditional branch: only a model
        trained with a null class."""
        return not self.shared

    def class_token(self, label: int | None) -> int:
        if label is None:
            return self.null_class
        return label if self.shared else self.codebook_size + label

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"], d["window"] = list(self.grid), list(self.window)
        return d


def window_mask(grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """(T, T) bool, True where the query (row) may attend to the key (column)."""
    rows, cols = grid
    T = rows * cols
    p = torch.arange(T)
    r, c = p // cols, p % cols  # target cell of each query position
    kr, kc = (p - 1) // cols, (p - 1) % cols  # cell held by each key position (q >= 1)
    inside = (r[:, None] - kr[None, :] < window[0]) & (
        (c[:, None] - kc[None, :]).abs() <= window[1] // 2)
    causal = p[None, :] < p[:, None]
    mask = causal & inside
    mask[:, 0] = True  # the class token is always visible
    mask |= torch.eye(T, dtype=torch.bool)
    return mask


def relative_index(grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """(T, T) index into a head's relative biases: wr * wc window offsets, then the class
    token (wr * wc), then a position's own key outside the window (wr * wc + 1); entries the
    window mask leaves out hold 0 (masked anyway)."""
    rows, cols = grid
    wr, wc = window
    T = rows * cols
    p = torch.arange(T)
    r, c = p // cols, p % cols
    kr, kc = (p - 1) // cols, (p - 1) % cols
    dr = r[:, None] - kr[None, :]
    dc = c[:, None] - kc[None, :] + wc // 2
    inside = (dr >= 0) & (dr < wr) & (dc >= 0) & (dc < wc)
    idx = torch.where(inside, dr * wc + dc, torch.zeros_like(dr))
    idx = torch.where(torch.eye(T, dtype=torch.bool) & ~inside, wr * wc + 1, idx)
    idx[:, 0] = wr * wc
    return idx


class RowCache:
    """The step engine's KV cache (gpt-fast's `KVCache`): per layer, one line of `seq_len`
    keys and values per row, (rows, heads, T, head_dim). Each of the batch's rows writes its
    new key at its own position and attends over its whole line; the window's bias hides
    what it may not see."""

    def __init__(self, keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...],
                 rows: torch.Tensor, pos: torch.Tensor) -> None:
        self.keys, self.values, self.rows, self.pos = keys, values, rows, pos

    def bias(self, gpt: GPT) -> torch.Tensor:
        """(B, H, 1, T): each row's window over its own line."""
        return gpt.attention_bias(self.pos, self.keys[0].shape[2]).transpose(0, 1)[:, :, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, 1, head_dim) -> the batch's lines (B, H, T, head_dim)."""
        B = k.shape[0]
        self.keys[layer][self.rows, :, self.pos] = k[:, :, 0]
        self.values[layer][self.rows, :, self.pos] = v[:, :, 0]
        return self.keys[layer][:B], self.values[layer][:B]


class CanvasCache:
    """A canvas's key store (models/canvas.py): per layer, keys and values by entry,
    (layers, entries, heads, head_dim). Each query leaves its key and value at entry `write`
    (B,), then attends to the entries `read` (B, S) names, its own among them: one gather of
    whole entries, no per-query copies. `bias` (B, heads, 1, S): the relative biases, -inf
    where a read entry holds no key."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, read: torch.Tensor,
                 write: torch.Tensor, bias: torch.Tensor) -> None:
        self.keys, self.values, self.read, self.write = keys, values, read, write
        self._bias = bias

    def bias(self, gpt: GPT) -> torch.Tensor:
        return self._bias

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, 1, head_dim) -> the keys each query sees (B, H, S, head_dim)."""
        B, S = self.read.shape
        at = self.read.flatten()  # index_select: a gather of whole entries, no advanced indexing
        seen = []
        for store, new in ((self.keys[layer], k), (self.values[layer], v)):
            store.index_copy_(0, self.write, new[:, :, 0])
            seen.append(store.index_select(0, at).view(B, S, *store.shape[1:]).transpose(1, 2))
        return seen[0], seen[1]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor,
                cache: RowCache | CanvasCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B * L, C) of `shape` (B, L); `bias` additive, (B * heads, L, keys). With a
        cache, the keys are those it returns for this layer; without, the L positions' own."""
        (B, L), C = shape, x.shape[1]
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)  # each (B, nh, L, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        H, hd, S = self.n_head, self.head_dim, k.shape[2]
        att = torch.baddbmm(bias, q.reshape(B * H, L, hd),
                            k.reshape(B * H, S, hd).transpose(1, 2), alpha=1.0 / math.sqrt(hd))
        att = F.dropout(att.softmax(dim=-1), self.dropout, self.training)
        y = torch.bmm(att, v.reshape(B * H, S, hd)).view(B, H, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B * L, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor,
                cache: RowCache | CanvasCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), shape, bias, cache, layer))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        rows, cols = cfg.grid
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.relative = cfg.positions == "relative"
        if self.relative:  # per head: the window's offsets, the class token, the own key
            wr, wc = cfg.window
            self.rel_bias = nn.Parameter(torch.zeros(cfg.n_head, wr * wc + 2))
            self.register_buffer("rel_index", relative_index(cfg.grid, cfg.window), persistent=False)
        elif cfg.positions == "sequence":
            self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        else:
            self.row_emb = nn.Embedding(rows, cfg.d_model)
            self.col_emb = nn.Embedding(cols, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.codebook_size, bias=False)
        # built once: the window mask (additive) and each position's target cell
        self.register_buffer("mask_bias", torch.zeros(cfg.seq_len, cfg.seq_len).masked_fill(
            ~window_mask(cfg.grid, cfg.window), float("-inf")), persistent=False)
        pos = torch.arange(cfg.seq_len)
        self.register_buffer("pos_row", pos // cols, persistent=False)
        self.register_buffer("pos_col", pos % cols, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # scaled init of residual projections (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Ids at positions `pos` (same shape) -> their input vectors."""
        x = self.tok_emb(idx)
        if self.relative:
            return x
        if self.config.positions == "sequence":
            return x + self.pos_emb(pos)
        return x + self.row_emb(self.pos_row[pos]) + self.col_emb(self.pos_col[pos])

    def attention_bias(self, query_pos: torch.Tensor, keys: int) -> torch.Tensor:
        """Additive scores (H, Q, keys) for queries at `query_pos` over key positions
        [0, keys): 0 or -inf (absolute; H = 1), or the learned relative bias (H = n_head)."""
        mask = self.mask_bias[query_pos, :keys][None]
        if not self.relative:
            return mask
        return self.rel_bias[:, self.rel_index[query_pos, :keys]] + mask

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                pos: torch.Tensor | None = None, cache: RowCache | CanvasCache | None = None,
                bias: torch.Tensor | None = None):
        """idx (B, L) ids at positions `pos` (default 0..L-1) -> (logits (B, L, K), loss).

        The one forward: training and the references over whole sequences; the step engine
        (a `RowCache`, one query per row) and canvases (a `CanvasCache`) through their
        cache. `bias` overrides the window's (canvas_reference's layout)."""
        B, L = idx.shape
        if pos is None:
            pos = torch.arange(L, device=idx.device)
        # the residual stream as (B * L, C): the Linears and LayerNorms see plain matrices
        x = self.drop(self.embed(idx, pos)).view(B * L, -1)
        if cache is not None:
            bias = cache.bias(self)
        elif bias is None:
            bias = self.attention_bias(pos, L)
        # once for every layer: broadcast over the batch and heads, one matrix per (image, head)
        H = self.config.n_head
        bias = bias.expand(B, H, L, bias.shape[-1]).reshape(B * H, L, bias.shape[-1])
        for layer, blk in enumerate(self.blocks):
            x = blk(x, (B, L), bias, cache, layer)
        logits = self.head(self.ln_f(x)).view(B, L, -1)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def training_inputs(self, codes: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """codes (B, T), class ids (B,) -> model input (B, T): [class, c0, ..., c_{T-2}]."""
        return torch.cat([class_ids[:, None], codes[:, :-1]], dim=1)
