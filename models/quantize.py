"""Int8 transformer weights for CPU serving, as gpt-fast quantizes its weights for GPUs.

A step with few rows reads every weight once, so on a CPU a large transformer is bound by
memory bandwidth, and int8 weights read a quarter of float32's bytes. `Int8Linear` holds
int8 weights with one scale per output channel and quantizes its input per row (one scale
per row), then multiplies in integers (`torch._int_mm`, exact int32 sums). Per-row scales
keep a row's result independent of the rows beside it, so a seeded image gets the same codes
in any batch; PyTorch's dynamic quantization scales the whole batch at once and does not, and
its weight-only kernel is slower than float32 with float32 inputs (BENCHMARKS.md, "int8").
Embeddings, norms and relative biases stay float32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .gpt import GPT

QUANTIZATIONS = ("int8",)


class Int8Linear(nn.Module):
    """A Linear with int8 weights (per output channel) and per-row int8 inputs."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        row_scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        q = torch.round(flat / row_scale).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(q, self.weight.t()) * row_scale * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize(gpt: GPT, kind: str, *, in_place: bool = False) -> GPT:
    """`gpt` (on the CPU) with every Linear in `kind`: a copy, or `gpt` itself changed when
    `in_place` (a server loading a large model need not hold its float32 weights twice);
    raises ValueError."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {kind!r}: one of {', '.join(QUANTIZATIONS)}")
    if next(gpt.parameters()).device.type != "cpu":
        raise ValueError("int8 weights are for CPU serving")
    out = (gpt if in_place else copy.deepcopy(gpt)).eval()
    for module in list(out.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return out
