"""Overload and shutdown under load: the server sheds what it cannot do and loses nothing it took.

Against `python -m service` with the shipped checkpoints and default settings:
1. capacity: /generate (n=1) images/s with 64 closed-loop clients, and the 1-client p50;
2. overload: open-loop arrivals (Poisson) at --factor x capacity for --seconds, each on its own
   connection: every answer must be 200 or 503 with Retry-After; no timeouts, no resets, no
   other status; the server's resident memory and queue depth are sampled meanwhile;
3. recovery: the 1-client p50 again, against the one from step 1;
4. SIGTERM under load: a second server (TAMING_SHUTDOWN_GRACE_S=2) takes open-loop load at
   capacity, gets SIGTERM half-way: every request it accepted must be answered 200, the rest
   503 (draining) or refused at connect (the port closed, so never accepted); exit code 0.

    python bench/overload.py [--factor 4] [--seconds 15]

Prints a summary and writes bench/results/overload.json. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

from serve import ROOT, Connection, Server, load_level, metric_sum


def generate_request(rng: random.Random):
    body = {"model": "mnist", "label": rng.randrange(10), "seed": rng.randrange(2**31)}
    return "POST", "/generate", json.dumps(body).encode(), "application/json"


async def one_shot(port: int, rng: random.Random, timeout_s: float) -> tuple[str, float]:
    """One request on a fresh connection -> (outcome, seconds)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    conn = Connection("127.0.0.1", port)
    try:  # connecting apart: a refused connection was never accepted, so never lost
        await asyncio.wait_for(conn.connect(), 5)
    except (OSError, asyncio.TimeoutError):
        return "refused", loop.time() - t0
    try:
        status, _ = await asyncio.wait_for(conn.request(*generate_request(rng)), timeout_s)
        return str(status), loop.time() - t0
    except asyncio.TimeoutError:
        return "timeout", loop.time() - t0
    except (ConnectionError, asyncio.IncompleteReadError, OSError):
        return "reset", loop.time() - t0
    finally:
        conn.close()


async def open_loop(port: int, rate: float, seconds: float, timeout_s: float,
                    on_tick=None) -> dict:
    """Poisson arrivals at `rate`/s for `seconds`; waits for every answer."""
    loop = asyncio.get_running_loop()
    rng = random.Random(1)
    tasks = []
    t0 = loop.time()
    next_at = t0
    while next_at - t0 < seconds:
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        tasks.append(asyncio.create_task(one_shot(port, random.Random(rng.random()), timeout_s)))
        if on_tick is not None:
            on_tick(loop.time() - t0)
        next_at += rng.expovariate(rate)
    results = await asyncio.gather(*tasks)
    outcomes: dict[str, int] = {}
    for outcome, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    lat = sorted(s for o, s in results if o == "200")
    return {"sent": len(results), "outcomes": outcomes,
            "ok_p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
            "ok_max_ms": round(1000 * lat[-1], 1) if lat else None}


async def probe_503(port: int, tries: int = 20) -> dict:
    """`tries` requests 25 ms apart while the queue is full (it dips below its cap whenever a
    batch is taken, so some are admitted): the status of a refused one, and whether
    Retry-After came with it."""
    body = json.dumps({"model": "mnist", "seed": 1}).encode()

    async def one() -> tuple[int, bool]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                     + body)
        raw = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        return int(head.split()[1]), "\r\nretry-after:" in head

    tasks = []
    for _ in range(tries):
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(0.025)
    answers = await asyncio.gather(*tasks)
    refused = [a for a in answers if a[0] == 503]
    status, retry_after = refused[0] if refused else answers[0]
    return {"status": status, "retry_after": retry_after, "refused": len(refused),
            "tries": tries}


async def sample_server(server: Server, stop: asyncio.Event, out: dict) -> None:
    while not stop.is_set():
        out["rss_mb"].append(server.rss_mb()["rss_mb"])
        try:
            text = await server.metrics()
            out["queue_depth"].append(metric_sum(text, "taming_queue_depth"))
        except OSError:
            pass
        await asyncio.sleep(0.5)


async def amain(args) -> dict:
    res: dict = {}
    server = Server({})
    try:
        await server.wait_ready()
        cap = await load_level("127.0.0.1", server.port, generate_request, 64, 2, args.capacity_s)
        one = await load_level("127.0.0.1", server.port, generate_request, 1, 1, 4)
        capacity = cap["throughput"]
        res["capacity"] = {"images_per_s": capacity, "one_client_p50_ms": one["p50_ms"],
                           "memory_before": server.rss_mb()}
        print(f"capacity {capacity}/s, 1-client p50 {one['p50_ms']} ms", flush=True)
        rate = args.factor * capacity
        samples: dict = {"rss_mb": [], "queue_depth": []}
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_server(server, stop, samples))
        checked: dict = {}

        def tick(t: float) -> None:  # half-way, probe Retry-After once
            if t > args.seconds / 2 and "task" not in checked:
                checked["task"] = asyncio.create_task(probe_503(server.port))

        over = await open_loop(server.port, rate, args.seconds, args.timeout, tick)
        stop.set()
        await sampler
        over.update(rate=round(rate, 1), factor=args.factor,
                    probe=await checked["task"] if "task" in checked else None,
                    max_rss_mb=max(samples["rss_mb"]), max_queue_depth=max(samples["queue_depth"]),
                    memory_after=server.rss_mb())
        res["overload"] = over
        print(f"overload at {rate:.0f}/s: {over}", flush=True)
        await asyncio.sleep(2)
        after = await load_level("127.0.0.1", server.port, generate_request, 1, 1, 4)
        res["recovery"] = {"one_client_p50_ms": after["p50_ms"],
                           "before_ms": one["p50_ms"]}
        print(f"after: 1-client p50 {after['p50_ms']} ms (before {one['p50_ms']} ms)", flush=True)
    finally:
        server.stop()

    # SIGTERM under load
    server = Server({"TAMING_SHUTDOWN_GRACE_S": "2"})
    await server.wait_ready()
    loop = asyncio.get_running_loop()
    sent: dict = {}

    def term(t: float) -> None:
        if t > args.seconds / 2 and "at" not in sent:
            sent["at"] = round(t, 2)
            server.proc.send_signal(signal.SIGTERM)

    load = await open_loop(server.port, capacity, args.seconds, args.timeout, term)
    t0 = loop.time()
    code = await loop.run_in_executor(None, server.proc.wait, 120)
    res["sigterm"] = {**load, "signal_at_s": sent.get("at"), "exit_code": code,
                      "exit_after_s": round(loop.time() - t0, 2),
                      "lost": sum(v for k, v in load["outcomes"].items()
                                  if k not in ("200", "503", "refused"))}
    print(f"sigterm under load: {res['sigterm']}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--capacity-s", type=float, default=6.0)
    ap.add_argument("--timeout", type=float, default=90.0, help="client timeout per request")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "overload.json"))
    args = ap.parse_args()
    res = asyncio.run(amain(args))
    o = res["overload"]
    res["verdict"] = {
        "overload_only_200_or_503": set(o["outcomes"]) <= {"200", "503"},
        "overload_probe_503_with_retry_after": bool(o["probe"] and o["probe"]["status"] == 503
                                                    and o["probe"]["retry_after"]),
        "sigterm_lost": res["sigterm"]["lost"], "sigterm_exit_code": res["sigterm"]["exit_code"],
    }
    res["meta"] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "machine": f"{platform.machine()} {os.cpu_count()} cpus", "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["verdict"]))
    sys.exit(0 if res["verdict"]["overload_only_200_or_503"] and not res["sigterm"]["lost"] else 1)


if __name__ == "__main__":
    main()
