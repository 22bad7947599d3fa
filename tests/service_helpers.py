"""Helpers for the service tests: tiny checkpoint folders, settings, PNG and metric readers.

`serving_models()` prefers the shipped checkpoints once their transformers exist
(checkpoints/mnist/transformer.safetensors), so the same tests then run on the real models;
until then it builds tiny random models (fast on 2 cores). It serves mnist and fashion-mnist
unless a test names the models it needs or asks for every shipped one: landscapes (RGB, a
16x16 grid of 256 steps) is far dearer to start and sample, and every test's app would pay.
"""

from __future__ import annotations

import atexit
import io
import json
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from contextlib import asynccontextmanager, contextmanager
from functools import lru_cache
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from models.checkpoint import save_gpt, save_vqvae
from models.gpt import GPT, GPTConfig
from models.vqvae import VQVAE, VQVAEConfig
from service.server import server_config
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "checkpoints"
DIGITS = [str(i) for i in range(10)]
CLOTHES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]
TINY_DEFAULTS = {"temperature": 1.0, "top_k": None, "top_p": 1.0, "cfg_scale": 1.0}


def make_tiny_checkpoint(folder: Path, dataset: str, classes: list[str], channels: int = 1,
                         seed: int = 0, with_gpt: bool = True) -> Path:
    """A random tiny VQ-VAE (K=16, 28x28 -> 7x7) and, optionally, a one-layer GPT."""
    torch.manual_seed(seed)
    vq = VQVAE(VQVAEConfig(channels=channels, widths=(8, 16, 16), codebook_size=16, code_dim=4))
    vq.quantizer.embed.normal_()  # spread the codes so encode uses more than one
    save_vqvae(folder, vq, {"name": folder.name, "dataset": dataset, "classes": classes})
    if with_gpt:
        gpt = GPT(GPTConfig(codebook_size=16, n_classes=len(classes), grid=(7, 7), n_layer=1,
                            n_head=2, d_model=32))
        with torch.no_grad():  # random weights give near-uniform logits: make them peakier
            gpt.head.weight.mul_(50)
        save_gpt(folder, gpt, {"sampling_defaults": dict(TINY_DEFAULTS)})
    return folder


@lru_cache
def tiny_root() -> Path:
    """A process-wide folder with tiny `mnist`, `fashion-mnist`, `rgb` and `tokenizer-only`."""
    root = Path(tempfile.mkdtemp(prefix="taming-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    make_tiny_checkpoint(root / "mnist", "mnist", DIGITS, seed=0)
    make_tiny_checkpoint(root / "fashion-mnist", "fashion-mnist", CLOTHES, seed=1)
    make_tiny_checkpoint(root / "rgb", "folder:rgb", ["red", "green"], channels=3, seed=2)
    make_tiny_checkpoint(root / "tokenizer-only", "mnist", DIGITS, seed=3, with_gpt=False)
    return root


def real_generators() -> list[str]:
    """Shipped models whose transformer is trained, mnist first."""
    if not (REAL / "mnist" / "transformer.safetensors").is_file():
        return []
    names = [d.name for d in sorted(REAL.iterdir())
             if (d / "config.json").is_file() and (d / "transformer.safetensors").is_file()]
    return sorted(names, key=lambda n: n != "mnist")


SERVED = ("mnist", "fashion-mnist")  # what serving_models() serves unless told otherwise


def serving_models(*names: str, every: bool = False) -> dict:
    """Settings keywords for the models the HTTP tests run on: shipped ones when trained.

    `names` are the shipped models a test needs (SERVED when none); `every` serves every
    trained shipped model. Before the shipped transformers are trained: tiny mnist and
    fashion-mnist."""
    real = real_generators()
    if not real:
        return {"checkpoint_dir": tiny_root(), "models": list(SERVED)}
    if every:
        return {"checkpoint_dir": REAL, "models": real}
    wanted = list(names or SERVED)
    missing = sorted(set(wanted) - set(real))
    assert not missing, f"no trained shipped model {missing} in {REAL}"
    return {"checkpoint_dir": REAL, "models": wanted}


def tiny_models(*names: str) -> dict:
    return {"checkpoint_dir": tiny_root(), "models": list(names or ("mnist",))}


def settings(**kw) -> Settings:
    """Test settings; an unknown name fails here (Settings itself ignores extra names, so a
    removed setting would otherwise be dropped silently)."""
    unknown = set(kw) - set(Settings.model_fields)
    assert not unknown, f"no such settings: {sorted(unknown)}"
    kw.setdefault("log_level", "warning")
    kw.setdefault("torch_threads", 1)  # the worker thread only; robust on a busy CPU
    kw.setdefault("compile", False)  # the eager step starts in seconds; compile tests ask for it
    return Settings(**kw)


def png_array(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    return np.asarray(im)


def png_of(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, rest = head.partition("{")
        if metric_name != name:
            continue
        pairs = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if "=" in p)
        pairs = {k: v.strip('"') for k, v in pairs.items()}
        if all(pairs.get(k) == str(v) for k, v in labels.items()):
            total += float(value)
    return total


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


@asynccontextmanager
async def async_client(app):
    """An httpx.AsyncClient on the app in this event loop, with the lifespan running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=120) as client:
            yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, limit: float = 120) -> float:
    """Seconds until a server process at `base` answers /readyz 200; it is killed, and the
    test fails, if it exits first or is not ready within `limit`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.communicate()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server not ready in time")


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def record_queue(admission, peaks: list[int]) -> None:
    """From now on, append the admission gate's queued images to `peaks` after each entry."""
    enter = admission.enter

    def counted(n: int) -> None:
        enter(n)
        peaks.append(admission.queued)

    admission.enter = counted


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """Terminate a server process, killed if it has not exited within `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sse_events(text: str) -> list[tuple[str, dict]]:
    """A server-sent event stream's (event, JSON data) pairs, in order."""
    events, name = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


@contextmanager
def live_server(app):
    """The app behind a real uvicorn socket (the server's own protocol and header deadline) in a
    background thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = server_config(app, app.state.service.settings, host="127.0.0.1", port=port,
                           log_level="warning", timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
