"""bench/gpu.sh --smoke: every step of the GPU benchmark script, on the CPU at tiny sizes, so the
script that only a lent GPU runs in full is exercised on every change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = ("env", "sampler", "tokenizer", "canvas", "util", "serve_eager_slots4",
         "serve_compiled_slots4", "summary")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-smoke")
    # the run's own limit is 115 s; a shared test machine may be busier than that allows
    env = {**os.environ, "PY": sys.executable, "OUT": str(out), "GPU_RUN_LIMIT_S": "400"}
    proc = subprocess.run(["bash", "bench/gpu.sh", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=500, env=env)
    return proc, out


@pytest.mark.slow
def test_smoke_run_finishes_every_step(smoke) -> None:
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == ["env", "sampler", "tokenizer", "canvas",
                                          "serve_eager_slots4", "serve_compiled_slots4"]
    assert all(s["status"] == "ok" for s in steps), steps
    for name in FILES:
        json.loads((out / f"{name}.json").read_text())  # exists and parses


@pytest.mark.slow
def test_smoke_table_is_printed_last(smoke) -> None:
    proc, _ = smoke
    table = proc.stdout[proc.stdout.rindex("== GPU run summary (CPU smoke run)"):]
    for heading in ("-- steps", "-- sampler", "-- tokenizer", "-- server /generate",
                    "-- saturation"):
        assert heading in table
    saturation = table[table.index("-- saturation"):].splitlines()[1:]
    assert len(saturation) == 2 and all("img/s at" in line for line in saturation), table


@pytest.mark.slow
def test_smoke_measures_what_the_gpu_run_measures(smoke) -> None:
    _, out = smoke
    canvas = json.loads((out / "canvas.json").read_text())
    assert sorted(canvas["canvases"]) == ["17", "34"] and "34/17" in canvas["time_ratio_4x_cells"]
    assert canvas["streamed"]["rows"] == 34 and 0 < canvas["streamed"]["first_row_share"] < 1
    assert canvas["other_model_latency"]["requests_during"] > 0
    assert 0 < canvas["flops"]["share"] < 1
    sampler = json.loads((out / "sampler.json").read_text())
    assert sampler["meta"]["complete"] and sampler["meta"]["sampling"]["cfg_scale"] == 1.5
    assert [r["batch"] for r in sampler["rows"]] == [1, 4, 8]
    for r in sampler["rows"]:
        assert r["eager_images_per_s"] > 0 and r["compiled_images_per_s"] > 0
        assert r["eager_peak_mb"] > 0 and r["compiled_peak_mb"] > 0
        assert r["compiled_same_as_eager"] == f"{r['batch']}/{r['batch']}"
    assert sampler["rows"][0]["eager_same_as_reference"] == "1/1"

    tok = json.loads((out / "tokenizer.json").read_text())
    assert tok["device"] == "cpu" and [r["batch"] for r in tok["rows"]] == [1, 8]
    assert tok["all_equal"], tok  # on the CPU the frozen graphs are the eager model bit for bit

    for mode, compiled in (("eager", "false"), ("compiled", "true")):
        res = json.loads((out / f"serve_{mode}_slots4.json").read_text())
        assert res["meta"]["complete"]
        (run,) = res["runs"]
        assert run["env"]["TAMING_COMPILE"] == compiled and run["env"]["TAMING_GENERATE_SLOTS"] == "4"
        assert [lv["clients"] for lv in run["levels"]] == [1, 2]
        for lv in run["levels"]:
            assert lv["throughput"] > 0 and set(lv["statuses"]) == {"200"}, lv
            a, b = lv["window"]
            assert b - a == pytest.approx(1.0)

    summary = json.loads((out / "summary.json").read_text())
    assert {s["run"] for s in summary["server"]} == {"eager_slots4", "compiled_slots4"}
    util = json.loads((out / "util.json").read_text())
    if shutil.which("nvidia-smi") is None:
        assert util["available"] is False and util["utilization"] == "n/a"
        assert all(s["gpu_util_pct_at_saturation"] == "n/a" for s in summary["server"])
