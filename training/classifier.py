"""A small per-data-set classifier, used only for evaluation (class accuracy, domain FID).

Shipped beside the checkpoint as classifier.safetensors; trained on the real training split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .common import progress

CLASSIFIER_FILE = "classifier.safetensors"


def _body(arch: int, channels: int, feature_dim: int) -> nn.Sequential:
    """arch 1: the first classifier (files without an `arch` still load as it). arch 2: BatchNorm,
    two convs at 14x14 and dropout, strong enough to judge Fashion-MNIST (>= 92% on its test split)."""
    if arch == 1:
        return nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(512, feature_dim), nn.ReLU())
    if arch == 2:
        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        return nn.Sequential(
            *block(channels, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            *block(64, 128), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.3),
            nn.Linear(512, feature_dim), nn.ReLU())
    raise ValueError(f"unknown classifier arch {arch}")


class Classifier(nn.Module):
    def __init__(self, channels: int, n_classes: int, feature_dim: int = 128, arch: int = 2) -> None:
        super().__init__()
        self.arch = arch
        self.body = _body(arch, channels, feature_dim)
        self.head = nn.Linear(feature_dim, n_classes)
        self.test_accuracy = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def _batches(self, images: torch.Tensor, fn, batch_size: int = 1000) -> torch.Tensor:
        self.eval()
        dev = next(self.parameters()).device
        with torch.no_grad():
            return torch.cat([fn(images[i: i + batch_size].to(dev).float() / 255).cpu()
                              for i in range(0, len(images), batch_size)])

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self._batches(images, lambda x: self(x).argmax(1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations: the space the domain FID is measured in."""
        return self._batches(images, self.body)


def train_classifier(data, device="cpu", steps: int = 1500, seed: int = 0, arch: int = 2,
                     show: bool = False, flip: bool = False) -> Classifier:
    """Train on the real training split (random shifts of up to 2 pixels; with `flip`, half the
    batches mirrored left-right, for data sets whose classes are symmetric), one-cycle schedule."""
    torch.manual_seed(seed)
    clf = Classifier(data.channels, len(data.classes), arch=arch).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    x, y = data.train.images, data.train.labels
    g = torch.Generator().manual_seed(seed)
    per_epoch = -(-len(x) // 128)
    epochs = max(1, -(-steps // per_epoch))  # about the same number of steps for small and large sets
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * per_epoch)
    for epoch in range(epochs):
        clf.train()
        bar = progress(torch.randperm(len(x), generator=g).split(128), show,
                       desc=f"classifier {epoch + 1}/{epochs}")
        for idx in bar:
            xb = x[idx].to(device).float() / 255
            # small random shifts make the features robust to generator jitter
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            if flip and torch.rand((), generator=g) < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(clf(xb), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    clf.test_accuracy = round(float((clf.predict(data.test.images) == data.test.labels).float().mean()), 4)
    return clf


def load_classifier(path: Path, device="cpu") -> Classifier:
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    clf = Classifier(meta["channels"], meta["n_classes"], arch=meta.get("arch", 1))
    clf.load_state_dict(load_file(str(path)))
    clf.test_accuracy = meta["test_accuracy"]
    return clf.to(device).eval()


def save_classifier(clf: Classifier, path: Path, meta: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {}, channels=clf.body[0].in_channels, n_classes=clf.head.out_features,
                test_accuracy=clf.test_accuracy, arch=clf.arch)
    save_file({k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items()}, str(path),
              metadata={"meta": json.dumps(meta)})


def load_or_train_classifier(folder: Path, data, device="cpu", seed: int = 0,
                             steps: int = 1500, path: Path | None = None) -> Classifier:
    """The evaluation classifier at `path` (default FOLDER/classifier.safetensors), trained and
    saved there first when missing."""
    path = Path(path) if path else Path(folder) / CLASSIFIER_FILE
    if path.is_file():
        return load_classifier(path, device)
    clf = train_classifier(data, device=device, steps=steps, seed=seed)
    save_classifier(clf, path, {"steps": steps, "seed": seed})
    return clf


def add_args(p) -> None:
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True, help="safetensors file to write, e.g. checkpoints/NAME/"
                                               + CLASSIFIER_FILE)
    p.add_argument("--steps", type=int, default=6000, help="training steps of batch 128")
    p.add_argument("--flip", action="store_true",
                   help="mirror half the batches left-right (clothes, not digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def main(args) -> Classifier:
    """`python -m training classifier`: train the evaluation classifier, report its test accuracy."""
    from .common import pick_device
    from .data import load_dataset

    data = load_dataset(args.dataset)
    t0 = time.time()
    clf = train_classifier(data, device=pick_device(args.device), steps=args.steps, seed=args.seed,
                           show=True, flip=args.flip)
    save_classifier(clf, args.out, {"dataset": args.dataset, "steps": args.steps, "seed": args.seed,
                                    "flip": args.flip})
    print(json.dumps({"test_accuracy": clf.test_accuracy, "test_images": len(data.test),
                      "steps": args.steps, "seconds": round(time.time() - t0, 1)}), flush=True)
    return clf


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (float64, eigh-based sqrt)."""
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = torch.cov(a.t()), torch.cov(b.t())
    w, v = torch.linalg.eigh(c1)
    s1 = (v * w.clamp(min=0).sqrt()) @ v.t()
    m = s1 @ c2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.t()) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + c1.trace() + c2.trace() - 2 * tr_sqrt)
