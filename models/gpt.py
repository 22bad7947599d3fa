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

The cached forward (`forward_cached`) runs one query per row against that row's own KV cache:
the step of the serving engine (models/slots.py) and of the training-grid sampler. The gathered
forward (`forward_gathered`) runs one query per cell of a canvas larger than the training grid
against keys gathered from a shared store by index (models/canvas.py says which): only a
relative model's keys stay valid there.
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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        """`mask`: (L, L) bool in training (absolute positions); else additive, (H, L, L) with
        H 1 or n_head."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, L, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)
        k = k.view(B, L, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, L, self.n_head, self.head_dim).transpose(1, 2)
        if self.training:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)
        else:
            # scale, scores and additive mask are one baddbmm: the arithmetic of `cached`
            T = k.shape[2]
            mask = mask.expand(B, self.n_head, L, T).reshape(B * self.n_head, L, T)
            att = torch.baddbmm(mask, q.reshape(B * self.n_head, L, self.head_dim),
                                k.reshape(B * self.n_head, T, self.head_dim).transpose(1, 2),
                                alpha=1.0 / math.sqrt(self.head_dim))
            y = torch.bmm(att.softmax(dim=-1), v.reshape(B * self.n_head, T, self.head_dim))
            y = y.view(B, self.n_head, L, self.head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))

    def cached(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
               rows: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """One query per row (x: (B, C)) at its own position: write its key and value into
        its row of the cache (rows, heads, T, head_dim), attend over that row. `bias`:
        (B * heads, 1, T) additive."""
        B, C = x.shape
        nh, hd = self.n_head, self.head_dim
        q, k, v = self.qkv(x).split(C, dim=1)
        cache_k[rows, :, pos] = k.view(B, nh, hd)
        cache_v[rows, :, pos] = v.view(B, nh, hd)
        T = cache_k.shape[2]
        att = torch.baddbmm(bias, q.reshape(B * nh, 1, hd),
                            cache_k[:B].reshape(B * nh, T, hd).transpose(1, 2),
                            alpha=1.0 / math.sqrt(hd))
        y = torch.bmm(att.softmax(dim=-1), cache_v[:B].reshape(B * nh, T, hd))
        return self.proj(y.view(B, C))

    def gathered(self, x: torch.Tensor, store_k: torch.Tensor, store_v: torch.Tensor,
                 read: torch.Tensor, write: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """One query per row (x: (B, C)) over the keys at `read` (B, S) of a store
        (slots, heads, head_dim) and its own key last; then its key and value go to the
        store at `write` (B,). `bias`: (B, S + 1, heads) additive."""
        B, C = x.shape
        S = read.shape[1]
        nh, hd = self.n_head, self.head_dim
        q, k, v = (t.reshape(B, nh, hd) for t in self.qkv(x).split(C, dim=1))
        at = read.flatten()  # index_select: a gather of whole rows, no advanced indexing
        keys = store_k.index_select(0, at).view(B, S, nh, hd)
        values = store_v.index_select(0, at).view(B, S, nh, hd)
        # a handful of keys per query: products and sums, not a batched matmul per query
        att = torch.cat([(keys * q[:, None]).sum(-1), (k * q).sum(-1)[:, None]], dim=1)
        att = (att / math.sqrt(hd) + bias).softmax(dim=1)  # (B, S + 1, heads)
        y = (att[:, :S, :, None] * values).sum(1) + att[:, S, :, None] * v
        store_k.index_copy_(0, write, k)
        store_v.index_copy_(0, write, v)
        return self.proj(y.reshape(B, C))


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

    def forward(self, x, mask):
        x = x + self.drop(self.attn(self.ln1(x), mask))
        return x + self.mlp(self.ln2(x))

    def cached(self, x, cache_k, cache_v, rows, pos, bias):
        x = x + self.attn.cached(self.ln1(x), cache_k, cache_v, rows, pos, bias)
        return x + self.mlp(self.ln2(x))

    def gathered(self, x, store_k, store_v, read, write, bias):
        x = x + self.attn.gathered(self.ln1(x), store_k, store_v, read, write, bias)
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
        # built once: the window mask and each position's target cell
        self.register_buffer("mask", window_mask(cfg.grid, cfg.window), persistent=False)
        self.register_buffer("mask_bias", torch.zeros(cfg.seq_len, cfg.seq_len).masked_fill(
            ~self.mask, float("-inf")), persistent=False)  # the same mask, additive (inference)
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, L) ids at positions 0..L-1 -> (logits (B, L, K), loss)."""
        B, L = idx.shape
        pos = torch.arange(L, device=idx.device)
        x = self.drop(self.embed(idx, pos))
        if self.training and not self.relative:
            mask = self.mask[:L, :L]
        else:
            mask = self.attention_bias(pos, L)
        for blk in self.blocks:
            x = blk(x, mask)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def forward_cached(self, token: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                       cache_k: tuple[torch.Tensor, ...], cache_v: tuple[torch.Tensor, ...]
                       ) -> torch.Tensor:
        """One token per row at its own position, over per-layer KV caches of shape
        (rows, heads, T, head_dim) -> logits (B, K). Row i of the batch is cache row rows[i]."""
        B = token.shape[0]
        x = self.embed(token, pos)
        T = cache_k[0].shape[2]
        bias = self.attention_bias(pos, T)  # (H, B, T): each row's window over its own cache
        bias = bias.transpose(0, 1).expand(B, self.config.n_head, T).reshape(-1, 1, T)
        for blk, k, v in zip(self.blocks, cache_k, cache_v, strict=True):
            x = blk.cached(x, k, v, rows, pos, bias)
        return self.head(self.ln_f(x))

    def forward_gathered(self, token: torch.Tensor, store_k: torch.Tensor,
                         store_v: torch.Tensor, read: torch.Tensor, write: torch.Tensor,
                         bias: torch.Tensor) -> torch.Tensor:
        """One token per row, each attending to the keys at `read` (B, S) of per-layer
        stores (layers, slots, heads, head_dim) and to its own, which it then writes at
        `write` (B,) -> logits (B, K). `bias` (B, S + 1, heads): the relative biases, -inf
        where a read slot holds no key. Relative positions only (no embedding of where)."""
        if not self.relative:
            raise ValueError("a gathered forward needs relative positions")
        x = self.tok_emb(token)
        for blk, k, v in zip(self.blocks, store_k, store_v, strict=True):
            x = blk.gathered(x, k, v, read, write, bias)
        return self.head(self.ln_f(x))

    def training_inputs(self, codes: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """codes (B, T), class ids (B,) -> model input (B, T): [class, c0, ..., c_{T-2}]."""
        return torch.cat([class_ids[:, None], codes[:, :-1]], dim=1)
