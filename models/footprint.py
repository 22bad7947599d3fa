"""What a checkpoint needs in memory, counted from its config alone, and what a device has.

The paper's transformers hold 300M to 1.4B parameters and their static KV caches grow with
the slots the engine keeps: the server counts both before it loads a model (modules built on
the meta device allocate nothing), so that a model that cannot fit is a start-up error
naming the figures, and a slot count the memory cannot hold is cut to one it can.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import gpt_from_config, vqvae_from_config

# of what is free, what the weights and caches may take: the rest is for activations
# (the decoder's full-resolution feature maps), the allocator's slack and the process
HEADROOM = 0.8


@dataclass(frozen=True)
class Footprint:
    weights_bytes: int  # tokenizer and transformer parameters and buffers
    kv_bytes_per_row: int  # one row of the static KV cache, every layer, keys and values
    rows_per_slot: int = 2  # the engine keeps a guided image's unconditional row beside it

    def total(self, slots: int) -> int:
        return self.weights_bytes + slots * self.rows_per_slot * self.kv_bytes_per_row

    def slots_that_fit(self, free: int, wanted: int) -> int:
        """The most slots, at most `wanted`, whose caches fit beside the weights (0: none)."""
        if self.kv_bytes_per_row == 0:
            return wanted if self.weights_bytes <= free * HEADROOM else 0
        room = free * HEADROOM - self.weights_bytes
        return max(0, min(wanted, int(room // (self.rows_per_slot * self.kv_bytes_per_row))))

    def describe(self, slots: int) -> dict:
        return {"weights_bytes": self.weights_bytes,
                "kv_cache_bytes": slots * self.rows_per_slot * self.kv_bytes_per_row,
                "total_bytes": self.total(slots), "slots": slots}


def _bytes(module: torch.nn.Module, dtype: torch.dtype | None) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * (torch.empty(0, dtype=dtype).element_size()
                            if dtype is not None and t.is_floating_point() else t.element_size())
               for t in tensors)


def footprint(cfg: dict, gpt_dtype: torch.dtype | None = None) -> Footprint:
    """A checkpoint config's memory; `gpt_dtype` the transformer's weights and caches' type
    (float32 when None). Raises CheckpointError for a config that builds no model."""
    with torch.device("meta"):
        weights = _bytes(vqvae_from_config(cfg), None)
        per_row = 0
        if "transformer" in cfg:
            gpt = gpt_from_config(cfg)
            weights += _bytes(gpt, gpt_dtype)
            c = gpt.config
            size = torch.empty(0, dtype=gpt_dtype or torch.float32).element_size()
            per_row = 2 * c.n_layer * c.seq_len * c.d_model * size
    return Footprint(weights, per_row)


def free_bytes(device: torch.device) -> int | None:
    """Memory free for a new model on `device`: the GPU's free memory; on the CPU what the
    kernel reports available, bounded by the process's cgroup limit. None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            room = int(limit) - used
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free
