"""Small seeded transformers and sampling batches for the model-level tests."""

from __future__ import annotations

import torch

from models.gpt import GPT, GPTConfig
from models.sampling import SamplingBatch, make_batch


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(window=(2, 3), grid=(3, 4), positions="absolute") -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(codebook_size=24, n_classes=4, grid=grid, window=window, n_layer=2,
                    d_model=32, n_head=4, dropout=0.0, positions=positions)
    m = GPT(cfg).eval()
    # sharper logits than the random init, so top-k/top-p filters really bite
    with torch.no_grad():
        m.head.weight.mul_(40)
        if positions == "relative":  # biases a trained model would have, not zeros
            m.rel_bias.normal_(0, 1.0)
    return m


def mixed_batch(m: GPT, seed: int, sizes=(1, 2, 3)) -> SamplingBatch:
    g = gen(seed)
    cfg, grid = m.config, m.config.grid
    settings = [dict(label=1), dict(label=None, top_k=3), dict(label=2, top_p=0.6, temperature=0.7),
                dict(label=0, cfg_scale=2.5), dict(label=3, prefix=[5, 6, 7, 8, 9]),
                dict(label=1, cfg_scale=1.5, top_k=5, top_p=0.9, prefix=[1, 2])]
    parts = []
    for i, n in enumerate(sizes):
        parts.append(make_batch(cfg, n, grid, generator=g, **settings[(seed + i) % len(settings)]))
    return SamplingBatch.cat(parts)
