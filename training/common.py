"""Helpers the training commands share: seeding, devices, torchrun, resumable state."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join the torchrun group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                 int(os.environ.get("LOCAL_RANK", 0)))
        device = pick_device(device_arg, d.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return d, device
    return Dist(), pick_device(device_arg, 0)


def pick_device(arg: str, local_rank: int = 0) -> torch.device:
    if arg == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_mean(value: float, d: Dist, device: torch.device) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / d.world


def save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict) -> None:
    """Resumable training state in safetensors (no pickle): weights, optimizer tensors, JSON meta."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone()
               for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"opt.{pid}.{k}"] = t.detach().cpu().contiguous().clone()
    meta = dict(meta, param_groups=osd["param_groups"])
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


def progress(iterable, enabled: bool, **kw):
    from tqdm import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kw)


def batches(n: int, batch_size: int, d: Dist, generator: torch.Generator) -> list[torch.Tensor]:
    """This rank's shuffled index batches for one epoch (every rank gets the same count)."""
    perm = torch.randperm(n, generator=generator)
    per_rank = n // d.world
    perm = perm[d.rank * per_rank: (d.rank + 1) * per_rank]
    return [perm[i: i + batch_size] for i in range(0, per_rank, batch_size)]
