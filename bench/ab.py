"""A/B: this checkout's server against another checkout's (an older commit), same machine,
same load, levels interleaved so that drift hits both alike.

    git worktree add /tmp/base <commit>
    python bench/ab.py --base /tmp/base --op encode --clients 1,64 [--rounds 3] [--duration 6]

Each side runs `python -m service` from its own checkout with default settings and the
shipped mnist model; /generate, /encode and /decode requests as in bench/serve.py (one image
each). Prints throughput and p50 per side and level, and the ratio. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import Process  # noqa: E402
from serve import ROOT, free_port, load_level, request_makers  # noqa: E402

from models.checkpoint import load_bundle  # noqa: E402


def server(root: Path) -> Process:
    port = free_port()
    env = {"TAMING_HOST": "127.0.0.1", "TAMING_PORT": str(port), "TAMING_LOG_LEVEL": "warning",
           "TAMING_MODELS": "mnist", "TAMING_CHECKPOINT_DIR": str(ROOT / "checkpoints"),
           "PYTHONPATH": str(root)}
    return Process([sys.executable, "-m", "service"], env, "/readyz", port, cwd=root)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, type=Path, help="the other checkout")
    ap.add_argument("--op", default="encode", choices=["generate", "encode", "decode"])
    ap.add_argument("--clients", default="1,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=6.0)
    args = ap.parse_args()
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
                    runs[name].append(await load_level("127.0.0.1", p.port, make, c, 1.0,
                                                       args.duration))
            mean = {k: round(sum(r["throughput"] for r in v) / len(v), 1) for k, v in runs.items()}
            out["levels"][c] = {"runs": runs, "mean": mean,
                                "this_over_base": round(mean["this"] / mean["base"], 3)}
            print(f"{args.op} {c:3d} clients: base {mean['base']} img/s, this {mean['this']} "
                  f"img/s, ratio {out['levels'][c]['this_over_base']} "
                  f"(p50 {[r['p50_ms'] for r in runs['base']]} vs "
                  f"{[r['p50_ms'] for r in runs['this']]} ms)", flush=True)
    finally:
        for p in sides.values():
            p.stop()
    dest = ROOT / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"ab_{args.op}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
