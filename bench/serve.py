"""Benchmark: the HTTP server under concurrent load, against batching off and the bare model.

Starts `python -m service` (twice: batched with the configured max_batch_size, then with
TAMING_MAX_BATCH_SIZE=1 as the baseline), drives /generate (n=1), /encode (one PNG) and
/decode (one grid) with closed-loop clients (each sends, waits for the answer, sends again) at
1, 8, 32, 64 and 128 concurrent connections, and reports throughput and p50/p90/p99 latency.
The in-process model at the same batch sizes (no HTTP, no queue, no PNG) is the ceiling; for
/encode and /decode the faster of the eager and the TorchScript tokenizer. Each operation's
ceiling is measured right before its batched levels, with the server idle.

The load generator speaks HTTP/1.1 keep-alive over asyncio streams itself: on a 2-core machine
it shares the CPU with the server, and a heavyweight client would measure itself.

    python bench/serve.py [--duration 8] [--clients 1,8,32,64,128] [--ops generate,encode,decode]
        [--env KEY=VALUE ...] [--no-baseline] [--no-ceiling] [--out PATH]

/generate runs on the step-level engine whatever max_batch_size says; --no-baseline skips the
second server, --no-ceiling the in-process figures (bench/gpu.sh runs one server per setting).
Prints a table and writes bench/results/serve.json, rewritten after every level so a run cut
short keeps what it measured; each level carries its measured window (Unix time), to line it
up with samples taken beside the run (GPU utilisation). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from models.checkpoint import load_bundle  # noqa: E402
from models.images import to_uint8  # noqa: E402
from models.sampling import SamplingBatch, make_batch  # noqa: E402
from models.slots import sample  # noqa: E402
from models.vqvae import FrozenTokenizer  # noqa: E402
from service.png import png_bytes  # noqa: E402


# ---- a small HTTP/1.1 keep-alive client ---------------------------------------------------------
class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
        if self.writer is None:
            await self.connect()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nAccept: */*\r\n\r\n").encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and "close" in value.lower():
                close = True
        data = await self.reader.readexactly(length)
        if close:
            self.close()
        return status, data

    async def status(self, method: str, path: str, body: bytes, ctype: str) -> int:
        """The answer's status, or 0 (and the connection closed) when the connection failed."""
        try:
            return (await self.request(method, path, body, ctype))[0]
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            self.close()
            return 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load_level(host: str, port: int, make_request, clients: int, warmup_s: float,
                     duration_s: float, images_per_request: int = 1) -> dict:
    """Closed-loop clients; only requests that start after the warm-up and end inside the
    window are timed, and throughput counts the images of completions inside the window."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    start, stop = t0 + warmup_s, t0 + warmup_s + duration_s
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    done_in_window = 0

    async def client(i: int) -> None:
        nonlocal done_in_window
        conn = Connection(host, port)
        rng = random.Random(i)
        try:
            while loop.time() < stop:
                method, path, body, ctype = make_request(rng)
                a = loop.time()
                status = await conn.status(method, path, body, ctype)
                b = loop.time()
                if start <= b <= stop:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        done_in_window += 1
                        if a >= start:
                            latencies.append(b - a)
        finally:
            conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    latencies.sort()

    def pct(p: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2) \
            if latencies else float("nan")

    return {"clients": clients, "ok": done_in_window, "statuses": statuses,
            "images_per_request": images_per_request,
            "throughput": round(done_in_window * images_per_request / duration_s, 1),
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99)}


# ---- request bodies -----------------------------------------------------------------------------
@torch.inference_mode()
def request_makers(model: str, bundle, per_request: int = 1) -> dict:
    """Request builders; /encode and /decode carry `per_request` images (multipart files,
    a list of grids), /generate always n=1."""
    cfg = bundle.vqvae.config
    rows, cols = cfg.grid
    k = cfg.codebook_size
    g = torch.Generator().manual_seed(0)
    pngs = [png_bytes(to_uint8(bundle.vqvae.decode(
        torch.randint(0, k, (1, rows, cols), generator=g)))[0]) for _ in range(16)]
    grids = [torch.randint(0, k, (rows, cols), generator=g).tolist() for _ in range(16)]

    def generate(rng: random.Random):
        body = {"model": model, "n": 1, "label": rng.randrange(10), "seed": rng.randrange(2**31)}
        return "POST", "/generate", json.dumps(body).encode(), "application/json"

    boundary = "taming-bench-boundary"

    def encode(rng: random.Random):
        if per_request == 1:
            return "POST", f"/encode?model={model}", rng.choice(pngs), "image/png"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
                 f'filename="{i}.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
                 + rng.choice(pngs) + b"\r\n" for i in range(per_request)]
        return ("POST", f"/encode?model={model}", b"".join(parts) + f"--{boundary}--\r\n".encode(),
                f"multipart/form-data; boundary={boundary}")

    def decode(rng: random.Random):
        tokens = rng.choice(grids) if per_request == 1 else [rng.choice(grids)
                                                             for _ in range(per_request)]
        body = {"model": model, "tokens": tokens}
        return "POST", "/decode", json.dumps(body).encode(), "application/json"

    return {"generate": generate, "encode": encode, "decode": decode}


# ---- the server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, env: dict[str, str]) -> None:
        self.t0 = time.monotonic()
        self.startup_s = float("nan")
        self.port = free_port()
        full = dict(os.environ, TAMING_HOST="127.0.0.1", TAMING_PORT=str(self.port),
                    TAMING_LOG_LEVEL="warning", **env)
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=full,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.proc.stderr.read().decode()[-2000:])
            try:
                status, _ = await Connection("127.0.0.1", self.port).request(
                    "GET", "/readyz", b"", "text/plain")
                if status == 200:
                    self.startup_s = round(time.monotonic() - self.t0, 1)
                    return
            except OSError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("server not ready in time")

    async def metrics(self) -> str:
        conn = Connection("127.0.0.1", self.port)
        _, body = await conn.request("GET", "/metrics", b"", "text/plain")
        conn.close()
        return body.decode()

    def rss_mb(self) -> dict[str, float]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
        return {"rss_mb": out.get("VmRSS", 0.0), "peak_rss_mb": out.get("VmHWM", 0.0)}

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (Prometheus text)."""
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def batch_stats(text: str, op: str, model: str) -> tuple[float, float]:
    """(sum, count) of the taming_batch_size histogram for one operation and model."""
    return tuple(metric_sum(text, f"taming_batch_size_{suffix}", operation=op, model=model)
                 for suffix in ("sum", "count"))


async def run_server(label: str, env: dict[str, str], makers: dict, ops: list[str],
                     clients: list[int], model: str, args, before_op=None,
                     on_level=None) -> dict:
    """One server process through every level; `on_level(run)` after each (partial results)."""
    server = Server(env)
    rows: list[dict] = []
    run = {"label": label, "env": env, "levels": rows, "startup_s": None, "memory": None}
    if on_level is not None:
        on_level(run)  # a run stopped during start-up still leaves its file
    try:
        try:
            await server.wait_ready(args.ready_timeout)
        except RuntimeError as e:
            run["error"] = str(e)[-2000:]
            if on_level is not None:
                on_level(run)
            raise
        run["startup_s"] = server.startup_s
        for op in ops:
            if before_op is not None:
                before_op(op)  # the server is idle meanwhile
            for c in clients:
                before = batch_stats(await server.metrics(), op, model)
                cpu0 = server.cpu_s()
                per = 1 if op == "generate" else args.images_per_request
                t_wall = time.time()
                r = await load_level("127.0.0.1", server.port, makers[op], c, args.warmup,
                                     args.duration, per)
                cpu = server.cpu_s() - cpu0  # warm-up included: per request over all of them
                after = batch_stats(await server.metrics(), op, model)
                n = after[1] - before[1]
                r.update(op=op, mean_batch=round((after[0] - before[0]) / n, 1) if n else None,
                         server_cpu_ms_per_image=round(1000 * cpu / max(1.0, after[0] - before[0]),
                                                       2),
                         window=[round(t_wall + args.warmup, 2),
                                 round(t_wall + args.warmup + args.duration, 2)])
                rows.append(r)
                run["memory"] = server.rss_mb()
                if on_level is not None:
                    on_level(run)
                print(f"  [{label}] {op:8s} clients={c:4d} {r['throughput']:8.1f}/s "
                      f"p50={r['p50_ms']:8.2f} p99={r['p99_ms']:8.2f} ms "
                      f"batch={r['mean_batch']} cpu/img={r['server_cpu_ms_per_image']} ms "
                      f"statuses={r['statuses']}", flush=True)
        return run
    finally:
        server.stop()


# ---- the ceiling: the model in this process -----------------------------------------------------
def ceiling(bundle, frozen: FrozenTokenizer, ops: list[str], sizes: list[int], device: str,
            min_s: float = 1.0) -> dict:
    """Images/s of each operation in this process, no HTTP. The tokenizer runs both eager and
    as the frozen TorchScript graphs the server uses (`frozen`, traced once per run); the
    ceiling is the faster of the two."""
    gpt, eager = bundle.gpt, bundle.vqvae
    vq = frozen
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    cfg = vq.config
    rows, cols = cfg.grid
    defaults = dict(bundle.config.get("sampling_defaults") or {})
    out: dict[str, dict[int, float]] = {op: {} for op in ops}
    variants: dict[str, dict[int, dict[str, float]]] = {}
    g = torch.Generator().manual_seed(0)
    for b in sizes:
        codes = torch.randint(0, cfg.codebook_size, (b, rows, cols), generator=g).to(dev)
        with torch.inference_mode():
            pixels = vq.decode_pixels(codes)
        batch = SamplingBatch.cat([make_batch(gpt.config, 1, (rows, cols), label=i % 10,
                                              generator=torch.Generator().manual_seed(i),
                                              cfg_scale=defaults.get("cfg_scale", 1.0),
                                              temperature=defaults.get("temperature", 1.0))
                                   for i in range(b)]).to(dev)
        # what the server's model thread computes per batch: uint8 pixels in or out
        fns = {"generate": [lambda batch=batch: vq.decode_pixels(
                   sample(gpt, batch, (rows, cols)).view(-1, rows, cols)).cpu().numpy()],
               "encode": [lambda pixels=pixels, m=m: m.encode_pixels(pixels).cpu().numpy()
                          for m in (eager, frozen)],
               "decode": [lambda codes=codes, m=m: m.decode_pixels(codes).cpu().numpy()
                          for m in (eager, frozen)]}
        for op in ops:
            rates = []
            for fn in fns[op]:
                with torch.inference_mode():
                    fn()
                    sync()
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < min_s or n < 3:
                        fn()
                        n += 1
                    sync()
                    rates.append(round(n * b / (time.perf_counter() - t0), 1))
            out[op][b] = max(rates)
            if len(rates) > 1:
                variants.setdefault(op, {})[b] = dict(zip(("eager", "torchscript"), rates, strict=True))
        print(f"  [in-process] batch {b:3d}: " + "  ".join(
            f"{op} {out[op][b]:.1f}/s" for op in ops), flush=True)
    single = {}
    if "generate" in ops:
        with torch.inference_mode():  # one image, end to end, the way a lone request runs
            one = SamplingBatch.cat([make_batch(gpt.config, 1, (rows, cols), label=3,
                                                generator=torch.Generator().manual_seed(0),
                                                cfg_scale=defaults.get("cfg_scale", 1.0),
                                                temperature=defaults.get("temperature", 1.0))]).to(dev)
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                png_bytes(vq.decode_pixels(sample(gpt, one, (rows, cols)).view(-1, rows, cols))
                          .cpu().numpy()[0])
                sync()
                times.append(time.perf_counter() - t0)
            single["generate_ms"] = round(1000 * sorted(times)[len(times) // 2], 2)
    return {"images_per_s": out, "single_image": single, "tokenizer_variants": variants}


async def amain(args, save) -> dict:
    ops = args.ops.split(",")
    clients = [int(c) for c in args.clients.split(",")]
    makers = request_makers(args.model, load_bundle(ROOT / "checkpoints" / args.model, device="cpu"),
                            args.images_per_request)
    sizes = sorted({min(c, args.max_batch_size) for c in clients})
    ceil: dict = {"images_per_s": {}, "single_image": {}, "tokenizer_variants": {}}
    if args.ceiling:  # else no model here: the server alone holds the device
        bundle = load_bundle(ROOT / "checkpoints" / args.model, device=args.device)
        frozen = FrozenTokenizer(bundle.vqvae)
    res: dict = {"ceiling": ceil, "runs": []}

    def measure_ceiling(op: str) -> None:
        """Right before the op's batched levels: this machine's speed drifts by a third over
        minutes, and a ceiling from the start of the run would flatter or wrong the op."""
        print(f"in-process ceiling of {op} ({args.model}, torch threads "
              f"{torch.get_num_threads()})", flush=True)
        for k, v in ceiling(bundle, frozen, [op], sizes, args.device).items():
            ceil[k].update(v)

    extra = dict(kv.split("=", 1) for kv in args.env)
    servers = [("batched", {"TAMING_MAX_BATCH_SIZE": str(args.max_batch_size), **extra})]
    if args.baseline:
        servers.append(("unbatched", {"TAMING_MAX_BATCH_SIZE": "1", **extra}))
    for i, (label, env) in enumerate(servers):
        print(f"server, {label}: {env}", flush=True)

        def partial(run: dict, i: int = i) -> None:
            res["runs"][i:] = [run]
            save(res)

        res["runs"][i:] = [await run_server(
            label, env, makers, ops, clients, args.model, args,
            measure_ceiling if label == "batched" and args.ceiling else None, partial)]
    return res


def summarize(res: dict, args) -> dict:
    ceil = res["ceiling"]["images_per_s"]
    batched = res["runs"][0]
    unbatched = res["runs"][1] if len(res["runs"]) > 1 else {"levels": []}
    summary = {}
    for op in args.ops.split(","):
        b = {r["clients"]: r for r in batched["levels"] if r["op"] == op}
        u = {r["clients"]: r for r in unbatched["levels"] if r["op"] == op}
        best = max(b.values(), key=lambda r: r["throughput"])
        if op not in ceil:
            summary[op] = {"saturation_throughput": best["throughput"],
                           "saturation_clients": best["clients"],
                           "one_client_p50_ms": b[1]["p50_ms"] if 1 in b else None}
            continue
        top = max(ceil[op])
        summary[op] = {
            "speedup_at_64": round(b[64]["throughput"] / u[64]["throughput"], 2)
            if 64 in b and 64 in u and u[64]["throughput"] else None,
            "p99_over_p50_at_64": round(b[64]["p99_ms"] / b[64]["p50_ms"], 2) if 64 in b else None,
            "saturation_throughput": best["throughput"], "saturation_clients": best["clients"],
            "ceiling_at_max_batch": ceil[op][top],
            "share_of_ceiling": round(best["throughput"] / ceil[op][top], 3),
            "one_client_p50_ms": b[1]["p50_ms"] if 1 in b else None,
        }
    summary["generate_single_in_process_ms"] = res["ceiling"]["single_image"].get("generate_ms")
    summary["server_memory"] = batched["memory"]
    summary["server_startup_s"] = batched["startup_s"]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device of the in-process ceiling (the server's: --env TAMING_DEVICE=...)")
    ap.add_argument("--clients", default="1,8,32,64,128")
    ap.add_argument("--ops", default="generate,encode,decode")
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per level")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--images-per-request", type=int, default=1,
                    help="images per /encode and /decode request (multipart files, grids)")
    ap.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the server")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also run a server with TAMING_MAX_BATCH_SIZE=1")
    ap.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the model in this process before each operation's levels")
    ap.add_argument("--ready-timeout", type=float, default=120.0,
                    help="seconds a server may take to turn ready (compilation included)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = ap.parse_args()
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
            "torch": torch.__version__, "args": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(res: dict, complete: bool = False) -> None:
        out.write_text(json.dumps({**res, "meta": {**meta, "complete": complete}}, indent=1))

    res = asyncio.run(amain(args, save))
    res["summary"] = summarize(res, args)
    save(res, complete=True)
    print(f"\n{'op':8s} {'clients':>7s} {'batched/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'batch':>6s} {'unbatched/s':>11s} {'speedup':>7s} {'ceiling/s':>9s}")
    ceil = res["ceiling"]["images_per_s"]
    batched = res["runs"][0]
    unbatched = {(r["op"], r["clients"]): r for r in res["runs"][1]["levels"]} \
        if len(res["runs"]) > 1 else {}
    nan = float("nan")
    for rb in batched["levels"]:
        ru = unbatched.get((rb["op"], rb["clients"]), {}).get("throughput", nan)
        cb = ceil.get(rb["op"], {}).get(min(rb["clients"], args.max_batch_size), nan)
        sp = rb["throughput"] / ru if ru else nan
        print(f"{rb['op']:8s} {rb['clients']:7d} {rb['throughput']:10.1f} {rb['p50_ms']:8.2f} "
              f"{rb['p99_ms']:8.2f} {rb['mean_batch'] or 0:6.1f} {ru:11.1f} "
              f"{sp:7.2f} {cb:9.1f}")
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
