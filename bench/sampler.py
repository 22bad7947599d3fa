"""Benchmark: fast batched sampler vs the reference sampler, on the same weights, same run.

Prints a table and writes JSON (bench/results/sampler.json). Not a test.
    python bench/sampler.py [--checkpoint checkpoints/mnist] [--device cpu|cuda] [--compile]

--compile: torch.compile of the decode step (models.sampling.compile_sampler; on CUDA with
CUDA graphs). Compile time is not in the timings: each batch size runs once untimed first.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.checkpoint import load_bundle  # noqa: E402
from models.sampling import (  # noqa: E402
    SamplingBatch,
    compile_sampler,
    generate,
    make_batch,
    reference_generate,
)


def batch_of(cfg, n: int, seed: int) -> SamplingBatch:
    g = torch.Generator().manual_seed(seed)
    return SamplingBatch.cat([make_batch(cfg, 1, cfg.grid, label=i % cfg.n_classes, generator=g)
                              for i in range(n)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int) -> float:
    """Median seconds of `repeat` runs after one warm-up run."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/mnist")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default="1,8,64,256")
    ap.add_argument("--reference-sizes", default="8,64", help="the reference is slow: fewer sizes")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    ap.add_argument("--out", default="bench/results/sampler.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    bundle = load_bundle(args.checkpoint, device=device, require_gpt=True)
    gpt = bundle.gpt
    if args.compile:
        compile_sampler(gpt, mode="reduce-overhead" if device.type == "cuda" else None,
                        dynamic=False)
    cfg = gpt.config
    rows = []
    for n in [int(x) for x in args.batch_sizes.split(",")]:
        b = batch_of(cfg, n, seed=n)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_fast = timed(lambda b=b: generate(gpt, b), device, repeat=5 if n <= 64 else 3)
        row = {"batch": n, "fast_images_per_s": n / t_fast, "fast_ms_per_batch": t_fast * 1e3,
               "peak_mb": peak_mb(device)}
        if str(n) in args.reference_sizes.split(","):
            t_ref = timed(lambda b=b: reference_generate(gpt, b), device, repeat=3)
            row.update(reference_images_per_s=n / t_ref, speedup=t_ref / t_fast)
            # float32 rounding differs between batch sizes: report, rather than assert, agreement
            same = (generate(gpt, b).cpu() == reference_generate(gpt, b).cpu()).all(1)
            row["rows_identical_to_reference"] = f"{int(same.sum())}/{n}"
        rows.append(row)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads"
                       + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
            "device": str(device), "checkpoint": args.checkpoint, "torch": torch.__version__,
            "compile": args.compile, "grid": list(cfg.grid), "d_model": cfg.d_model,
            "n_layer": cfg.n_layer}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(json.dumps(meta))
    print(f"{'batch':>6} {'fast img/s':>11} {'ms/batch':>9} {'ref img/s':>10} {'speedup':>8} {'peak MB':>8}")
    for r in rows:
        ref = (f"{r['reference_images_per_s']:10.1f} {r['speedup']:7.1f}x" if "speedup" in r
               else f"{'-':>10} {'-':>8}")
        print(f"{r['batch']:6d} {r['fast_images_per_s']:11.1f} {r['fast_ms_per_batch']:9.1f} {ref} "
              f"{r['peak_mb']:8.0f}")


if __name__ == "__main__":
    main()
