"""The real process: `python -m service` starts, drains on SIGTERM and exits 0, refuses a bad
checkpoint with a one-line reason; a client that hangs up costs no model work."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from service_helpers import (
    ROOT,
    free_port,
    live_server,
    metric,
    settings,
    tiny_models,
    tiny_root,
    wait_ready,
)

from models.checkpoint import CheckpointError
from service.app import create_app
from service.registry import load_models


def service_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"HOST": "127.0.0.1", "TAMING_TORCH_THREADS": "1", "TAMING_LOG_LEVEL": "info",
                "TAMING_COMPILE": "false", "PYTHONPATH": str(ROOT)})
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.mark.slow
def test_sigterm_drains_in_flight_and_queued_requests_then_exits_0():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # one generation slot and one-image collector batches: the work below takes seconds, so
    # SIGTERM finds images sampling and waiting, and wide grids queued behind each other
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env=service_env(PORT=port, TAMING_CHECKPOINT_DIR=tiny_root(), TAMING_MODELS="mnist",
                        TAMING_GENERATE_SLOTS=1, TAMING_MAX_BATCH_SIZE=1,
                        TAMING_SHUTDOWN_GRACE_S=1.5))
    try:
        assert wait_ready(base, proc, limit=60) < 30
        bodies = ([{"seed": i, "n": 32} for i in range(2)]
                  + [{"seed": 10 + i, "grid": [24, 24]} for i in range(3)])
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(httpx.post, f"{base}/generate", json=b, timeout=60)
                       for b in bodies]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # wait until all of them are queued
                text = httpx.get(f"{base}/metrics").text
                if metric(text, "taming_in_flight_requests") == len(bodies):
                    break
                time.sleep(0.02)
            else:
                raise AssertionError("requests never arrived")
            proc.send_signal(signal.SIGTERM)
            term = time.time()
            time.sleep(0.3)
            r = httpx.get(f"{base}/readyz")  # the grace period keeps the port open
            assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
            r = httpx.post(f"{base}/generate", json={"seed": 1})
            assert r.status_code == 503 and r.headers["retry-after"]
            answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200] * len(bodies)
        assert all(a.headers["content-type"] == "image/png" for a in answers)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        gen = [rec for rec in lines if rec["endpoint"] == "/generate" and rec["status"] == 200]
        assert len(gen) == len(bodies)
        assert max(rec["ts"] for rec in gen) > term  # the drain really had work to finish
        for rec in gen:
            assert {"request_id", "model", "images"} <= set(rec)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_corrupt_checkpoint_stops_start_up_with_one_line(tmp_path):
    bad = tmp_path / "mnist"
    shutil.copytree(tiny_root() / "mnist", bad)
    weights = bad / "vqvae.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120,
                          env=service_env(PORT=free_port(), TAMING_CHECKPOINT_DIR=tmp_path))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "vqvae.safetensors" in lines[0] and "Traceback" not in proc.stderr


def _copy(tmp_path, name="mnist"):
    folder = tmp_path / name
    shutil.copytree(tiny_root() / name, folder)
    return folder


@pytest.mark.parametrize("damage,needle", [
    ("truncate_gpt", "transformer.safetensors"),
    ("mismatch", "vqvae.safetensors"),
    ("bad_json", "config.json"),
    ("missing_weights", "vqvae.safetensors"),
    # caught after the tokenizer is traced for serving: seconds
    pytest.param("bad_defaults", "sampling_defaults", marks=pytest.mark.slow),
])
def test_bad_checkpoints_are_refused_naming_the_file(tmp_path, damage, needle):
    folder = _copy(tmp_path)
    cfg_path = folder / "config.json"
    if damage == "truncate_gpt":
        p = folder / "transformer.safetensors"
        p.write_bytes(p.read_bytes()[:-100])
    elif damage == "mismatch":
        cfg = json.loads(cfg_path.read_text())
        cfg["vqvae"]["code_dim"] = 8
        cfg_path.write_text(json.dumps(cfg))
    elif damage == "bad_json":
        cfg_path.write_text("{not json")
    elif damage == "missing_weights":
        (folder / "vqvae.safetensors").unlink()
    elif damage == "bad_defaults":
        cfg = json.loads(cfg_path.read_text())
        cfg["sampling_defaults"]["top_p"] = 3
        cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_models(settings(checkpoint_dir=tmp_path))
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_missing_model_folder_and_empty_dir_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_models(settings(checkpoint_dir=tmp_path, models=["nope"]))
    with pytest.raises(CheckpointError, match="no checkpoint folders"):
        load_models(settings(checkpoint_dir=tmp_path))


@pytest.mark.slow
def test_discovery_skips_folders_without_config(tmp_path):
    _copy(tmp_path)
    (tmp_path / "in-training").mkdir()
    assert list(load_models(settings(checkpoint_dir=tmp_path))) == ["mnist"]


@pytest.mark.slow
def test_a_client_that_hangs_up_costs_no_model_work():
    """In the collector: a queued job whose client left is dropped before compute. (The
    generation engine frees a leaver's slots at the next step: tests/service/test_generation.py.)"""
    app = create_app(settings(**tiny_models("mnist"), max_wait_ms=1000))
    with live_server(app) as base:
        app.state.service.collector.policy.eager = False  # a batch waits for company
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"tokens": [[1] * 7] * 7}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /decode HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.2)  # queued, waiting for company
        time.sleep(1.5)  # the batch window closes; the job is dropped, not computed
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, "taming_rejected_total", reason="client_gone") == 1
        assert metric(text, "taming_batch_size_count", operation="decode") == 0
        ok = httpx.post(f"{base}/decode", json={"tokens": [[1] * 7] * 7}, timeout=30)
        assert ok.status_code == 200


@pytest.fixture(scope="module")
def logging_client():
    with TestClient(create_app(settings(**tiny_models("mnist"), log_level="info"))) as c:
        yield c


@pytest.fixture
def access_log():
    """The access log's records (parsed) while the test runs."""
    records: list[dict] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(json.loads(r.getMessage()))
    logger = logging.getLogger("taming.access")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("path,body", [
    ("/decode", {"tokens": [[1] * 7] * 7}),
    ("/generate", {"seed": 1, "grid": [7, 8]}),
    ("/generate", {"seed": 1}),
], ids=["decode", "generate-wide", "generate"])
def test_inference_requests_log_their_batch_and_timings(logging_client, access_log, path, body):
    r = logging_client.post(path, json=body)
    assert r.status_code == 200, r.text
    (rec,) = [x for x in access_log if x["endpoint"] == path]
    assert rec["status"] == 200 and rec["model"] == "mnist" and rec["images"] == 1
    assert {"request_id", "batch_size", "queue_ms", "compute_ms"} <= set(rec), rec
