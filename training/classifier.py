"""A small per-data-set classifier, used only for evaluation (class accuracy, domain FID).

Shipped beside the checkpoint as classifier.safetensors; trained on the real training split.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CLASSIFIER_FILE = "classifier.safetensors"


class Classifier(nn.Module):
    def __init__(self, channels: int, n_classes: int, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(512, feature_dim), nn.ReLU())
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


def train_classifier(data, device="cpu", steps: int = 1500, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    clf = Classifier(data.channels, len(data.classes)).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    x, y = data.train.images, data.train.labels
    g = torch.Generator().manual_seed(seed)
    epochs = max(1, -(-steps * 128 // len(x)))  # same number of steps for small and large sets
    for _ in range(epochs):
        clf.train()
        for idx in torch.randperm(len(x), generator=g).split(128):
            xb = x[idx].to(device).float() / 255
            # small random shifts make the features robust to generator jitter
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(clf(xb), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.test_accuracy = round(float((clf.predict(data.test.images) == data.test.labels).float().mean()), 4)
    return clf


def load_or_train_classifier(folder: Path, data, device="cpu", seed: int = 0,
                             steps: int = 1500) -> Classifier:
    path = Path(folder) / CLASSIFIER_FILE
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        clf = Classifier(meta["channels"], meta["n_classes"])
        clf.load_state_dict(load_file(str(path)))
        clf.test_accuracy = meta["test_accuracy"]
        return clf.to(device)
    clf = train_classifier(data, device=device, steps=steps, seed=seed)
    meta = {"channels": data.channels, "n_classes": len(data.classes), "test_accuracy": clf.test_accuracy}
    save_file({k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items()}, str(path),
              metadata={"meta": json.dumps(meta)})
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
