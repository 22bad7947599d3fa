"""Class-conditional GPT over raster-ordered token grids, with 2-D sliding-window attention.

Sequence layout (length T = rows * cols): position 0 holds the class token, position p >= 1
holds the code of cell p - 1, and the logits at position p predict cell p. So the input of a
grid of codes c[0..T-1] is [class, c[0], ..., c[T-2]] and its targets are c[0..T-1].

Vocabulary: ids 0..K-1 are codes, K..K+n_classes-1 are classes, K+n_classes is the null class
(unconditional / classifier-free guidance). The head predicts codes only, so a class or
special id can never be sampled.

Window convention (pinned by tests/test_gpt.py): with window (wr, wc), the query at position p
(predicting cell (r, c)) sees the key at position q iff q == 0 (the class token), or q == p
(itself), or q < p and the key's cell (r', c') = cell q - 1 satisfies r - r' < wr and
|c - c'| <= wc // 2. Full causal attention is any window with wr >= rows and wc >= 2*cols - 1.
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

    def __post_init__(self) -> None:
        self.grid = tuple(self.grid)
        self.window = tuple(self.window)
        if self.d_model % self.n_head:
            raise ValueError("d_model must be divisible by n_head")
        if self.window[0] < 1 or self.window[1] < 1:
            raise ValueError(f"window must be positive, got {self.window}")

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def null_class(self) -> int:
        return self.codebook_size + self.n_classes

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.n_classes + 1

    def class_token(self, label: int | None) -> int:
        return self.null_class if label is None else self.codebook_size + label

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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, L, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)
        k = k.view(B, L, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, L, self.n_head, self.head_dim).transpose(1, 2)
        if self.training:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)
        else:
            # `mask` is additive here (0 or -inf): scale, scores and mask are one baddbmm,
            # the arithmetic of the slot sampler's cached step (models.slots)
            T = k.shape[2]
            att = torch.baddbmm(mask, q.reshape(B * self.n_head, L, self.head_dim),
                                k.reshape(B * self.n_head, T, self.head_dim).transpose(1, 2),
                                alpha=1.0 / math.sqrt(self.head_dim))
            y = torch.bmm(att.softmax(dim=-1), v.reshape(B * self.n_head, T, self.head_dim))
            y = y.view(B, self.n_head, L, self.head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


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


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        rows, cols = cfg.grid
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, L) ids at positions 0..L-1 -> (logits (B, L, K), loss)."""
        B, L = idx.shape
        x = self.tok_emb(idx) + self.row_emb(self.pos_row[:L]) + self.col_emb(self.pos_col[:L])
        x = self.drop(x)
        mask = (self.mask if self.training else self.mask_bias)[:L, :L]
        for blk in self.blocks:
            x = blk(x, mask)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def training_inputs(self, codes: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """codes (B, T), class ids (B,) -> model input (B, T): [class, c0, ..., c_{T-2}]."""
        return torch.cat([class_ids[:, None], codes[:, :-1]], dim=1)
