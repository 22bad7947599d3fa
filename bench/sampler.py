"""Benchmark: the slot sampler eager (`models.slots.generate`) vs its compiled step, and the
reference sampler, on the same weights in the same run.

Every image samples at the checkpoint's `sampling_defaults` (the server's defaults: cfg 1.5,
so a guided image takes two rows). Eager is `generate` as the library runs it; compiled is
the same sampler stepped by `compiled_steps` (on CUDA torch.compile with CUDA graphs, mode
reduce-overhead; on CPU a frozen TorchScript trace), reused across calls, the way the
server's engine runs its slots: without the sort when no row filters, as at these defaults,
except on CUDA, which builds the filtered graph alone (eager `generate` skips it too).
With --slots the compiled step runs one sampler of 2 x slots rows, each batch at the
smallest padded size that holds it: the server's lane. Each size runs once untimed first
(compilation, graph capture); peak memory is the device's peak allocation on CUDA, the
process's peak RSS on CPU.

    python bench/sampler.py [--checkpoint checkpoints/mnist] [--device cpu|cuda]
        [--batch-sizes 1,8,64,256] [--reference-sizes 1,8] [--slots 256] [--no-compile]
        [--repeat N] [--budget-s S]

Writes JSON (bench/results/sampler.json) after every measurement, so a run cut short keeps
what it measured; prints a table at the end. Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.checkpoint import load_bundle  # noqa: E402
from models.gpt import GPT  # noqa: E402
from models.sampling import SamplingBatch, filtering, make_batch, reference_generate  # noqa: E402
from models.slots import SlotSampler, compiled_steps, generate, step_variants  # noqa: E402


def batch_of(gpt: GPT, n: int, defaults: dict, seed: int) -> SamplingBatch:
    """n seeded images at the server's defaults, labels cycling through the classes."""
    cfg = gpt.config
    g = torch.Generator().manual_seed(seed)
    settings = {k: defaults[k] for k in ("temperature", "top_k", "top_p", "cfg_scale")
                if defaults.get(k) is not None}
    return SamplingBatch.cat([make_batch(cfg, 1, cfg.grid, label=i % cfg.n_classes,
                                         generator=g, **settings) for i in range(n)])


def rows_of(batch: SamplingBatch) -> int:
    return len(batch) + int((batch.cfg_scale != 1).sum())


def compiled_sampler(gpt: GPT, rows: int) -> tuple[SlotSampler, Callable[[int, bool], None]]:
    sampler = SlotSampler(gpt, rows)
    return sampler, compiled_steps(sampler)


class CompiledGenerate:
    """`generate` over a reused sampler whose step is compiled, run the way the server's
    engine runs a lane: the images in rows [0, rows), the step at the smallest padded size
    that holds them, with the sort only where a row filters (on CUDA the compiled step has
    the filtered graph alone and takes it either way). Admit, then T steps."""

    def __init__(self, sampler: SlotSampler, step: Callable[[int, bool], None],
                 batch: SamplingBatch) -> None:
        cfg = sampler.gpt.config
        self.sampler, self.step, self.batch = sampler, step, batch
        self.filtered = filtering(batch.top_k, batch.top_p, cfg.codebook_size)
        self.null_class, self.T = cfg.null_class, cfg.seq_len
        guided = (batch.cfg_scale != 1).tolist()
        spare = iter(range(len(batch), rows_of(batch)))
        self.cond = list(range(len(batch)))
        self.uncond = [next(spare) if g else None for g in guided]
        self.size = next(s for s in sampler.sizes if s >= rows_of(batch))

    @torch.inference_mode()
    def __call__(self) -> torch.Tensor:
        s = self.sampler
        s.admit(self.cond, self.uncond, self.batch, self.null_class)
        for _ in range(self.T):
            self.step(self.size, self.filtered)
        return s.out[:len(self.batch)].clone()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeat: int
          ) -> tuple[float, torch.Tensor]:
    """Median seconds of `repeat` runs after one untimed run, and the last run's tokens."""
    out = fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def same_rows(a: torch.Tensor, b: torch.Tensor) -> str:
    """Rows with identical tokens, as "k/n" (float rounding may differ: reported, not asserted)."""
    same = (a.cpu() == b.cpu()).all(1)
    return f"{int(same.sum())}/{len(same)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/mnist")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default="1,8,64,256")
    ap.add_argument("--reference-sizes", default="1,8",
                    help="the reference re-forwards every prefix: small sizes only ('' for none)")
    ap.add_argument("--no-compile", action="store_true", help="eager and reference only")
    ap.add_argument("--slots", type=int, default=0, help=(
        "compiled: one sampler of 2 x SLOTS rows for every batch, stepped at padded sizes (the "
        "server's lane at TAMING_GENERATE_SLOTS); 0: a sampler of the batch's own rows each"))
    ap.add_argument("--repeat", type=int, default=0,
                    help="timed runs per size (0: 5 up to batch 64, 3 above)")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="skip the compiled sizes not started within this many seconds")
    ap.add_argument("--out", default="bench/results/sampler.json")
    args = ap.parse_args()
    t_start = time.monotonic()
    device = torch.device(args.device)
    bundle = load_bundle(args.checkpoint, device=device, require_gpt=True)
    gpt = bundle.gpt
    cfg = gpt.config
    defaults = dict(bundle.config.get("sampling_defaults") or {})
    mode = ("torch.compile, reduce-overhead (CUDA graphs)" if device.type == "cuda"
            else "frozen TorchScript trace")
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    ref_sizes = {int(x) for x in args.reference_sizes.split(",") if x}
    batches = {n: batch_of(gpt, n, defaults, seed=n).to(device) for n in sizes}
    filtered = (filtering(batches[sizes[0]].top_k, batches[sizes[0]].top_p, cfg.codebook_size)
                if sizes else None)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads"
                       + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
            "device": str(device), "checkpoint": args.checkpoint, "torch": torch.__version__,
            "sampling": defaults, "compile_mode": mode,
            "eager_pick_filtered": filtered,
            "compiled_pick_filtered": bool(filtered) or False not in step_variants(device.type),
            "compiled_sampler_rows": 2 * args.slots if args.slots else "each batch's own",
            "grid": list(cfg.grid),
            "d_model": cfg.d_model, "n_layer": cfg.n_layer,
            "peak_memory": "cuda max_memory_allocated" if device.type == "cuda"
                           else "process peak RSS (monotone over the run)"}
    rows: dict[int, dict] = {n: {"batch": n} for n in sizes}

    def repeats(n: int) -> int:
        return args.repeat or (5 if n <= 64 else 3)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(done: bool = False) -> None:
        meta["complete"] = done
        out.write_text(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=1))

    eager_tokens: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for n in sizes:  # eager first: cheap, and a compile that runs long cannot cost it
            b, row = batches[n], rows[n]
            reset_peak(device)
            t, eager_tokens[n] = timed(lambda b=b: generate(gpt, b), device, repeats(n))
            row.update(eager_images_per_s=round(n / t, 1), eager_ms=round(t * 1e3, 2),
                       eager_peak_mb=peak_mb(device))
            if n in ref_sizes:
                t_ref, ref = timed(lambda b=b: reference_generate(gpt, b), device,
                                   min(3, repeats(n)))
                row.update(reference_images_per_s=round(n / t_ref, 2),
                           eager_over_reference=round(t_ref / t, 1),
                           eager_same_as_reference=same_rows(eager_tokens[n], ref))
            save()
            print(f"eager batch {n}: {row}", flush=True)
    # the compiled samplers are made outside inference mode, as the engine makes its lanes'
    shared = None
    if args.slots and not args.no_compile:
        if 2 * args.slots < max(rows_of(b) for b in batches.values()):
            sys.exit(f"--slots {args.slots} is too few for batch {max(sizes)} at these settings")
        shared = compiled_sampler(gpt, 2 * args.slots)
    for n in [] if args.no_compile else sizes:
        row = rows[n]
        if time.monotonic() - t_start > args.budget_s:
            row["compiled_skipped"] = f"budget of {args.budget_s:g} s spent"
            continue
        reset_peak(device)
        t0 = time.monotonic()
        run = CompiledGenerate(*(shared or compiled_sampler(gpt, rows_of(batches[n]))),
                               batches[n])
        row["compiled_rows"] = run.size
        run()  # compiles (and on CUDA records) this size
        sync(device)
        row["compile_s"] = round(time.monotonic() - t0, 1)
        t, tokens = timed(run, device, repeats(n))
        row.update(compiled_images_per_s=round(n / t, 1), compiled_ms=round(t * 1e3, 2),
                   compiled_peak_mb=peak_mb(device),
                   compiled_over_eager=round(row["eager_ms"] / (t * 1e3), 2),
                   compiled_same_as_eager=same_rows(tokens, eager_tokens[n]))
        save()
        print(f"compiled batch {n}: {row}", flush=True)
    if device.type == "cuda" and not args.no_compile:
        # graphs torch.compile built, and whether inductor fell back from CUDA graphs (a
        # skip means the step ran as separate kernel launches)
        from torch._dynamo.utils import counters
        meta["compile_counters"] = {
            "unique_graphs": counters["stats"]["unique_graphs"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            "cudagraph_recorded_non_static_inputs":
                counters["inductor"]["cudagraph_recorded_non_static_inputs"]}
    save(done=True)
    print(json.dumps(meta))
    print(f"{'batch':>6} {'eager img/s':>11} {'compiled img/s':>14} {'x':>6} {'ref img/s':>9} "
          f"{'eager MB':>9} {'compiled MB':>11} {'compile s':>9}")
    for r in rows.values():
        def f(key: str, fmt: str, w: int, r: dict = r) -> str:
            return format(r[key], fmt).rjust(w) if key in r else "-".rjust(w)
        print(f"{r['batch']:6d} {f('eager_images_per_s', '.1f', 11)} "
              f"{f('compiled_images_per_s', '.1f', 14)} {f('compiled_over_eager', '.2f', 6)} "
              f"{f('reference_images_per_s', '.2f', 9)} {f('eager_peak_mb', '.0f', 9)} "
              f"{f('compiled_peak_mb', '.0f', 11)} {f('compile_s', '.1f', 9)}")


if __name__ == "__main__":
    main()
