"""Benchmark: int8 against float32 transformer weights at the paper's shape, on CPU.

The stand-in is the transformer of taming's `faceshq_transformer.yaml` (24 layers, 16 heads,
1024 wide, a 16x16 grid of 1024 codes, full causal attention), with seeded random weights.
One run, one process, one machine:
1. the step engine's traced step (models/slots.py) at 1, 4 and 16 rows, float32 then int8
   (models/quantize.py): milliseconds a step and tokens a second, best of `--steps`;
2. the step's arithmetic rate against this machine's float32 matmul rate on the same threads;
3. int8's logits against float32's over whole sequences: the largest error relative to the
   largest logit, and how often both pick the same top code.

    python bench/quantized.py [--rows 1,4,16] [--steps 20] [--threads 1] [--out FILE]

Prints JSON and writes bench/results/quantized.json (or --out). Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.gpt import GPT, GPTConfig  # noqa: E402
from models.quantize import quantize  # noqa: E402
from models.sampling import make_batch  # noqa: E402
from models.slots import SlotSampler, compiled_steps  # noqa: E402

STAND_IN = GPTConfig(codebook_size=1024, n_classes=0, grid=(16, 16), window=(16, 31),
                     n_layer=24, n_head=16, d_model=1024, dropout=0.0, positions="absolute")


def step_flops(cfg: GPTConfig, rows: int) -> float:
    """Multiply-adds x2 of one step: every layer's projections and MLP, attention over the
    whole line of keys, and the head, for each row."""
    d, T = cfg.d_model, cfg.seq_len
    return 2.0 * rows * (cfg.n_layer * (12 * d * d + 2 * T * d) + d * cfg.codebook_size)


def matmul_rate(threads: int) -> float:
    """float32 matmul rate on `threads` threads, best of a few."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        best = max(best, 3 * 2 * 1024 ** 3 / (time.perf_counter() - t0))
    return best


def step_seconds(gpt: GPT, rows: int, steps: int) -> float:
    """Best time of one traced step at `rows` rows (plain sampling with top-k, the paper's)."""
    sampler = SlotSampler(gpt, rows)
    batch = make_batch(gpt.config, rows, gpt.config.grid, top_k=100,
                       generator=torch.Generator().manual_seed(0))
    sampler.admit(list(range(rows)), [None] * rows, batch, gpt.config.null_class)
    run = compiled_steps(sampler)
    run(rows)  # builds the graph
    run(rows)
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        run(rows)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def logits_error(fp32: GPT, int8: GPT) -> dict:
    ids = torch.randint(0, STAND_IN.codebook_size, (4, STAND_IN.seq_len),
                        generator=torch.Generator().manual_seed(1))
    want, got = fp32(ids)[0], int8(ids)[0]
    return {"max_error_over_max_logit": float((got - want).abs().max() / want.abs().max()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantized.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = GPT(STAND_IN).eval()
    int8 = quantize(fp32, "int8")
    rate = matmul_rate(args.threads)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "torch": torch.__version__, "threads": args.threads,
              "parameters": sum(p.numel() for p in fp32.parameters()),
              "matmul_gflops": rate / 1e9, "logits": logits_error(fp32, int8), "steps": []}
    for rows in (int(r) for r in args.rows.split(",")):
        line = {"rows": rows}
        for name, gpt in (("float32", fp32), ("int8", int8)):
            s = step_seconds(gpt, rows, args.steps)
            line[name] = {"step_ms": s * 1e3, "tokens_per_s": rows / s,
                          "share_of_matmul_rate": step_flops(STAND_IN, rows) / s / rate}
        line["int8_speedup"] = line["float32"]["step_ms"] / line["int8"]["step_ms"]
        result["steps"].append(line)
        print(json.dumps(line), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
