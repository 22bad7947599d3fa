"""Train and evaluate the tokenizer (VQ-VAE, or VQGAN with --loss vqgan); writes a servable checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from models.checkpoint import GPT_FILE, load_bundle, read_config, save_vqvae, write_config
from models.images import tile_image
from models.vqvae import VQVAE, VQVAEConfig

from .classifier import load_or_train_classifier
from .common import (
    add_run_args,
    all_mean,
    batches,
    pick_device,
    progress,
    resume,
    save_states,
    seed_everything,
    set_lr,
    setup_distributed,
    shuffler,
)
from .data import load_dataset
from .evaluation import Reference, add_reference_args, publish, tokenizer_report
from .perceptual import PerceptualLoss, PerceptualNet, load_perceptual, save_perceptual, train_perceptual
from .vqgan import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, set_requires_grad


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True,
                   help="mnist | fashion-mnist | landscapes | nature | idx:DIR | folder:DIR | crops:DIR")
    p.add_argument("--crop-size", type=int, default=None,
                   help="photo data sets: side of the training crops (default 128)")
    p.add_argument("--image-size", type=int, default=None,
                   help="photo data sets: side of the images the checkpoint serves (default: the crop "
                        "size; the tokenizer is convolutional, so it may train on smaller crops)")
    p.add_argument("--crops", type=int, default=16384, help="photo data sets: training crops an epoch")
    p.add_argument("--out", required=True, help="checkpoint folder to write, e.g. checkpoints/mnist")
    add_run_args(p, lr=2e-3, run_dir_help="per-epoch PNGs and resume state (default runs/NAME)")
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--code-dim", type=int, default=32)
    p.add_argument("--widths", default="16,48,96", help="comma list, finest first")
    p.add_argument("--downsample", type=int, default=4)
    p.add_argument("--res-blocks", type=int, default=1)
    p.add_argument("--quantizer", choices=["ema", "plain"], default="ema")
    p.add_argument("--beta", type=float, default=0.25)
    g = p.add_argument_group("VQGAN (--loss vqgan)")
    g.add_argument("--loss", choices=["mse", "vqgan"], default="mse",
                   help="mse: pixel MSE (VQ-VAE); vqgan: L1 + perceptual + patch-adversarial")
    g.add_argument("--perceptual", default=None,
                   help="feature net for the perceptual loss (default RUN_DIR/perceptual.safetensors, "
                        "trained on the training split first when missing)")
    g.add_argument("--perceptual-weight", type=float, default=1.0)
    g.add_argument("--perceptual-epochs", type=int, default=2, help="when the feature net is trained here")
    g.add_argument("--disc-start", type=int, default=2000,
                   help="plain reconstruction steps before the discriminator switches on")
    g.add_argument("--disc-weight", type=float, default=0.8, help="times the adaptive weight")
    g.add_argument("--disc-lr", type=float, default=None, help="default: --lr")
    g.add_argument("--disc-width", type=int, default=32)
    g.add_argument("--disc-layers", type=int, default=2)
    g.add_argument("--init", default=None,
                   help="start from this checkpoint folder's tokenizer (its architecture replaces the "
                        "--widths/--codebook-size/... arguments): a trained VQ-VAE as the warm-up")
    g.add_argument("--train-decoder-only", action="store_true",
                   help="with --init: freeze the encoder and the codebook, so the token grids stay "
                        "valid; only the decoder learns, and the init's transformer is copied along")
    g.add_argument("--decoder-fine-blocks", type=int, default=None,
                   help="residual blocks in the decoder at full resolution (default 0, or the "
                        "init's); with --init, more than it has grows its decoder by blocks that "
                        "start as the identity")


def _save_recon_png(model: VQVAE, x: torch.Tensor, path: Path) -> None:
    model.eval()
    with torch.no_grad():
        recon = model(x)[0]
    pairs = torch.stack([x, recon], 1).flatten(0, 1)  # original beside its reconstruction
    tile_image(pairs, cols=16).save(path)


def _psnr(model: VQVAE, x: torch.Tensor) -> float:
    """PSNR (dB) of the reconstructions of a fixed monitoring slice of the test split."""
    model.eval()
    with torch.no_grad():
        mse = float(((model(x)[0] - x) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _perceptual_net(args: argparse.Namespace, data, run_dir: Path, d, device) -> tuple[PerceptualNet, str]:
    """Load the feature net, training it on the training split first when the file is missing."""
    path = Path(args.perceptual or run_dir / "perceptual.safetensors")
    if d.main and not path.is_file():
        print(f"training the perceptual feature net -> {path}", flush=True)
        net = train_perceptual(data, epochs=args.perceptual_epochs, seed=args.seed, device=device,
                               limit=args.limit)
        save_perceptual(net, path, {"dataset": args.dataset, "epochs": args.perceptual_epochs,
                                    "seed": args.seed, "train_images": args.limit or len(data.train)})
    if d.world > 1:
        torch.distributed.barrier()
    return load_perceptual(path).to(device), str(path)


def grow_decoder(model: VQVAE, fine_blocks: int) -> VQVAE:
    """`model` with `fine_blocks` full-resolution residual blocks in its decoder instead of fewer.
    The new blocks go just before the output layers with their last conv zeroed, so each
    starts as the identity and the grown tokenizer decodes exactly as `model` did."""
    old = model.config.decoder_fine_blocks
    if fine_blocks < old:
        raise SystemExit(f"--decoder-fine-blocks {fine_blocks}: the init's decoder already has {old}")
    grown = VQVAE(replace(model.config, decoder_fine_blocks=fine_blocks)).to(next(model.parameters()).device)
    grown.encoder.load_state_dict(model.encoder.state_dict())
    grown.quantizer.load_state_dict(model.quantizer.state_dict())
    src, dst = model.decoder.net, grown.decoder.net
    head = len(src) - 3  # everything before the output norm, activation and conv
    for i in range(head):
        dst[i].load_state_dict(src[i].state_dict())
    for i in range(head, len(dst) - 3):
        last = dst[i].block[-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    for i in range(1, 4):
        dst[-i].load_state_dict(src[-i].state_dict())
    return grown.train(model.training)


def carry_transformer(init: Path, out: Path) -> bool:
    """Copy a transformer and its sampling defaults from `init` into `out`, whose tokenizer shares
    init's encoder and codebook (--train-decoder-only): the token grids it learned are unchanged."""
    src = read_config(init)
    if "transformer" not in src:
        return False
    shutil.copyfile(Path(init) / GPT_FILE, Path(out) / GPT_FILE)
    cfg = read_config(out)
    cfg["transformer"] = src["transformer"]
    cfg["classes"] = src.get("classes", [])  # the transformer's classes, not the data's folders
    if "max_grid" in src:
        cfg["max_grid"] = src["max_grid"]
    if "sampling_defaults" in src:
        cfg["sampling_defaults"] = src["sampling_defaults"]
    if "transformer" in src.get("training", {}):
        carried = dict(src["training"]["transformer"], carried_from=str(init))
        cfg.setdefault("training", {})["transformer"] = carried
    write_config(out, cfg)
    return True


def train(args: argparse.Namespace) -> Path:
    d, device = setup_distributed(args.device)
    seed_everything(args.seed)
    crop = (args.crop_size,) * 2 if args.crop_size else None
    data = load_dataset(args.dataset, crop, crops=args.crops, seed=args.seed)
    train_x = data.train.images[: args.limit] if args.limit else data.train.images
    image_size = (args.image_size,) * 2 if args.image_size else data.image_size
    out = Path(args.out)
    run_dir = Path(args.run_dir or Path("runs") / out.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    vqgan = args.loss == "vqgan"
    if vqgan:
        feature_net, feature_path = _perceptual_net(args, data, run_dir, d, device)
        perceptual = PerceptualLoss(feature_net)
        seed_everything(args.seed)  # the same tokenizer init whether or not the net was trained here
    init_training = None
    if args.init:
        init = load_bundle(args.init)
        model, init_training = init.vqvae.train().to(device), init.config.get("training", {}).get("vqvae")
        cfg = model.config
        if (cfg.image_size, cfg.channels) != (image_size, data.channels):
            raise SystemExit(f"--init {args.init}: a tokenizer for {cfg.image_size}x{cfg.channels} images")
        if args.decoder_fine_blocks is not None and args.decoder_fine_blocks != cfg.decoder_fine_blocks:
            model = grow_decoder(model, args.decoder_fine_blocks)
            cfg = model.config
    else:
        cfg = VQVAEConfig(
            image_size=image_size, channels=data.channels, downsample=args.downsample,
            widths=tuple(int(w) for w in args.widths.split(",")), res_blocks=args.res_blocks,
            decoder_fine_blocks=args.decoder_fine_blocks or 0,
            codebook_size=args.codebook_size, code_dim=args.code_dim, quantizer=args.quantizer,
            beta=args.beta)
        model = VQVAE(cfg).to(device)
    if args.train_decoder_only:
        if not args.init:
            raise SystemExit("--train-decoder-only needs --init: a trained encoder and codebook to keep")
        for part in (model.encoder, model.quantizer):
            part.requires_grad_(False)
    # the GAN's Adam betas (as in the paper) in VQGAN mode, the defaults otherwise
    betas = (0.5, 0.9) if vqgan else (0.9, 0.999)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=betas)
    steps_per_epoch = math.ceil(len(train_x) // d.world / args.batch_size)
    total = max(1, steps_per_epoch * args.epochs)

    def lr_factor(s: int) -> float:  # linear warm-up, cosine to zero
        return min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))

    modules: dict[str, torch.nn.Module] = {"model": model}
    optimizers = {"opt": opt}
    if vqgan:
        disc = PatchDiscriminator(cfg.channels, args.disc_width, args.disc_layers).to(device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=args.disc_lr or args.lr, betas=betas)
        modules["disc"], optimizers["disc_opt"] = disc, disc_opt
    base_lr = {"opt": args.lr, "disc_opt": args.disc_lr or args.lr}
    state_path = run_dir / "state.safetensors"
    meta = resume(state_path, modules, optimizers, args.resume, d.main)
    if meta["epoch"] and meta.get("loss", "mse") != args.loss:
        raise SystemExit(f"{state_path} holds a --loss {meta.get('loss', 'mse')} run, not {args.loss}")
    start_epoch = meta["epoch"]
    ddp, ddisc = model, modules.get("disc")
    if d.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        # the quantizer syncs its own buffers
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        if vqgan:
            ddisc = torch.nn.parallel.DistributedDataParallel(disc, device_ids=ids)
    fixed = data.test.floats()[:64].to(device)
    monitor = data.test.floats()[:1000].to(device)
    g = shuffler(args.seed, len(train_x), start_epoch)
    last_layer = model.decoder.net[-1].weight
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        model.train()
        if args.train_decoder_only:  # eval mode: no EMA updates or restarts of the frozen codebook
            model.encoder.eval()
            model.quantizer.eval()
        t0 = time.time()
        sums: dict[str, float] = {}
        bar = progress(batches(len(train_x), args.batch_size, d, g), d.main,
                       desc=f"epoch {epoch + 1}/{args.epochs}")
        for idx in bar:
            x = train_x[idx].to(device).float() / 255.0
            recon, codes, qloss, stats = ddp(x)
            for name, o in optimizers.items():
                set_lr(o, base_lr[name] * lr_factor(step))
            logs = {"usage": stats["usage"]}
            if vqgan:
                rec = (recon - x).abs().mean()
                p_loss = perceptual(x, recon).mean()
                nll = rec + args.perceptual_weight * p_loss
                logs.update(l1=rec.item(), perc=p_loss.item())
            else:
                rec = nll = F.mse_loss(recon, x)
                logs["mse"] = rec.item()
            loss = nll + qloss
            gan_on = vqgan and step >= args.disc_start
            if gan_on:
                set_requires_grad(disc, False)
                g_loss = hinge_g_loss(disc(recon))
                weight = all_mean(float(adaptive_weight(nll, g_loss, last_layer)), d, device)
                loss = loss + args.disc_weight * weight * g_loss
                logs.update(g=g_loss.item(), w=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if gan_on:
                set_requires_grad(disc, True)
                logits = ddisc(torch.cat([x, recon.detach()]))
                d_loss = hinge_d_loss(logits[: len(x)], logits[len(x):])
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
                logs["d"] = d_loss.item()
            step += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v:.3f}" if k != "w" else f"{v:.2g}" for k, v in logs.items()})
        means = {k: round(all_mean(v / max(1, len(bar)), d, device), 5) for k, v in sums.items()}
        if d.main:
            save_states(state_path, modules, optimizers, {"epoch": epoch + 1, "loss": args.loss})
            _save_recon_png(model, fixed, run_dir / f"recon_epoch{epoch + 1:03d}.png")
            info = {"epochs": epoch + 1, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                    "train_crop": list(data.image_size),
                    "world_size": d.world, "train_images": len(train_x), "device": str(device)}
            if args.init:
                info["init"] = {"from": args.init, "training": init_training,
                                "trained": "decoder only" if args.train_decoder_only else "all"}
            if vqgan:
                info.update(loss="vqgan", perceptual_weight=args.perceptual_weight,
                            perceptual_net=feature_path, disc_start=args.disc_start,
                            disc_weight=args.disc_weight, disc_lr=args.disc_lr or args.lr,
                            disc_width=args.disc_width, disc_layers=args.disc_layers)
            # the serving checkpoint: the tokenizer only (the discriminator stays in the state file)
            save_vqvae(out, model, {"name": out.name, "dataset": args.dataset, "classes": data.classes,
                                    "training": {"vqvae": info}})
            if args.train_decoder_only:
                carry_transformer(Path(args.init), out)
            print(json.dumps({"epoch": epoch + 1, "step": step, **means,
                              "test_psnr_1k": round(_psnr(model, monitor), 3),
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


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", default="auto")
    add_reference_args(p)
    p.add_argument("--no-write", action="store_true", help="print only; leave config.json alone")
    p.add_argument("--key", default="vqvae", help="name of the result inside evaluation")


def evaluate(args: argparse.Namespace) -> dict:
    """Held-out PSNR/usage/perplexity, then the domain FID of reconstructions of training images."""
    folder = Path(args.checkpoint)
    device = pick_device(args.device)
    bundle = load_bundle(folder, device=device)
    data = load_dataset(bundle.config["dataset"])
    result = measure(bundle.vqvae, data.test.images)
    result["split"] = "test"
    clf = load_or_train_classifier(folder, data, device=device, seed=args.seed,
                                   steps=args.classifier_steps, path=args.classifier)
    result.update(tokenizer_report(bundle.vqvae, Reference(clf, data, args.train_images, args.seed)))
    result["device"] = str(device)
    return publish(result, folder, args.key, not args.no_write)
