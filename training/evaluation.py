"""Domain FID figures that separate the tokenizer from the generator.

All three sets are compared with the test split on the evaluation classifier's features:
real training images (the floor: what two real samples of the data score), the tokenizer's
reconstructions of those same training images (never of the test images themselves, which
would flatter it), and, for a generator, its samples. Ratios are against the floor.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from models.checkpoint import read_config, write_config

from .classifier import Classifier, frechet_distance


def train_subset(data, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of n training images (all of them when n >= the split)."""
    if n <= 0 or n >= len(data.train):
        return data.train.images, data.train.labels
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n]
    return data.train.images[idx], data.train.labels[idx]


@torch.no_grad()
def reconstruct(vqvae, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> (uint8 reconstructions, code grids), batch by batch on the tokenizer's device."""
    dev = next(vqvae.parameters()).device
    vqvae.eval()
    out, codes = [], []
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].to(dev).float() / 255.0
        c = vqvae.encode(x)
        out.append((vqvae.decode(c).clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        codes.append(c.cpu())
    return torch.cat(out), torch.cat(codes)


def add_reference_args(p: argparse.ArgumentParser) -> None:
    """Options of the domain FID both evaluations share."""
    p.add_argument("--classifier", default=None,
                   help="evaluation classifier (default CHECKPOINT/classifier.safetensors, trained there "
                        "when missing); pass the shipped one to compare a candidate with it")
    p.add_argument("--classifier-steps", type=int, default=6000,
                   help="training steps of the evaluation classifier when none exists yet")
    p.add_argument("--train-images", type=int, default=10000,
                   help="training images (and their reconstructions) compared with the test split")
    p.add_argument("--seed", type=int, default=0)


def code_usage(codes: torch.Tensor, codebook_size: int) -> float:
    """Share of the codebook that occurs at least once in `codes`."""
    return round(float(torch.bincount(codes.flatten(), minlength=codebook_size).gt(0).double().mean()), 4)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two uint8 image sets (pixels scaled to [0, 1])."""
    mse = float(((a.double() - b.double()) / 255).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


class Reference:
    """The test split's features and the training floor, computed once per evaluation."""

    def __init__(self, clf: Classifier, data, n_train: int = 10000, seed: int = 0) -> None:
        self.clf = clf
        self.test_feats = clf.features(data.test.images)
        self.train_images, self.train_labels = train_subset(data, n_train, seed)
        self.fid_real = frechet_distance(clf.features(self.train_images), self.test_feats)

    def fid(self, images: torch.Tensor) -> float:
        return frechet_distance(self.clf.features(images), self.test_feats)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.clf.predict(images) == labels).float().mean())


def tokenizer_report(vqvae, ref: Reference) -> dict:
    """Domain FID, PSNR, class accuracy and code usage of reconstructions of training images."""
    recon, codes = reconstruct(vqvae, ref.train_images)
    fid_recon = ref.fid(recon)
    return {
        "train_images": len(ref.train_images),
        "classifier_test_accuracy": ref.clf.test_accuracy,
        "domain_fid_real_train": round(ref.fid_real, 3),
        "domain_fid_reconstructions_train": round(fid_recon, 3),
        "fid_ratio_reconstructions": round(fid_recon / max(ref.fid_real, 1e-9), 3),
        "psnr_db_train": round(psnr(recon, ref.train_images), 3),
        "code_usage_train": code_usage(codes, vqvae.config.codebook_size),
        "reconstruction_class_accuracy": round(ref.accuracy(recon, ref.train_labels), 4),
        "real_train_class_accuracy": round(ref.accuracy(ref.train_images, ref.train_labels), 4),
    }


def publish(result: dict, folder: Path, key: str, write: bool) -> dict:
    """Print an evaluation as one JSON line and, unless told not to, keep it in the
    checkpoint's config.json under evaluation.KEY."""
    if write:
        cfg = read_config(folder)
        cfg.setdefault("evaluation", {})[key] = result
        write_config(folder, cfg)
    print(json.dumps(result))
    return result
