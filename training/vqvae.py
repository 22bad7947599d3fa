"""Train and evaluate the VQ-VAE tokenizer; writes a servable checkpoint folder."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from models.checkpoint import load_bundle, read_config, save_vqvae, write_config
from models.images import tile, to_uint8
from models.vqvae import VQVAE, VQVAEConfig

from .common import all_mean, batches, load_state, progress, save_state, seed_everything, setup_distributed
from .data import load_dataset


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="mnist | fashion-mnist | idx:DIR | folder:DIR")
    p.add_argument("--out", required=True, help="checkpoint folder to write, e.g. checkpoints/mnist")
    p.add_argument("--run-dir", default=None, help="per-epoch PNGs and resume state (default runs/NAME)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--code-dim", type=int, default=32)
    p.add_argument("--widths", default="16,48,96", help="comma list, finest first")
    p.add_argument("--downsample", type=int, default=4)
    p.add_argument("--res-blocks", type=int, default=1)
    p.add_argument("--quantizer", choices=["ema", "plain"], default="ema")
    p.add_argument("--beta", type=float, default=0.25)
    p.add_argument("--limit", type=int, default=0, help="train on the first N images only (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/state.safetensors")


def _save_recon_png(model: VQVAE, x: torch.Tensor, path: Path) -> None:
    model.eval()
    with torch.no_grad():
        recon = model(x)[0]
    pairs = torch.stack([x, recon], 1).flatten(0, 1)  # original beside its reconstruction
    Image.fromarray(tile(to_uint8(pairs.cpu()), cols=16).squeeze(-1)).save(path)


def train(args: argparse.Namespace) -> Path:
    d, device = setup_distributed(args.device)
    seed_everything(args.seed)
    data = load_dataset(args.dataset)
    train_x = data.train.images[: args.limit] if args.limit else data.train.images
    out = Path(args.out)
    run_dir = Path(args.run_dir or Path("runs") / out.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = VQVAEConfig(
        image_size=data.image_size, channels=data.channels, downsample=args.downsample,
        widths=tuple(int(w) for w in args.widths.split(",")), res_blocks=args.res_blocks,
        codebook_size=args.codebook_size, code_dim=args.code_dim, quantizer=args.quantizer,
        beta=args.beta)
    model = VQVAE(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = math.ceil(len(train_x) // d.world / args.batch_size)
    total = max(1, steps_per_epoch * args.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    start_epoch = 0
    state_path = run_dir / "state.safetensors"
    if args.resume and state_path.is_file():
        meta = load_state(state_path, model, opt)
        start_epoch = meta["epoch"]
        for _ in range(start_epoch * steps_per_epoch):
            sched.step()
        if d.main:
            print(f"resumed from {state_path} at epoch {start_epoch}")
    ddp = model
    if d.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the quantizer syncs its own buffers
    fixed = data.test.floats()[:64].to(device)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(start_epoch):
        torch.randperm(len(train_x), generator=g)  # keep the shuffles of a resumed run
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.time()
        bar = progress(batches(len(train_x), args.batch_size, d, g), d.main,
                       desc=f"epoch {epoch + 1}/{args.epochs}")
        for idx in bar:
            x = train_x[idx].to(device).float() / 255.0
            recon, codes, qloss, stats = ddp(x)
            rec = F.mse_loss(recon, x)
            loss = rec + qloss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{rec.item():.4f}",
                            usage=f"{stats['usage']:.2f}", ppl=f"{stats['perplexity']:.0f}")
        rec_mean = all_mean(rec.item(), d, device)
        if d.main:
            save_state(state_path, model, opt, {"epoch": epoch + 1})
            _save_recon_png(model, fixed, run_dir / f"recon_epoch{epoch + 1:03d}.png")
            save_vqvae(out, model, {
                "name": out.name, "dataset": args.dataset, "classes": data.classes,
                "training": {"vqvae": {"epochs": epoch + 1, "batch_size": args.batch_size,
                                        "lr": args.lr, "seed": args.seed, "world_size": d.world,
                                        "train_images": len(train_x), "device": str(device)}}})
            print(json.dumps({"epoch": epoch + 1, "mse": round(rec_mean, 5),
                              "seconds": round(time.time() - t0, 1)}), flush=True)
    if d.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return out


@torch.no_grad()
def measure(model: VQVAE, images: torch.Tensor, batch_size: int = 500) -> dict:
    """MSE, PSNR (dB, pixels in [0, 1]), code usage and perplexity over a set of images."""
    model.eval()
    K = model.config.codebook_size
    dev = next(model.parameters()).device
    se, n_px = 0.0, 0
    counts = torch.zeros(K, dtype=torch.float64)
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].to(dev).float() / 255.0
        codes = model.encode(x)
        recon = model.decode(codes)
        se += float(((recon - x) ** 2).sum())
        n_px += x.numel()
        counts += torch.bincount(codes.flatten().cpu(), minlength=K).double()
    mse = se / n_px
    p = counts / counts.sum()
    return {"mse": round(mse, 6), "psnr_db": round(10 * math.log10(1.0 / mse), 3),
            "code_usage": round(float((counts > 0).double().mean()), 4),
            "perplexity": round(float(torch.exp(-(p * torch.log(p + 1e-12)).sum())), 2),
            "images": len(images)}


def evaluate(args: argparse.Namespace) -> dict:
    folder = Path(args.checkpoint)
    bundle = load_bundle(folder, device=args.device if args.device != "auto" else "cpu")
    data = load_dataset(bundle.config["dataset"])
    result = measure(bundle.vqvae, data.test.images)
    result["split"] = "test"
    cfg = read_config(folder)
    cfg.setdefault("evaluation", {})["vqvae"] = result
    write_config(folder, cfg)
    print(json.dumps(result))
    return result
