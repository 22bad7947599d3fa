"""Train and evaluate the class-conditional transformer over a tokenizer's grids."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import load_bundle, read_config, save_gpt
from models.gpt import GPT, GPTConfig
from models.images import tile_image
from models.quantize import QUANTIZATIONS, quantize
from models.sampling import SAMPLING_DEFAULTS, SamplingBatch, make_batch
from models.slots import sample

from . import common
from .classifier import load_or_train_classifier
from .data import Split, augment, load_dataset
from .evaluation import Reference, add_reference_args, code_usage, publish, tokenizer_report


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="folder holding a trained vqvae")
    common.add_run_args(p, lr=1e-3, run_dir_help="token cache, PNGs, resume state (default runs/NAME-gpt)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--window", default="4,7", help="rows,cols of the attention window (see models/gpt.py)")
    p.add_argument("--label-dropout", type=float, default=0.1, help="share of null-class rows (for guidance)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="default guidance written to config.json")
    p.add_argument("--temperature", type=float, default=1.0, help="default temperature for config.json")
    p.add_argument("--positions", choices=["absolute", "relative"], default="absolute",
                   help="relative: attention biases by window offset instead of absolute position "
                        "embeddings, so a model trained on crops can slide over larger canvases "
                        "with a KV cache (models/gpt.py)")
    p.add_argument("--unconditional", action="store_true",
                   help="no class conditioning (photo data sets: their classes are photographs)")
    p.add_argument("--crops", type=int, default=16384,
                   help="photo data sets: crops an epoch, drawn afresh and tokenized as they train")
    p.add_argument("--init", default=None,
                   help="start from this checkpoint's transformer (same tokenizer and shape; its "
                        "classes may differ: new class rows start as its null class)")
    p.add_argument("--augment", type=int, default=0,
                   help="add N randomly turned/zoomed/shifted copies of every training image "
                        "(small data sets: shipped MNIST uses 8)")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--samples", type=int, default=10000, help="images sampled for the domain FID")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--cfg-scale", type=float, default=None, help="override the shipped default")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-write", action="store_true", help="print only; leave config.json alone")
    p.add_argument("--key", default="generator", help="name of the result inside evaluation")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="sample with the transformer's weights quantized (CPU), as TAMING_QUANTIZE serves it")
    add_reference_args(p)


@torch.no_grad()
def _in_batches(vqvae, images: torch.Tensor, fn, batch_size: int = 1000) -> torch.Tensor:
    """fn(vqvae, floats in [0, 1] on its device) over uint8 images, batch by batch, on the CPU."""
    dev = next(vqvae.parameters()).device
    return torch.cat([fn(vqvae, images[i: i + batch_size].to(dev).float() / 255.0).cpu()
                      for i in range(0, len(images), batch_size)])


def tokenize(vqvae, images: torch.Tensor) -> torch.Tensor:
    return _in_batches(vqvae, images, lambda vq, x: vq.encode(x).flatten(1))


def cached_tokens(bundle, data, run_dir: Path, augment_copies: int = 0,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Tokenize the data set once; the cache is keyed by the tokenizer, the split size and augmentation.

    Augmented copies are appended to the training split only; the test split stays real.
    """
    key = bundle.digest.split(":")[-1] + f"-n{len(data.train)}"
    key += f"-aug{augment_copies}s{seed}" if augment_copies else ""
    path = run_dir / f"tokens-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))
    train_images = torch.cat([data.train.images, augment(data.train.images, augment_copies, seed)])
    t = {"train_codes": tokenize(bundle.vqvae, train_images),
         "train_labels": data.train.labels.repeat(1 + augment_copies),
         "test_codes": tokenize(bundle.vqvae, data.test.images), "test_labels": data.test.labels}
    save_file({k: v.contiguous() for k, v in t.items()}, str(path))
    return t


@torch.no_grad()
def sample_images(bundle, gpt: GPT, labels: list[int | None], seed: int, batch_size: int = 500,
                  **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one image per label (None = unconditional) -> (images uint8 (N,C,H,W), codes)."""
    gpt.eval()
    g = torch.Generator().manual_seed(seed)
    grid = gpt.config.grid
    imgs, codes = [], []
    for i in range(0, len(labels), batch_size):
        batch = SamplingBatch.cat([make_batch(gpt.config, 1, grid, label=lab, generator=g, **settings)
                                   for lab in labels[i: i + batch_size]])
        c = sample(gpt, batch, grid).view(-1, *grid)
        x = bundle.vqvae.decode(c.to(next(bundle.vqvae.parameters()).device))
        imgs.append((x.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        codes.append(c.cpu())
    return torch.cat(imgs), torch.cat(codes)


def _save_class_rows(bundle, gpt: GPT, path: Path, per_class: int, seed: int, settings: dict) -> None:
    n_classes = gpt.config.n_classes
    labels = [c for c in range(n_classes) for _ in range(per_class)] or [None] * 4 * per_class
    images, _ = sample_images(bundle, gpt, labels, seed, **settings)
    tile_image(images.float() / 255, cols=per_class).save(path)


def init_from(model: GPT, folder: str | Path) -> dict:
    """Copy a trained transformer's weights into `model`, which may have other classes.

    Every tensor of the same name and shape is copied; the token table keeps the codes' rows
    and gives the source's null-class row to the null class and to every class, so the model
    starts as the unconditional one and guidance starts neutral."""
    src = load_bundle(folder, require_gpt=True).gpt
    a, b = src.config, model.config
    same = ("codebook_size", "grid", "window", "n_layer", "n_head", "d_model", "positions")
    diff = [k for k in same if getattr(a, k) != getattr(b, k)]
    if diff:
        raise SystemExit(f"--init {folder}: its transformer differs in {', '.join(diff)}")
    theirs, ours = src.state_dict(), model.state_dict()
    with torch.no_grad():
        for name, t in ours.items():
            if name == "tok_emb.weight":
                k = b.codebook_size
                t[:k] = theirs[name][:k]
                t[k:] = theirs[name][a.null_class]
            elif name in theirs and theirs[name].shape == t.shape:
                t.copy_(theirs[name])
            else:
                raise SystemExit(f"--init {folder}: no weights for {name}")
    model.load_state_dict(ours)
    return {"from": str(folder), "classes_before": a.n_classes}


def train(args: argparse.Namespace) -> Path:
    d, device = common.setup_distributed(args.device)
    common.seed_everything(args.seed)
    folder = Path(args.checkpoint)
    bundle = load_bundle(folder, device=device)
    vq = bundle.vqvae.config
    data = load_dataset(bundle.config["dataset"], vq.image_size, crops=args.crops, seed=args.seed)
    run_dir = Path(args.run_dir or Path("runs") / f"{folder.name}-gpt")
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.limit:
        data.train = Split(data.train.images[: args.limit], data.train.labels[: args.limit])
    if data.streamed:  # photo crops: drawn and tokenized batch by batch, the test crops once
        tokens = {"test_codes": tokenize(bundle.vqvae, data.test.images),
                  "test_labels": data.test.labels}
        codes, labels = data.train.images, data.train.labels
    else:
        if d.main:
            tokens = cached_tokens(bundle, data, run_dir, args.augment, args.seed)
        if d.world > 1:
            torch.distributed.barrier()
            tokens = cached_tokens(bundle, data, run_dir, args.augment, args.seed)
        codes, labels = tokens["train_codes"], tokens["train_labels"]
    classes = [] if args.unconditional else data.classes
    cfg = GPTConfig(codebook_size=vq.codebook_size, n_classes=len(classes), grid=vq.grid,
                    window=tuple(int(w) for w in args.window.split(",")), n_layer=args.n_layer,
                    n_head=args.n_head, d_model=args.d_model, dropout=args.dropout,
                    positions=args.positions)
    model = GPT(cfg)
    init_info = init_from(model, args.init) if args.init else None
    model = model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "emb" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(codes) // d.world / args.batch_size)
    total = max(1, steps_per_epoch * args.epochs)
    warm = min(200, total // 10 + 1)

    def lr_factor(s: int) -> float:  # linear warm-up, cosine down to 10%
        return min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, total) / total)))

    state_path = run_dir / "state.safetensors"
    start_epoch = common.resume(state_path, {"model": model}, {"opt": opt}, args.resume, d.main)["epoch"]
    ddp = model
    if d.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    g = common.shuffler(args.seed, len(codes), start_epoch)
    step = start_epoch * steps_per_epoch
    if args.unconditional and args.cfg_scale != 1:
        raise SystemExit("--cfg-scale needs classes: an unconditional model samples unguided")
    settings = {"temperature": args.temperature, "cfg_scale": args.cfg_scale}

    def class_ids(lab: torch.Tensor) -> torch.Tensor:
        return torch.full_like(lab, cfg.null_class) if args.unconditional else lab + cfg.codebook_size

    test_x = model.training_inputs(tokens["test_codes"][:2000], class_ids(tokens["test_labels"][:2000]))
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.time()
        bar = common.progress(common.batches(len(codes), args.batch_size, d, g), d.main,
                              desc=f"epoch {epoch + 1}/{args.epochs}")
        for idx in bar:
            lr = args.lr * lr_factor(step)
            common.set_lr(opt, lr)
            step += 1
            y = (tokenize(bundle.vqvae, codes[idx]) if data.streamed else codes[idx]).to(device)
            cls = class_ids(labels[idx]).to(device)
            drop = torch.rand(len(idx), device=device) < args.label_dropout
            cls = torch.where(drop, torch.full_like(cls, cfg.null_class), cls)
            _, loss = ddp(model.training_inputs(y, cls), targets=y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        train_loss = common.all_mean(loss.item(), d, device)
        if d.main:
            model.eval()
            with torch.no_grad():
                _, test_loss = model(test_x.to(device), targets=tokens["test_codes"][:2000].to(device))
            common.save_states(state_path, {"model": model}, {"opt": opt}, {"epoch": epoch + 1})
            _save_class_rows(bundle, model, run_dir / f"samples_epoch{epoch + 1:03d}.png", 10,
                             args.seed, settings)
            save_gpt(folder, model, {
                "classes": classes,
                "sampling_defaults": dict(SAMPLING_DEFAULTS, **settings),
                "training": dict(read_config(folder).get("training", {}), transformer={
                    "epochs": epoch + 1, "batch_size": args.batch_size, "lr": args.lr,
                    "label_dropout": 0.0 if args.unconditional else args.label_dropout,
                    "augment_copies": args.augment, "positions": args.positions,
                    "seed": args.seed, "world_size": d.world, "init": init_info,
                    "train_sequences": len(codes), "streamed_crops": data.streamed,
                    "device": str(device),
                    "test_loss": round(float(test_loss), 4)})})
            print(json.dumps({"epoch": epoch + 1, "train_loss": round(train_loss, 4),
                              "test_loss": round(float(test_loss), 4),
                              "seconds": round(time.time() - t0, 1)}), flush=True)
    if d.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return folder


def evaluate(args: argparse.Namespace) -> dict:
    """Class accuracy and domain FID of conditional samples, beside the tokenizer's own figures
    (real training images: the floor; reconstructions of training images), all against the test set."""
    folder = Path(args.checkpoint)
    device = str(common.pick_device(args.device))
    bundle = load_bundle(folder, device=device, require_gpt=True)
    data = load_dataset(bundle.config["dataset"])
    clf = load_or_train_classifier(folder, data, device=device, seed=args.seed,
                                   steps=args.classifier_steps, path=args.classifier)
    settings = dict(bundle.config.get("sampling_defaults") or SAMPLING_DEFAULTS)
    if args.cfg_scale is not None:
        settings["cfg_scale"] = args.cfg_scale
    for key in ("temperature", "top_k", "top_p"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    n_classes = bundle.gpt.config.n_classes
    labels = [i % n_classes for i in range(args.samples)]
    t0 = time.time()
    gpt = quantize(bundle.gpt, args.quantize) if args.quantize else bundle.gpt
    images, codes = sample_images(bundle, gpt, labels, args.seed, args.batch_size, **settings)
    sample_seconds = time.time() - t0
    ref = Reference(clf, data, args.train_images, args.seed)
    fid_samples = ref.fid(images)
    result = {
        "settings": dict(settings),
        **({"quantization": args.quantize} if args.quantize else {}),
        "samples": len(images),
        "class_accuracy": round(ref.accuracy(images, torch.tensor(labels)), 4),
        "domain_fid_samples": round(fid_samples, 3),
        "fid_ratio_samples": round(fid_samples / max(ref.fid_real, 1e-9), 3),
        "sample_code_usage": code_usage(codes, bundle.vqvae.config.codebook_size),
        **tokenizer_report(bundle.vqvae, ref),
        "sampling_images_per_s": round(len(images) / sample_seconds, 1),
        "device": device,
    }
    return publish(result, folder, args.key, not args.no_write)
