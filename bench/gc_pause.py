"""Benchmark: how long a full garbage collection holds the serving process, with start-up's
objects frozen out of the collector (what the service does once ready) and without.

A full collection holds the GIL, so every generation lane and the event loop wait it out.
The service is started in-process with both shipped models (the default settings), then:

    python bench/gc_pause.py [--repeat 5]

Prints the tracked objects and the median pause of `gc.collect()` both ways, and writes
bench/results/gc_pause.json. Not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402


def pause_ms(repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        gc.collect()
        times.append(1000 * (time.perf_counter() - t0))
    return round(statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    app = create_app(Settings(checkpoint_dir=ROOT / "checkpoints", log_level="warning"))
    with TestClient(app) as c:
        assert c.post("/generate", json={"seed": 0}).status_code == 200
        frozen = {"tracked_objects": len(gc.get_objects()), "pause_ms": pause_ms(args.repeat)}
        gc.unfreeze()  # as before the service froze them: every object in the full collection
        thawed = {"tracked_objects": len(gc.get_objects()), "pause_ms": pause_ms(args.repeat)}
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "frozen": frozen, "not_frozen": thawed}
    print(json.dumps(out))
    dest = ROOT / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "gc_pause.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
