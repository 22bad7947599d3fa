"""A/B: this checkout's server against another checkout's (an older commit), same machine,
same load, levels interleaved so that drift hits both alike.

    git worktree add /tmp/base <commit>
    python bench/ab.py --base /tmp/base --op encode --clients 1,64 [--rounds 3] [--duration 6]
    python bench/ab.py --base /tmp/base --op generate --clients 1 --rates 60,120,160
    python bench/ab.py --base /tmp/base --op canvas [--rounds 3] [--canvas 128]

Each side runs `python -m service` from its own checkout with default settings and the
shipped mnist model; /generate, /encode and /decode requests as in bench/serve.py (one image
each), each side measured alone (the other one stopped). Prints throughput and p50 per side
and level, and the ratio. `--op canvas`: one landscapes canvas of `--canvas` tokens a side
(128: 1024x1024 pixels) a round on each side, seeded alike: the time of each answer, and
whether both sides drew the same PNG. `--rates`: then Poisson arrivals of one-image /generate
requests at each rate (bench/generate.py's open loop, 3x the duration), mean and p99 latency
per side.
Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import Process, open_loop  # noqa: E402
from serve import ROOT, free_port, load_level, metric_sum, request_makers  # noqa: E402

from models.checkpoint import load_bundle  # noqa: E402


def server(root: Path, models: str = "mnist") -> Process:
    port = free_port()
    env = {"TAMING_HOST": "127.0.0.1", "TAMING_PORT": str(port), "TAMING_LOG_LEVEL": "warning",
           "TAMING_MODELS": models, "TAMING_CHECKPOINT_DIR": str(ROOT / "checkpoints"),
           "PYTHONPATH": str(root)}
    return Process([sys.executable, "-m", "service"], env, "/readyz", port, cwd=root)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, type=Path, help="the other checkout")
    ap.add_argument("--op", default="encode", choices=["generate", "encode", "decode", "canvas"])
    ap.add_argument("--canvas", type=int, default=128, help="--op canvas: tokens a side")
    ap.add_argument("--clients", default="1,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--rates", default="", help="open-loop requests/s for /generate, e.g. 60,120")
    args = ap.parse_args()
    if args.rates and args.op != "generate":
        ap.error("--rates needs --op generate")
    if args.op == "canvas":
        return await canvas_ab(args)
    make = request_makers("mnist", load_bundle(ROOT / "checkpoints" / "mnist"))[args.op]
    sides = {"base": server(args.base.resolve()), "this": server(ROOT)}
    for p in sides.values():
        p.ready()
    out: dict = {"op": args.op, "base": str(args.base), "levels": {}}
    try:
        for c in [int(x) for x in args.clients.split(",")]:
            runs: dict[str, list] = {"base": [], "this": []}
            for _ in range(args.rounds):
                for name, p in sides.items():
                    with alone(sides, name):
                        runs[name].append(await load_level("127.0.0.1", p.port, make, c, 1.0,
                                                           args.duration))
            mean = {k: round(sum(r["throughput"] for r in v) / len(v), 1) for k, v in runs.items()}
            out["levels"][c] = {"runs": runs, "mean": mean,
                                "this_over_base": round(mean["this"] / mean["base"], 3)}
            print(f"{args.op} {c:3d} clients: base {mean['base']} img/s, this {mean['this']} "
                  f"img/s, ratio {out['levels'][c]['this_over_base']} "
                  f"(p50 {[r['p50_ms'] for r in runs['base']]} vs "
                  f"{[r['p50_ms'] for r in runs['this']]} ms)", flush=True)
        for rate in [float(x) for x in args.rates.split(",") if x]:
            out.setdefault("open_loop", {})[rate] = await open_loop_ab(sides, rate, args)
    finally:
        for p in sides.values():
            p.stop()
    save(f"ab_{args.op}.json", out)


def save(name: str, out: dict) -> None:
    dest = ROOT / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / name).write_text(json.dumps(out, indent=1))


async def canvas_ab(args) -> None:
    """One canvas a round on each side, alone, the order alternating; same seed, same PNG."""
    sides = {"base": server(args.base.resolve(), "landscapes"), "this": server(ROOT, "landscapes")}
    for p in sides.values():
        p.ready()
    body = {"model": "landscapes", "grid": [args.canvas, args.canvas]}
    runs: dict[str, list[float]] = {name: [] for name in sides}
    same: list[bool] = []
    try:
        async with httpx.AsyncClient(timeout=600) as client:
            for i in range(args.rounds):
                pngs = {}
                for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
                    with alone(sides, name):
                        t0 = time.perf_counter()
                        r = await client.post(f"http://127.0.0.1:{sides[name].port}/generate",
                                              json={**body, "seed": i})
                        runs[name].append(round(time.perf_counter() - t0, 3))
                        r.raise_for_status()
                        pngs[name] = r.content
                same.append(pngs["base"] == pngs["this"])
                print(f"canvas {args.canvas}x{args.canvas} round {i}: base {runs['base'][-1]} s, "
                      f"this {runs['this'][-1]} s, same PNG {same[-1]}", flush=True)
    finally:
        for p in sides.values():
            p.stop()
    median = {k: statistics.median(v) for k, v in runs.items()}
    out = {"op": "canvas", "base": str(args.base), "grid": body["grid"], "runs": runs,
           "median_s": median, "this_over_base": round(median["base"] / median["this"], 3),
           "same_png": same}
    print(f"canvas: median base {median['base']} s, this {median['this']} s, speed ratio "
          f"{out['this_over_base']}, same PNG every round: {all(same)}", flush=True)
    save("ab_canvas.json", out)


def full_collections(p: Process) -> int:
    """The server's full (generation 2) garbage collections so far, from its /metrics."""
    text = httpx.get(f"http://127.0.0.1:{p.port}/metrics", timeout=10).text
    return int(metric_sum(text, "python_gc_collections_total", generation="2"))


@contextmanager
def alone(sides: dict[str, Process], name: str) -> Iterator[None]:
    """Every side but `name` stopped while `name` is measured."""
    with ExitStack() as stack:
        for other, p in sides.items():
            if other != name:
                stack.enter_context(p.paused())
        yield


async def open_loop_ab(sides: dict[str, Process], rate: float, args) -> dict:
    """Poisson arrivals at `rate` on each side, rounds interleaved (the order alternates)."""
    runs: dict[str, list] = {name: [] for name in sides}
    for i in range(args.rounds):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            with alone(sides, name):
                before = full_collections(sides[name])
                run = await open_loop(sides[name], rate, 3 * args.duration, seed=i)
                run["full_gc"] = full_collections(sides[name]) - before
                runs[name].append(run)
    mean = {k: round(statistics.mean(r["mean_ms"] for r in v), 1) for k, v in runs.items()}
    p99 = {k: round(statistics.mean(r["p99_ms"] for r in v), 1) for k, v in runs.items()}
    print(f"open loop {rate:g} req/s: mean {mean['base']} vs {mean['this']} ms "
          f"({[r['mean_ms'] for r in runs['base']]} vs {[r['mean_ms'] for r in runs['this']]}), "
          f"p99 {p99['base']} vs {p99['this']} ms; full collections "
          f"{[r['full_gc'] for r in runs['base']]} vs {[r['full_gc'] for r in runs['this']]}",
          flush=True)
    return {"runs": runs, "mean_ms": mean, "p99_ms": p99}


if __name__ == "__main__":
    asyncio.run(main())
