"""Benchmark: canvases of the landscapes model on a real server process, default settings.

One run, one machine:
1. canvas time against its cells: plain requests for 1/4, 1 and 4 megapixels (grids 64, 128
   and 256 square at 8 pixels a token), each with its sampling time (the canvas steps, from
   /metrics) beside the whole answer (sampling, one decode of the whole canvas, PNG);
2. the first streamed row of a megapixel canvas against its whole streamed answer;
3. one-image requests of another model (mnist), one client in a loop: mean latency alone,
   then while a megapixel canvas samples;
4. the canvas step's arithmetic rate at the landscapes model's shape against this machine's
   FLOP limit, measured here as a large float32 matmul on one thread (a lane's thread count);
5. the baseline, in this process on one thread: the paper's re-forwarding sliding-window
   sampler (`models.sampling.generate_sliding`) against the cached one on a small canvas.

    python bench/canvas.py [--grids 64,128,256] [--repeat 1] [--device cpu|cuda] [--out FILE]
                           [--models mnist,landscapes] [--compile true|false]

Prints JSON and writes bench/results/canvas.json (or --out). Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import Process  # noqa: E402
from serve import ROOT, free_port, metric_sum  # noqa: E402

from models.canvas import CanvasSampler, lag  # noqa: E402
from models.checkpoint import load_bundle, read_config  # noqa: E402
from models.sampling import generate_sliding, make_batch  # noqa: E402

MODEL = "landscapes"


def server(device: str, models: str, compile: str) -> Process:
    port = free_port()
    env = {"TAMING_HOST": "127.0.0.1", "TAMING_PORT": str(port), "TAMING_LOG_LEVEL": "warning",
           "TAMING_DEVICE": device, "TAMING_MODELS": models, "TAMING_COMPILE": compile}
    return Process([sys.executable, "-m", "service"], env, "/readyz", port)


def canvas_seconds(c: httpx.Client) -> float:
    return metric_sum(c.get("/metrics").text, "taming_step_duration_seconds_sum", model=MODEL,
                      size="canvas")


def plain(c: httpx.Client, side: int, seed: int) -> dict:
    """One canvas, plain PNG: the whole answer and the canvas steps' share of it."""
    before = canvas_seconds(c)
    t0 = time.perf_counter()
    r = c.post("/generate", json={"model": MODEL, "grid": [side, side], "seed": seed})
    total = time.perf_counter() - t0
    r.raise_for_status()
    return {"seconds": round(total, 2), "sampling_s": round(canvas_seconds(c) - before, 2)}


def streamed(c: httpx.Client, side: int, seed: int) -> dict:
    t0 = time.perf_counter()
    first = None
    rows = 0
    with c.stream("POST", "/generate", json={"model": MODEL, "grid": [side, side], "seed": seed},
                  headers={"Accept": "text/event-stream"}) as s:
        s.raise_for_status()
        for line in s.iter_lines():
            if line.startswith("event: row"):
                rows += 1
                if first is None:
                    first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"first_row_s": round(first, 3), "seconds": round(total, 2), "rows": rows,
            "first_row_share": round(first / total, 3)}


def one_image_latency(c: httpx.Client, until: threading.Event | None, n: int) -> list[float]:
    """mnist one-image requests, back to back: n of them, or until `until` is set."""
    out = []
    i = 0
    while (until is None and i < n) or (until is not None and not until.is_set()):
        t0 = time.perf_counter()
        c.post("/generate", json={"model": "mnist", "seed": i, "label": i % 10}).raise_for_status()
        out.append(time.perf_counter() - t0)
        i += 1
    return out


def flops_per_cell(cfg: dict) -> float:
    """Multiply-adds x2 of one canvas query: every layer's projections and MLP, its
    attention over the window, the class key and its own, and the head."""
    t = cfg["transformer"]
    d, layers, (wr, wc), K = t["d_model"], t["n_layer"], t["window"], t["codebook_size"]
    keys = wr * wc + 2
    return 2.0 * (layers * (12 * d * d + 2 * keys * d) + d * K)


def peak_flops(device: str) -> float:
    """float32 matmul rate on one thread (CPU) or the device (CUDA), best of a few."""
    torch.set_num_threads(1)
    n = 2048 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = 20 if device == "cuda" else 3
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def baseline(side: int, device: str) -> dict:
    """Seconds per cell of both samplers on one side x side canvas, in this process."""
    torch.set_num_threads(1)
    gpt = load_bundle(ROOT / "checkpoints" / MODEL, device=device).gpt.eval()
    grid = (side, side)
    batch = make_batch(gpt.config, 1, grid, generator=torch.Generator().manual_seed(0))
    out = {"grid": list(grid), "cells": side * side}
    with torch.inference_mode():
        for name, run in (("cached", lambda: CanvasSampler(gpt, batch, grid).run()),
                          ("reforwarding", lambda: generate_sliding(gpt, batch, grid))):
            t0 = time.perf_counter()
            run()
            out[f"{name}_s"] = round(time.perf_counter() - t0, 2)
    out["speedup"] = round(out["reforwarding_s"] / out["cached_s"], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grids", default="64,128,256", help="canvas sides in tokens")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "canvas.json"))
    ap.add_argument("--models", default="mnist,landscapes", help="TAMING_MODELS of the server")
    ap.add_argument("--compile", default="true", help="TAMING_COMPILE of the server")
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--baseline-side", type=int, default=24,
                    help="canvas side of the in-process sampler baseline (0: skip it)")
    args = ap.parse_args()
    sides = [int(s) for s in args.grids.split(",")]
    cfg = read_config(ROOT / "checkpoints" / MODEL)
    window = tuple(cfg["transformer"]["window"])
    out: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": platform.processor() or platform.machine(), "device": args.device,
                 "cores": len(__import__("os").sched_getaffinity(0)), "model": MODEL}
    p = server(args.device, args.models, args.compile)
    try:
        p.ready(args.ready_timeout)
        with httpx.Client(base_url=f"http://127.0.0.1:{p.port}", timeout=1800) as c:
            plain(c, 17, 0)  # warm the connection and the canvas path up (a canvas: 17 > 16)
            canvases = {}
            for side in sides:
                runs = [plain(c, side, seed) for seed in range(1, args.repeat + 1)]
                cells = side * side
                best = min(runs, key=lambda r: r["seconds"])
                canvases[side] = {"pixels": f"{side * 8}x{side * 8}", "cells": cells,
                                  "steps": side + lag(window) * (side - 1), "runs": runs,
                                  "seconds": best["seconds"], "sampling_s": best["sampling_s"],
                                  "cells_per_s": round(cells / best["sampling_s"], 1)}
            out["canvases"] = canvases
            keys = sorted(canvases)
            out["time_ratio_4x_cells"] = {
                f"{b}/{a}": round(canvases[b]["seconds"] / canvases[a]["seconds"], 2)
                for a, b in zip(keys, keys[1:], strict=False) if b * b == 4 * a * a}
            mid = 128 if 128 in sides else sides[-1]
            out["streamed"] = streamed(c, mid, 7)
            one_image_latency(c, None, 5)  # warm mnist up
            solo = one_image_latency(c, None, 30)
            done = threading.Event()
            side_run: dict = {}

            def canvas_thread() -> None:
                with httpx.Client(base_url=f"http://127.0.0.1:{p.port}", timeout=1800) as c2:
                    side_run.update(plain(c2, mid, 11))
                done.set()

            t = threading.Thread(target=canvas_thread)
            t.start()
            while canvas_seconds(c) == 0 and not done.is_set():
                time.sleep(0.01)
            time.sleep(0.2)  # the canvas is sampling
            during = one_image_latency(c, done, 0)
            t.join()
            out["other_model_latency"] = {
                "solo_mean_ms": round(1000 * statistics.mean(solo), 1),
                "during_canvas_mean_ms": round(1000 * statistics.mean(during), 1),
                "ratio": round(statistics.mean(during) / statistics.mean(solo), 2),
                "requests_during": len(during), "canvas_beside": side_run}
            per_cell = flops_per_cell(cfg)
            rate = canvases[mid]["cells_per_s"] * per_cell
            peak = peak_flops(args.device)
            out["flops"] = {"per_cell": per_cell, "achieved_gflops": round(rate / 1e9, 2),
                            "peak_gflops_one_thread": round(peak / 1e9, 1),
                            "share": round(rate / peak, 3)}
    finally:
        p.stop()
    if args.baseline_side:
        out["baseline"] = baseline(args.baseline_side, args.device)
    print(json.dumps(out, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
