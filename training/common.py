"""Helpers the training commands share: seeding, devices, torchrun, resumable state."""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from models.checkpoint import resolve_device


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
    return resolve_device(arg, local_rank)


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


def save_states(path: Path, modules: dict[str, torch.nn.Module],
                optimizers: dict[str, torch.optim.Optimizer], meta: dict) -> None:
    """Several modules and optimizers in one safetensors file, each under its own key prefix.

    Tensors are `NAME.<state key>` for modules and `NAME.<param id>.<key>` for optimizers; the
    param groups go into the JSON meta (`param_groups` for an optimizer named `opt`, so files
    written before there were several still load).
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous().clone()
                        for k, v in module.state_dict().items()})
    groups = {}
    for name, opt in optimizers.items():
        osd = opt.state_dict()
        for pid, st in osd["state"].items():
            for k, v in st.items():
                t = v if torch.is_tensor(v) else torch.tensor(v)
                tensors[f"{name}.{pid}.{k}"] = t.detach().cpu().contiguous().clone()
        groups[name] = osd["param_groups"]
    meta = dict(meta, param_groups=groups.pop("opt", None), optimizer_groups=groups)
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_states(path: Path, modules: dict[str, torch.nn.Module],
                optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Restore what `save_states` wrote into the given modules and optimizers; returns the meta."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    tensors = load_file(str(path))
    groups = dict(meta.pop("optimizer_groups", {}), opt=meta.pop("param_groups", None))
    for name, module in modules.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, opt in optimizers.items():
        if groups.get(name) is None:
            raise KeyError(f"{path}: no optimizer state named {name!r}")
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith(name + ".") and k.count(".") >= 2:
                _, pid, key = k.split(".", 2)
                if pid.isdigit():
                    state.setdefault(int(pid), {})[key] = v
        opt.load_state_dict({"state": state, "param_groups": groups[name]})
    return meta


def resume(path: Path, modules: dict[str, torch.nn.Module],
           optimizers: dict[str, torch.optim.Optimizer], enabled: bool, main: bool) -> dict:
    """`load_states` when resuming from a saved state, else a fresh run's meta (epoch 0)."""
    if not (enabled and path.is_file()):
        return {"epoch": 0}
    meta = load_states(path, modules, optimizers)
    if main:
        print(f"resumed from {path} at epoch {meta['epoch']}")
    return meta


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule is a function of the global step, set before each one: a resumed run
    needs no scheduler state to fast-forward."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def shuffler(seed: int, n: int, epochs_done: int) -> torch.Generator:
    """The generator of the epochs' shuffles, past those of epochs already trained."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs_done):
        torch.randperm(n, generator=g)
    return g


def add_run_args(p: argparse.ArgumentParser, *, lr: float, run_dir_help: str) -> None:
    """The options every training command shares: schedule, data slice, seed, device, resume."""
    p.add_argument("--run-dir", default=None, help=run_dir_help)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--limit", type=int, default=0, help="train on the first N images only (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/state.safetensors")


def progress(iterable, enabled: bool, **kw):
    from tqdm import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kw)


def batches(n: int, batch_size: int, d: Dist, generator: torch.Generator) -> list[torch.Tensor]:
    """This rank's shuffled index batches for one epoch (every rank gets the same count)."""
    perm = torch.randperm(n, generator=generator)
    per_rank = n // d.world
    perm = perm[d.rank * per_rank: (d.rank + 1) * per_rank]
    return [perm[i: i + batch_size] for i in range(0, per_rank, batch_size)]
