"""The parts of bench/gpu.sh that are not benchmarks of their own.

    python bench/gpu_checks.py env DIR              torch, device, nvidia-smi -> DIR/env.json
    python bench/gpu_checks.py tokenizer [--device D] [--batch-sizes 1,64] --out F.json
        frozen (TorchScript) vs eager VQ-VAE outputs on one device, call after call
    python bench/gpu_checks.py util --out F.json    GPU utilisation every 200 ms until SIGTERM
    python bench/gpu_checks.py table DIR            the run's summary table -> DIR/summary.json

Where nvidia-smi is absent (a CPU smoke run), `util` and `env` record "n/a".
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NA = "n/a"
SMI_QUERY = "index,utilization.gpu,memory.used"


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


# ---- env ----------------------------------------------------------------------------------------
def smi(*query: str) -> str:
    if shutil.which("nvidia-smi") is None:
        return NA
    try:
        return subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"{NA} ({e})"


def cmd_env(args: argparse.Namespace) -> None:
    import torch

    cuda = torch.cuda.is_available()
    info = {"python": platform.python_version(), "machine": platform.machine(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": cuda,
            "device_name": torch.cuda.get_device_name(0) if cuda else None,
            "cpu_threads": torch.get_num_threads(), "smoke": args.smoke,
            "nvidia_smi": smi("--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader")}
    write_json(Path(args.dir) / "env.json", info)
    print(json.dumps(info))
    if not args.smoke and not cuda:
        sys.exit("no CUDA device visible to torch (bash bench/gpu.sh --smoke runs on the CPU)")


# ---- tokenizer: frozen vs eager -----------------------------------------------------------------
def cmd_tokenizer(args: argparse.Namespace) -> None:
    """The served tokenizer is frozen TorchScript; on CUDA its fuser joins in after the first
    calls (profiling), so each batch is compared over several calls, worst call reported."""
    import torch

    sys.path.insert(0, str(ROOT))
    from models.checkpoint import load_bundle
    from models.vqvae import FrozenTokenizer

    device = torch.device(args.device)
    bundle = load_bundle(ROOT / "checkpoints" / args.model, device=device)
    eager = bundle.vqvae.eval()
    frozen = FrozenTokenizer(eager)
    cfg = eager.config
    h, w = cfg.grid
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in [int(x) for x in args.batch_sizes.split(",") if x]:
        codes = torch.randint(0, cfg.codebook_size, (n, h, w), generator=g).to(device)
        with torch.inference_mode():
            pixels = eager.decode_pixels(codes)  # plausible images to encode
            row = {"batch": n, "calls": args.calls, "decode_max_abs_diff": 0,
                   "decode_pixels_equal": 1.0, "encode_token_agreement": 1.0,
                   "encode_tokens_differing": 0}
            want_px = eager.decode_pixels(codes)
            want_tok = eager.encode_pixels(pixels)
            for _ in range(args.calls):
                px = frozen.decode_pixels(codes)
                tok = frozen.encode_pixels(pixels)
                diff = (px.int() - want_px.int()).abs()
                row["decode_max_abs_diff"] = max(row["decode_max_abs_diff"], int(diff.max()))
                row["decode_pixels_equal"] = min(row["decode_pixels_equal"],
                                                 round(float((diff == 0).float().mean()), 6))
                same = tok == want_tok
                row["encode_token_agreement"] = min(row["encode_token_agreement"],
                                                    round(float(same.float().mean()), 6))
                row["encode_tokens_differing"] = max(row["encode_tokens_differing"],
                                                     int((~same).sum()))
        rows.append(row)
        print(row, flush=True)
    write_json(Path(args.out), {"device": str(device), "model": args.model,
                                "torch": torch.__version__, "rows": rows,
                                "pixels": "uint8 levels (0-255)",
                                "all_equal": all(r["decode_max_abs_diff"] == 0
                                                 and r["encode_tokens_differing"] == 0
                                                 for r in rows)})


# ---- util: nvidia-smi beside the run ------------------------------------------------------------
def cmd_util(args: argparse.Namespace) -> None:
    """Stamp each nvidia-smi line with the Unix time it arrived (nvidia-smi's own timestamp
    is local time); SIGTERM ends the sampling and writes the file."""
    out = Path(args.out)
    if shutil.which("nvidia-smi") is None:
        write_json(out, {"available": False, "reason": "nvidia-smi not found",
                         "utilization": NA, "samples": []})
        return
    proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_QUERY}",
                             "--format=csv,noheader,nounits", "-lms", str(args.interval_ms)],
                            stdout=subprocess.PIPE, text=True)
    samples: list[list[float]] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def read() -> None:
        for line in proc.stdout:
            try:
                gpu, util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue  # "[N/A]" or a header
            samples.append([round(time.time(), 3), int(gpu), util, mem])

    threading.Thread(target=read, daemon=True).start()
    stop.wait()
    proc.terminate()
    write_json(out, {"available": True, "interval_ms": args.interval_ms,
                     "fields": ["unix_time", "gpu", "utilization_pct", "memory_used_mib"],
                     "samples": samples})


def window_util(util: dict, window: list[float]) -> float | str:
    """Mean utilisation of the busiest GPU over a level's measured window."""
    if not util.get("available"):
        return NA
    a, b = window
    by_gpu: dict[int, list[float]] = {}
    for t, gpu, pct, _ in util["samples"]:
        if a <= t <= b:
            by_gpu.setdefault(gpu, []).append(pct)
    if not by_gpu:
        return NA
    return round(max(sum(v) / len(v) for v in by_gpu.values()), 1)


# ---- table --------------------------------------------------------------------------------------
def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(v: object, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)) and spec:
        return format(v, spec)
    return str(v)


def cmd_table(args: argparse.Namespace) -> None:
    d = Path(args.dir)
    env = load(d / "env.json") or {}
    util = load(d / "util.json") or {"available": False}
    steps = [json.loads(line) for line in (d / "steps.jsonl").read_text().splitlines()
             if line.strip()] if (d / "steps.jsonl").exists() else []
    summary: dict = {"env": env, "steps": steps, "sampler": [], "tokenizer": [], "server": []}
    lines = [f"== GPU run summary ({'CPU smoke run' if env.get('smoke') else 'CUDA'}): "
             f"{env.get('device_name') or env.get('machine', '?')}, torch {env.get('torch', '?')}"]

    lines.append("-- steps")
    for s in steps:
        lines.append(f"  {s['step']:<22} {s['status']:<9} {s['seconds']:6.1f} s  (limit {s['limit_s']} s)")

    sampler = load(d / "sampler.json")
    lines.append("-- sampler at the server's defaults (cfg "
                 f"{fmt(((sampler or {}).get('meta') or {}).get('sampling', {}).get('cfg_scale'))}), "
                 "eager generate vs compiled step")
    lines.append(f"  {'batch':>6} {'eager img/s':>11} {'compiled img/s':>14} {'x':>6} "
                 f"{'ref img/s':>9} {'eager MB':>9} {'compiled MB':>11} {'compile s':>9}")
    for r in (sampler or {}).get("rows", []):
        summary["sampler"].append(r)
        lines.append(f"  {r['batch']:6d} {fmt(r.get('eager_images_per_s'), '.1f'):>11} "
                     f"{fmt(r.get('compiled_images_per_s'), '.1f'):>14} "
                     f"{fmt(r.get('compiled_over_eager'), '.2f'):>6} "
                     f"{fmt(r.get('reference_images_per_s'), '.2f'):>9} "
                     f"{fmt(r.get('eager_peak_mb'), '.0f'):>9} "
                     f"{fmt(r.get('compiled_peak_mb'), '.0f'):>11} {fmt(r.get('compile_s'), '.1f'):>9}")

    counts = ((sampler or {}).get("meta") or {}).get("compile_counters")
    if counts:
        lines.append("  torch.compile: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

    tok = load(d / "tokenizer.json")
    lines.append(f"-- tokenizer, frozen vs eager on {fmt((tok or {}).get('device'))}")
    lines.append(f"  {'batch':>6} {'decode max |diff|':>17} {'pixels equal':>12} {'token agreement':>15}")
    for r in (tok or {}).get("rows", []):
        summary["tokenizer"].append(r)
        lines.append(f"  {r['batch']:6d} {r['decode_max_abs_diff']:17d} "
                     f"{r['decode_pixels_equal']:12.6f} {r['encode_token_agreement']:15.6f}")

    lines.append("-- server /generate (closed loop, n=1); GPU util: mean over each level's window")
    lines.append(f"  {'run':<22} {'start s':>7} {'clients':>7} {'img/s':>8} {'p50 ms':>8} "
                 f"{'p99 ms':>8} {'GPU %':>6}")
    for path in sorted(d.glob("serve_*.json")):
        res = load(path)
        if not res or not res.get("runs"):
            lines.append(f"  {path.stem[6:]:<22} (no result)")
            continue
        run = res["runs"][0]
        if not run["levels"]:
            why = run.get("error") or "stopped while the server started"
            lines.append(f"  {path.stem[6:]:<22} no level finished: {why.splitlines()[-1][:80]}")
            continue
        best = None
        for lv in run["levels"]:
            lv = {**lv, "gpu_util_pct": window_util(util, lv["window"])}
            if best is None or lv["throughput"] > best["throughput"]:
                best = lv
            lines.append(f"  {path.stem[6:]:<22} {fmt(run.get('startup_s'), '.1f'):>7} "
                         f"{lv['clients']:7d} {lv['throughput']:8.1f} {lv['p50_ms']:8.1f} "
                         f"{lv['p99_ms']:8.1f} {fmt(lv['gpu_util_pct'], '.1f'):>6}")
        if best is not None:
            summary["server"].append({"run": path.stem[6:], "env": run["env"],
                                      "startup_s": run.get("startup_s"),
                                      "saturation_images_per_s": best["throughput"],
                                      "saturation_clients": best["clients"],
                                      "gpu_util_pct_at_saturation": best["gpu_util_pct"],
                                      "complete": (res.get("meta") or {}).get("complete", False)})
    lines.append("-- saturation: images/s beside GPU utilisation")
    for s in summary["server"]:
        lines.append(f"  {s['run']:<22} {s['saturation_images_per_s']:8.1f} img/s at "
                     f"{s['saturation_clients']} clients, GPU {fmt(s['gpu_util_pct_at_saturation'])}%")
    write_json(d / "summary.json", summary)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("dir")
    e.add_argument("--smoke", action="store_true")
    t = sub.add_parser("tokenizer")
    t.add_argument("--model", default="mnist")
    t.add_argument("--device", default="cuda")
    t.add_argument("--batch-sizes", default="1,64,1024")
    t.add_argument("--calls", type=int, default=4)
    t.add_argument("--out", required=True)
    u = sub.add_parser("util")
    u.add_argument("--out", required=True)
    u.add_argument("--interval-ms", type=int, default=200)
    s = sub.add_parser("table")
    s.add_argument("dir")
    args = ap.parse_args()
    {"env": cmd_env, "tokenizer": cmd_tokenizer, "util": cmd_util, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
