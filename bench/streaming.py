"""Benchmark: a streamed one-image /generate against the same request answered plainly.

One server process (default settings, every shipped model), one client, one machine. For
each model, `--repeat` pairs of the same seeded one-image request, plain (PNG) then streamed
(server-sent `row` events and `done`), alternating so that drift hits both alike: the median
time of each, their ratio, and the streamed request's time to its first row.

    python bench/streaming.py [--models mnist,fashion-mnist,landscapes] [--repeat 15] [--out FILE]

Prints JSON and writes bench/results/streaming.json (or --out). Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import Process  # noqa: E402
from serve import ROOT, free_port  # noqa: E402


def server(models: str) -> Process:
    port = free_port()
    env = {"TAMING_HOST": "127.0.0.1", "TAMING_PORT": str(port), "TAMING_LOG_LEVEL": "warning",
           "TAMING_MODELS": models}
    return Process([sys.executable, "-m", "service"], env, "/readyz", port)


def plain(c: httpx.Client, model: str, seed: int) -> float:
    t0 = time.perf_counter()
    r = c.post("/generate", json={"model": model, "seed": seed})
    r.raise_for_status()
    return time.perf_counter() - t0


def streamed(c: httpx.Client, model: str, seed: int) -> tuple[float, float]:
    """(whole answer, first row) in seconds."""
    t0 = time.perf_counter()
    first = None
    with c.stream("POST", "/generate", json={"model": model, "seed": seed},
                  headers={"Accept": "text/event-stream"}) as s:
        s.raise_for_status()
        for line in s.iter_lines():
            if first is None and line.startswith("event: row"):
                first = time.perf_counter() - t0
    return time.perf_counter() - t0, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="mnist,fashion-mnist,landscapes")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "streaming.json")
    args = ap.parse_args()
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "repeat": args.repeat, "models": {}}
    proc = server(args.models)
    try:
        proc.ready()
        c = httpx.Client(base_url=f"http://127.0.0.1:{proc.port}", timeout=300)
        for model in args.models.split(","):
            plain(c, model, 0)  # first calls pay nothing the others do not
            streamed(c, model, 0)
            p, s, first = [], [], []
            for i in range(args.repeat):
                p.append(plain(c, model, i))
                total, row = streamed(c, model, i)
                s.append(total)
                first.append(row)
            line = {"plain_s": statistics.median(p), "streamed_s": statistics.median(s),
                    "first_row_s": statistics.median(first)}
            line["streamed_over_plain"] = line["streamed_s"] / line["plain_s"]
            result["models"][model] = line
            print(model, json.dumps(line), flush=True)
    finally:
        proc.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
