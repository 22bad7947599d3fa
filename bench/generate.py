"""Benchmark: /generate on the step-level engine, against its own eager step and a LitServe peer.

One run, one machine, every figure beside its baseline:
1. start-up: seconds from launch to /readyz 200 with compilation on, and the resident memory
   with both models and every compiled size;
2. one client: latency of a plain answer, and time to the first streamed row against the
   full streamed answer;
3. capacity: images/s at 64 closed-loop clients, compiled and with TAMING_COMPILE=false,
   interleaved;
4. open loop: Poisson arrivals of one-image requests at 60% of the capacity; mean and p99
   latency against the one-client latency (processor sharing gives 1 / (1 - 0.6) = 2.5x), in
   rounds, each with a capacity and a one-client latency measured just before it;
5. the peer: the same models behind a minimal LitServe server (bench/peer_litserve.py), both
   at 1, 16 and 64 clients, interleaved.

    python bench/generate.py [--duration 8] [--rounds 2] [--open-rounds 3] [--skip-peer]

Prints a table and writes bench/results/generate.json. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import ROOT, Connection, free_port, load_level  # noqa: E402

MODEL = "mnist"


class Process:
    """A server process on a free port; `ready()` waits for its readiness path."""

    def __init__(self, argv: list[str], env: dict[str, str], ready_path: str, port: int,
                 cwd: Path = ROOT) -> None:
        self.port, self.ready_path = port, ready_path
        self.t0 = time.monotonic()
        # logs to a file: a pipe nobody reads fills up and then blocks the server
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env},
                                     stdout=subprocess.DEVNULL, stderr=self.log,
                                     start_new_session=True)  # its workers stop with it
        self.startup_s = math.nan

    def ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(self.log.read().decode()[-3000:])
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.ready_path}",
                             timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - self.t0
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"not ready within {timeout_s} s")

    def rss_mb(self) -> float:
        """Resident memory of the process and its children (LitServe runs its model in one)."""
        total = 0
        pids = [self.proc.pid]
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            pids += [int(k) for k in kids]
        except OSError:
            pass
        for pid in pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return round(total / 1024, 1)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The server stopped (SIGSTOP, its workers too) while another one is measured: an idle
        LitServe polls its queues, about a quarter of a core on 2 cores, which the server
        measured beside it would pay."""
        os.killpg(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        time.sleep(1)
        try:  # LitServe's model workers outlive a terminated parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def ours(compile: bool) -> Process:
    port = free_port()
    env = {"TAMING_HOST": "127.0.0.1", "TAMING_PORT": str(port), "TAMING_LOG_LEVEL": "warning",
           "TAMING_COMPILE": str(compile).lower(), "TAMING_MODELS": "mnist,fashion-mnist"}
    return Process([sys.executable, "-m", "service"], env, "/readyz", port)


def peer() -> Process:
    port = free_port()
    return Process([sys.executable, "bench/peer_litserve.py", "--port", str(port)], {},
                   "/health", port)


def maker(path: str):
    def make(rng: random.Random):
        body = {"label": rng.randrange(10), "seed": rng.randrange(2**31)}
        if path == "/generate":
            body = {"model": MODEL, "n": 1, **body}
        return "POST", path, json.dumps(body).encode(), "application/json"
    return make


async def level(p: Process, path: str, clients: int, duration: float) -> dict:
    return await load_level("127.0.0.1", p.port, maker(path), clients, 1.0, duration)


async def open_loop(p: Process, rate: float, duration: float, seed: int = 0) -> dict:
    """Poisson arrivals at `rate` requests/s, each on an idle keep-alive connection (a new one
    when none is idle): arrivals never wait for answers."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    make = maker("/generate")
    idle: list[Connection] = []
    latencies: list[float] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        conn = idle.pop() if idle else Connection("127.0.0.1", p.port)
        method, path, body, ctype = make(rng)
        a = loop.time()
        status = await conn.status(method, path, body, ctype)
        if status == 0:  # the server closed an idle keep-alive connection: a new one
            conn = Connection("127.0.0.1", p.port)
            status = await conn.status(method, path, body, ctype)
        if status != 200:
            failed += 1
        if status:
            latencies.append(loop.time() - a)
            idle.append(conn)

    tasks = []
    end = loop.time() + duration
    t = loop.time()
    while t < end:
        t += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, t - loop.time()))
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    for c in idle:
        c.close()
    latencies.sort()
    return {"rate": round(rate, 1), "requests": len(tasks), "failed": failed,
            "mean_ms": round(1000 * sum(latencies) / len(latencies), 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1,
                                                 int(0.99 * len(latencies)))], 1)}


def first_row(p: Process, repeat: int) -> dict:
    """One client, streamed: time to the first `row` event and to the end of the answer."""
    firsts, fulls = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{p.port}", timeout=60) as c:
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            first = None
            with c.stream("POST", "/generate", json={"model": MODEL, "label": i % 10, "seed": i},
                          headers={"Accept": "text/event-stream"}) as s:
                for line in s.iter_lines():
                    if first is None and line.startswith("event: row"):
                        first = time.perf_counter() - t0
            if i:  # the first one warms the connection up
                firsts.append(first)
                fulls.append(time.perf_counter() - t0)
    firsts.sort()
    fulls.sort()
    f, a = firsts[len(firsts) // 2], fulls[len(fulls) // 2]
    return {"first_row_ms": round(1000 * f, 1), "full_ms": round(1000 * a, 1),
            "ratio": round(f / a, 3)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--open-rounds", type=int, default=3,
                    help="open-loop rounds, each with its own capacity and one-client baseline")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--peer-only", action="store_true", help="just the comparison with the peer")
    args = ap.parse_args()
    d = args.duration
    out: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                 "duration_s": d, "model": MODEL}

    compiled = ours(compile=True)
    compiled.ready()
    out["startup"] = {"compiled_s": round(compiled.startup_s, 1),
                      "rss_mb_after_warmup": compiled.rss_mb()}
    print("start-up", out["startup"], flush=True)
    if not args.peer_only:
        await engine_figures(compiled, out, d, args.rounds, args.open_rounds)
    if not args.skip_peer:
        out["peer"] = await peer_figures(compiled, d, args.rounds)
    compiled.stop()

    print(json.dumps({k: v for k, v in out.items() if k not in ("peer",)}, indent=1))
    dest = ROOT / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / ("generate_peer.json" if args.peer_only else "generate.json")).write_text(
        json.dumps(out, indent=1))


async def engine_figures(compiled: Process, out: dict, d: float, rounds: int,
                         open_rounds: int) -> None:
    """One client, first row, 64 clients compiled vs eager, open loop at 60%."""
    eager = ours(compile=False)
    eager.ready()
    out["startup"]["eager_s"] = round(eager.startup_s, 1)

    with eager.paused():  # measured alone, as every figure below
        one = await level(compiled, "/generate", 1, d)
        out["one_client"] = one
        out["first_row"] = first_row(compiled, 20)
    print("one client", one, out["first_row"], flush=True)

    runs = {"compiled": [], "eager": []}
    for _ in range(rounds):
        for name, p, other in (("compiled", compiled, eager), ("eager", eager, compiled)):
            with other.paused():
                runs[name].append(await level(p, "/generate", 64, d))
            print(name, runs[name][-1], flush=True)
    cap = {k: round(sum(r["throughput"] for r in v) / len(v), 1) for k, v in runs.items()}
    out["capacity_64"] = {"runs": runs, "mean": cap,
                          "compiled_over_eager": round(cap["compiled"] / cap["eager"], 2)}
    eager.stop()

    out["open_loop_60"] = await open_loop_rounds(compiled, d, open_rounds)
    out["rss_mb_after_load"] = compiled.rss_mb()


async def open_loop_rounds(p: Process, d: float, rounds: int) -> dict:
    """The open-loop ratio, `rounds` times: each round measures its own capacity and one-client
    latency right before its arrivals. A shared machine's speed drifts from minute to minute,
    and near saturation a rate fixed from an earlier minute's capacity stands for another
    utilisation, so one round alone says little; every round is reported, and the median."""
    results = []
    for i in range(rounds):
        cap = (await level(p, "/generate", 64, d))["throughput"]
        base = (await level(p, "/generate", 1, d))["p50_ms"]
        ol = await open_loop(p, 0.6 * cap, 3 * d, seed=i)
        ol.update(capacity=cap, one_client_p50_ms=base,
                  mean_over_one_client=round(ol["mean_ms"] / base, 2),
                  p99_over_one_client=round(ol["p99_ms"] / base, 2))
        results.append(ol)
        print("open loop", ol, flush=True)
    return {"rounds": results,
            "median_mean_over_one_client": statistics.median(
                r["mean_over_one_client"] for r in results),
            "median_p99_over_one_client": statistics.median(
                r["p99_over_one_client"] for r in results)}


async def peer_figures(compiled: Process, d: float, rounds: int) -> dict:
    """Both servers at 1, 16 and 64 clients, interleaved, each alone on the machine."""
    lit = peer()
    lit.ready()
    table: dict = {}
    try:
        for c in (1, 16, 64):
            table[c] = {"ours": [], "peer": []}
            for _ in range(rounds):
                with lit.paused():
                    table[c]["ours"].append(await level(compiled, "/generate", c, d))
                with compiled.paused():
                    table[c]["peer"].append(await level(lit, "/predict", c, d))
            o = sum(r["throughput"] for r in table[c]["ours"]) / rounds
            q = sum(r["throughput"] for r in table[c]["peer"]) / rounds
            table[c]["ratio"] = round(o / q, 2) if q else None
            print("peer", c, "ours", round(o, 1), "peer", round(q, 1), "ratio", table[c]["ratio"],
                  flush=True)
    finally:
        lit.stop()
    return table


if __name__ == "__main__":
    socket.setdefaulttimeout(120)
    asyncio.run(main())
