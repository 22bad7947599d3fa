"""Random-weight stand-ins at the paper's published shapes, in process: how fast this machine
runs them and what share of its own float32 matmul rate they reach.

  tokenizer    the ImageNet f16 VQGAN (ch 128, ch_mult 1,1,2,2,4, two residual blocks,
               attention at 16, 16384 codes of 256): decode a 16x16 grid to 256x256 pixels,
               and encode, at batches of 1 and 4
  transformer  a 24-layer, 16-head, 1024-wide minGPT over 256 tokens (faceshq_transformer.yaml,
               1024 codes; --transformer cin: the 48-layer, 1536-wide, 1.4B ImageNet model,
               for a GPU): a whole image through the engine's sampler (models.slots.generate,
               the KV-cached step the server runs) at 1, 4 and 16 rows

The matmul rate is the best of a few (N, N) @ (N, N) float32 products, measured again right
before each timing (on a shared machine the rate moves with the load). FLOPs: the decoder's
from torch's FLOP counter; the transformer's from its shape (per token and layer 24 d^2 for
the projections and MLP, 4 T d for attention over the static cache of T, plus 2 d K for the
head). Writes JSON to --out (default bench/results/paper_shapes.json) and prints a table.

    python bench/paper_shapes.py [--threads 2] [--rows 1,4,16] [--smoke]
    python bench/paper_shapes.py --device cuda --transformer cin --rows 1,16,64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.gpt import GPT, GPTConfig  # noqa: E402
from models.sampling import make_batch  # noqa: E402
from models.slots import generate  # noqa: E402
from models.taming_vqgan import TamingVQGAN, TamingVQGANConfig  # noqa: E402

IMAGENET_F16 = dict(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                    attn_resolutions=(16,), z_channels=256, embed_dim=256, n_embed=16384)
FACESHQ = dict(n_layer=24, n_head=16, d_model=1024, codebook_size=1024)
CIN = dict(n_layer=48, n_head=24, d_model=1536, codebook_size=16384)  # the 1.4B ImageNet one
SMOKE_VQ = dict(resolution=64, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                attn_resolutions=(16,), z_channels=32, embed_dim=32, n_embed=512)
SMOKE_GPT = dict(n_layer=2, n_head=4, d_model=128, codebook_size=512)


DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def best_of(fn, repeats: int, warm: bool = True) -> float:
    if warm:
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_rate(n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) float32 product."""
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    return 2 * n**3 / best_of(lambda: torch.mm(a, b), repeats)


def report(r: dict) -> dict:
    print(f"{r['part']:18} batch {r['batch']:3}: {r['images_per_s']:8.3f} images/s, "
          f"{r['gflop_per_image']:7.1f} GFLOP/image, {100 * r['share_of_matmul_rate']:5.1f}% "
          f"of the matmul rate ({r['matmul_gflops']:.0f} GFLOP/s beside it)", flush=True)
    return r


def flops_of(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@torch.inference_mode()
def tokenizer(shape: dict, batches: list[int], repeats: int, rate) -> list[dict]:
    vq = TamingVQGAN(TamingVQGANConfig(**shape)).eval().to(DEVICE)
    with torch.no_grad():
        vq.quantizer.codebook.normal_()
    h, w = vq.config.grid
    side = vq.config.resolution
    params = sum(p.numel() for p in vq.parameters())
    rows, per_image = [], {}
    for b in batches:
        ids = torch.randint(0, vq.config.n_embed, (b, h, w), device=DEVICE)
        pixels = torch.randint(0, 256, (b, side, side, 3), dtype=torch.uint8, device=DEVICE)
        for op, fn in (("decode", lambda ids=ids: vq.decode_pixels(ids)),
                       ("encode", lambda px=pixels: vq.encode_pixels(px))):
            if op not in per_image:  # counted once, on the first batch (it is linear in it)
                per_image[op] = flops_of(fn) / b
            flops = per_image[op] * b
            r = rate()
            s = best_of(fn, repeats)
            rows.append(report({"part": f"tokenizer {op}", "batch": b, "params": params,
                                "seconds": s, "images_per_s": b / s,
                                "gflop_per_image": per_image[op] / 1e9, "matmul_gflops": r / 1e9,
                                "share_of_matmul_rate": flops / s / r}))
    return rows


@torch.inference_mode()
def transformer(shape: dict, grid: tuple[int, int], batches: list[int], rate) -> list[dict]:
    rows_, cols = grid
    cfg = GPTConfig(grid=grid, window=(rows_, 2 * cols - 1), n_classes=0, dropout=0.0,
                    positions="sequence", vocabulary="shared", **shape)
    gpt = GPT(cfg).eval().to(DEVICE)
    T, d, L, K = cfg.seq_len, cfg.d_model, cfg.n_layer, cfg.codebook_size
    per_token = L * (24 * d * d + 4 * T * d) + 2 * d * K
    params = sum(p.numel() for p in gpt.parameters())
    out = []
    for b in batches:
        batch = make_batch(cfg, b, grid, top_k=min(250, K), generator=torch.Generator().manual_seed(0))
        r = rate()
        sync()
        t0 = time.perf_counter()
        generate(gpt, batch)
        sync()
        s = time.perf_counter() - t0
        flops = per_token * T * b
        out.append(report({"part": "transformer image", "batch": b, "params": params,
                           "seconds": s, "images_per_s": b / s, "step_ms": s / T * 1e3,
                           "gflop_per_image": per_token * T / 1e9, "matmul_gflops": r / 1e9,
                           "share_of_matmul_rate": flops / s / r}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,4,16", help="transformer rows (images at once)")
    p.add_argument("--batches", default="1,4", help="tokenizer batches")
    p.add_argument("--repeats", type=int, default=1, help="timed runs after a first one")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script")
    p.add_argument("--device", default="cpu")
    p.add_argument("--transformer", choices=["faceshq", "cin"], default="faceshq")
    p.add_argument("--out", default="bench/results/paper_shapes.json")
    args = p.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = 1024 if args.smoke else (8192 if DEVICE.type == "cuda" else 2048)

    def rate() -> float:
        return matmul_rate(n)

    print(f"float32 matmul rate: {rate() / 1e9:.1f} GFLOP/s on {DEVICE} ({args.threads} threads)",
          flush=True)
    big = {"faceshq": FACESHQ, "cin": CIN}[args.transformer]
    vq_shape, gpt_shape = (SMOKE_VQ, SMOKE_GPT) if args.smoke else (IMAGENET_F16, big)
    grid = (4, 4) if args.smoke else (16, 16)
    results = tokenizer(vq_shape, [int(b) for b in args.batches.split(",")], args.repeats, rate)
    results += transformer(gpt_shape, grid, [int(b) for b in args.rows.split(",")], rate)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads,
                               "device": str(DEVICE), "transformer": args.transformer,
                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
