"""The perceptual loss of the VQGAN: distances between the features of a small network.

No pretrained ImageNet weights can be downloaded here, so the feature network is a small
VGG-style classifier trained for this loss on the training split of the data set (never on the
test split). It is separate from the evaluation classifier (training/classifier.py), which has
to stay independent of every training loss. The distance follows LPIPS without its learned
per-channel weights: unit-normalise each tap's features over channels, square the difference,
average over positions, sum over taps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .common import pick_device, progress, seed_everything
from .data import load_dataset

DEFAULT_WIDTHS = (16, 32, 64)


class PerceptualNet(nn.Module):
    """Three stages of two 3x3 convs; the ReLU output of each stage is a feature tap."""

    def __init__(self, channels: int, n_classes: int, widths: tuple[int, ...] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        self.channels, self.n_classes, self.widths = channels, n_classes, tuple(widths)
        stages, prev = [], channels
        for w in widths:
            stages.append(nn.Sequential(
                nn.Conv2d(prev, w, 3, padding=1), nn.ReLU(),
                nn.Conv2d(w, w, 3, padding=1), nn.ReLU()))
            prev = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(prev, n_classes)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x in [0, 1] -> the feature map after every stage (pooled 2x between stages)."""
        h, out = x * 2 - 1, []
        for i, stage in enumerate(self.stages):
            if i:
                h = F.max_pool2d(h, 2)
            h = stage(h)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.taps(x)[-1].mean((2, 3)))


def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


class PerceptualLoss(nn.Module):
    """Frozen feature distance between images in [0, 1]; one value per image."""

    def __init__(self, net: PerceptualNet) -> None:
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # always in eval mode: the net is frozen

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.net.taps(x), self.net.taps(y)
        return sum((_unit(a) - _unit(b)).pow(2).sum(1).mean((1, 2)) for a, b in zip(fx, fy, strict=True))


def train_perceptual(data, epochs: int = 2, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     device: str | torch.device = "cpu", limit: int = 0,
                     widths: tuple[int, ...] = DEFAULT_WIDTHS, show: bool = True) -> PerceptualNet:
    """Train the feature net as a classifier on the training split (random 2-pixel shifts)."""
    seed_everything(seed)
    x_all, y_all = data.train.images, data.train.labels
    if limit:
        x_all, y_all = x_all[:limit], y_all[:limit]
    net = PerceptualNet(data.channels, len(data.classes), widths).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(x_all) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, steps))
    for epoch in range(epochs):
        net.train()
        bar = progress(torch.randperm(len(x_all), generator=g).split(batch_size), show,
                       desc=f"perceptual net {epoch + 1}/{epochs}")
        for idx in bar:
            xb = x_all[idx].to(device).float() / 255
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return net.eval()


@torch.no_grad()
def accuracy(net: PerceptualNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    dev = next(net.parameters()).device
    net.eval()
    pred = torch.cat([net(images[i: i + 1000].to(dev).float() / 255).argmax(1).cpu()
                      for i in range(0, len(images), 1000)])
    return float((pred == labels).float().mean())


def save_perceptual(net: PerceptualNet, path: Path, meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, channels=net.channels, n_classes=net.n_classes, widths=list(net.widths))
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"meta": json.dumps(meta)})


def load_perceptual(path: Path) -> PerceptualNet:
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    net = PerceptualNet(meta["channels"], meta["n_classes"], tuple(meta["widths"]))
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True, help="safetensors file to write")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--limit", type=int, default=0, help="train on the first N images only (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def main(args: argparse.Namespace) -> Path:
    """`python -m training perceptual`: train the feature net and report its test accuracy."""
    data = load_dataset(args.dataset)
    device = pick_device(args.device)
    t0 = time.time()
    net = train_perceptual(data, args.epochs, args.batch_size, args.lr, args.seed, device, args.limit)
    acc = round(accuracy(net, data.test.images, data.test.labels), 4)
    meta = {"dataset": args.dataset, "epochs": args.epochs, "seed": args.seed,
            "train_images": args.limit or len(data.train), "test_accuracy": acc}
    save_perceptual(net, Path(args.out), meta)
    print(json.dumps(dict(meta, seconds=round(time.time() - t0, 1))), flush=True)
    return Path(args.out)
