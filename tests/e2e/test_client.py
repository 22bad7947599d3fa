"""The client and the `taming` command line as a user meets them: `pip install ./client` into a
fresh virtual environment (no torch pulled in), against a live `python -m service`.

The client code runs in that environment (its own Python, outside this repository), prints
JSON, and the tests compare it with what the HTTP API answers to the same requests.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import REAL, ROOT, free_port, metric, real_generators, tiny_root, wait_ready

pytestmark = pytest.mark.slow

KEY = "client-test-key"


# ---- the environment and the servers ------------------------------------------------------
@pytest.fixture(scope="module")
def client_env(tmp_path_factory) -> Path:
    """A fresh venv with `pip install ./client` (a copy of client/, so no build files land
    in the source tree)."""
    root = tmp_path_factory.mktemp("client-venv")
    source = root / "client"
    shutil.copytree(ROOT / "client", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    pip = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(source)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    return env_dir


def start_server(**extra) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "TAMING_TORCH_THREADS": "1",
                "TAMING_LOG_LEVEL": "warning", "TAMING_COMPILE": "false",
                "PYTHONPATH": str(ROOT)})
    env.update({k: str(v) for k, v in extra.items()})
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc)
    return proc, base


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def server():
    """The shipped models behind an API key."""
    if not real_generators():
        pytest.skip("the shipped checkpoints have no trained transformer")
    proc, base = start_server(TAMING_CHECKPOINT_DIR=REAL, TAMING_API_KEYS=KEY)
    yield base
    stop(proc)


def run(env_dir: Path, args: list[str], cwd: Path, stdin: bytes | None = None,
        **environ: str) -> subprocess.CompletedProcess:
    """A program of the client's venv, outside the repository, with TAMING_* set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TAMING_URL", "TAMING_API_KEY")}
    env.update(environ)
    return subprocess.run(args, cwd=cwd, env=env, input=stdin, capture_output=True,
                          timeout=300)


def py(env_dir: Path, code: str, cwd: Path, **environ: str):
    """Run Python code in the client's venv; it prints one JSON document."""
    done = run(env_dir, [str(env_dir / "bin" / "python"), "-c", code], cwd, **environ)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def api(base: str, method: str, path: str, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
    r = httpx.request(method, f"{base}{path}", headers=headers, timeout=120, **kw)
    assert r.status_code == 200, r.text
    return r


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def b64(text: str) -> bytes:
    return base64.b64decode(text)


# ---- installing ---------------------------------------------------------------------------
def test_the_client_installs_without_torch(client_env, tmp_path):
    listed = run(client_env, [str(client_env / "bin" / "python"), "-m", "pip", "list",
                              "--format=json"], tmp_path)
    names = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert "taming-client" in names
    assert not names & {"torch", "fastapi", "uvicorn", "safetensors", "pydantic"}, names
    info = py(client_env, "import json, importlib.util, taming_client; print(json.dumps("
              "[taming_client.__file__, importlib.util.find_spec('torch') is None]))", tmp_path)
    assert info[0].startswith(str(client_env)) and info[1] is True
    for args in ([], ["generate"], ["encode"], ["decode"], ["models"]):
        done = run(client_env, [str(client_env / "bin" / "taming"), *args, "--help"], tmp_path)
        assert done.returncode == 0, done.stderr
        assert b"--url" in done.stdout or not args
        assert b"usage: taming" in done.stdout


# ---- the Python client --------------------------------------------------------------------
GENERATE = """
import base64, inspect, json
from taming_client import GenerateParams, TamingClient
with TamingClient(URL, api_key=KEY) as c:
    g = c.generate(model="mnist", n=4, label=7, seed=1)
    same = c.generate(GenerateParams(model="mnist", n=4, label=7, seed=1))
    try:
        c.generate(GenerateParams(seed=1), seed=2)
        both = "accepted"
    except TypeError:
        both = "refused"
    import io
    buf = io.BytesIO(); g.mosaic().save(buf, format="PNG")
    print(json.dumps({"model": g.model, "seed": g.seed, "seeds": g.seeds, "both": both,
        "same": [t.tolist() for t in same.tokens] == [t.tolist() for t in g.tokens],
        "keywords": [n for n, p in inspect.signature(c.stream).parameters.items()
                     if p.kind == p.KEYWORD_ONLY],
        "tokens": [t.tolist() for t in g.tokens], "dtype": str(g.tokens[0].dtype),
        "pngs": [base64.b64encode(p).decode() for p in g.pngs],
        "sizes": [list(im.size) for im in g.images],
        "mosaic": base64.b64encode(buf.getvalue()).decode()}))
"""


def client_code(body: str, base: str, key: str | None = KEY) -> str:
    return f"URL = {base!r}\nKEY = {key!r}\n" + body


def test_generate_returns_what_the_api_answers(client_env, server, tmp_path):
    got = py(client_env, client_code(GENERATE, server), tmp_path)
    body = {"model": "mnist", "n": 4, "label": 7, "seed": 1}
    answer = api(server, "POST", "/generate", json=body,
                 headers={"Accept": "application/json"}).json()
    assert got["model"] == "mnist" and got["seed"] == 1 and got["seeds"] == [1, 2, 3, 4]
    # one definition of the parameters: keywords or a GenerateParams, never both
    assert got["same"] and got["both"] == "refused"
    assert got["keywords"] == ["model", "n", "label", "seed", "temperature", "top_k", "top_p",
                               "cfg_scale", "grid", "prefix"]
    assert got["dtype"] == "int64" and got["sizes"] == [[28, 28]] * 4
    assert got["tokens"] == [im["tokens"] for im in answer["images"]]
    assert got["pngs"] == [im["png"] for im in answer["images"]]
    # the mosaic is the server's own PNG answer for n=4, pixel for pixel
    tiled = api(server, "POST", "/generate", json=body, headers={"Accept": "image/png"})
    assert np.array_equal(pixels(b64(got["mosaic"])), pixels(tiled.content))


ENCODE_DECODE = """
import base64, json, io
import numpy as np
from PIL import Image
from taming_client import TamingClient
png = open("digit.png", "rb").read()
im = Image.open(io.BytesIO(png)); im.load()
arr = np.asarray(im)
with TamingClient(URL, api_key=KEY) as c:
    grids = c.encode(["digit.png", png, im, arr, arr / 255.0, arr[:, :, None]], model="mnist")
    one = c.encode(png)
    images = c.decode(grids[:2], model="mnist")
    single = c.decode(grids[0].tolist())
print(json.dumps({"shape": list(grids.shape), "dtype": str(grids.dtype),
    "grids": grids.tolist(), "one": one.tolist(),
    "decoded": [np.asarray(i).tolist() for i in images],
    "single": np.asarray(single[0]).tolist(), "n_single": len(single)}))
"""


def test_encode_takes_paths_bytes_images_and_arrays_and_decode_inverts(client_env, server,
                                                                       tmp_path):
    seven = api(server, "POST", "/generate", json={"model": "mnist", "label": 7, "seed": 9},
                headers={"Accept": "image/png"}).content
    (tmp_path / "digit.png").write_bytes(seven)
    got = py(client_env, client_code(ENCODE_DECODE, server), tmp_path)
    expected = api(server, "POST", "/encode", params={"model": "mnist"},
                   files={"files": ("d.png", seven, "image/png")}).json()["tokens"][0]
    assert got["shape"] == [6, 7, 7] and got["dtype"] == "int64"
    assert got["grids"] == [expected] * 6  # every form of the same image: the same grid
    assert got["one"] == [expected]
    decoded = api(server, "POST", "/decode", json={"model": "mnist", "tokens": expected},
                  headers={"Accept": "image/png"}).content
    for image in (*got["decoded"], got["single"]):
        assert np.array_equal(np.asarray(image, dtype=np.uint8), pixels(decoded))
    assert got["n_single"] == 1


MODELS = """
import json, dataclasses
from taming_client import TamingClient
with TamingClient(URL, api_key=KEY) as c:
    listing = c.models()
    one = c.model("fashion-mnist")
print(json.dumps({"default": listing.default, "names": listing.names(),
    "models": [dataclasses.asdict(m) for m in listing], "one": dataclasses.asdict(one),
    "picked": listing["mnist"].name, "types": [type(m).__name__ for m in listing]}))
"""


def test_models_are_typed_and_complete(client_env, server, tmp_path):
    got = py(client_env, client_code(MODELS, server), tmp_path)
    answer = api(server, "GET", "/models").json()
    assert got["default"] == answer["default"]
    assert got["names"] == [m["name"] for m in answer["models"]]
    assert got["types"] == ["ModelInfo"] * len(answer["models"]) and got["picked"] == "mnist"
    for mine, theirs in zip(got["models"], answer["models"], strict=True):
        assert mine == theirs  # every field, the nested defaults included
    assert got["one"]["name"] == "fashion-mnist"
    assert got["one"]["defaults"] == next(m["defaults"] for m in answer["models"]
                                          if m["name"] == "fashion-mnist")


ERRORS = """
import json
from taming_client import TamingClient, TamingError
out = []
def attempt(fn):
    try:
        fn()
        out.append(None)
    except TamingError as e:
        out.append([e.status, e.code, e.message])
with TamingClient(URL, api_key=KEY) as c:
    attempt(lambda: c.generate(top_p=5))
    attempt(lambda: c.generate(model="nope"))
    attempt(lambda: c.decode([[999999]]))
with TamingClient(URL) as c:
    attempt(lambda: c.models())
with TamingClient(URL, api_key="wrong") as c:
    attempt(lambda: c.generate(seed=1))
with TamingClient("http://127.0.0.1:9", timeout=5) as c:
    attempt(lambda: c.models())
print(json.dumps(out))
"""


def test_errors_carry_the_servers_status_code_and_message(client_env, server, tmp_path):
    got = py(client_env, client_code(ERRORS, server), tmp_path)
    (s1, c1, m1), (s2, c2, m2), (s3, c3, m3), (s4, c4, _), (s5, c5, _), (s6, c6, m6) = got
    assert (s1, c1) == (422, "invalid_request") and "top_p" in m1
    assert s2 == 404 and "nope" in m2
    assert (s3, c3) == (422, "invalid_request") and "[0, 256)" in m3
    assert (s4, c4) == (401, "unauthorized") and (s5, c5) == (401, "unauthorized")
    assert s6 is None and c6 == "unreachable" and "127.0.0.1:9" in m6


ASYNC = """
import asyncio, base64, json
from taming_client import AsyncTamingClient
async def main():
    async with AsyncTamingClient(URL, api_key=KEY) as c:
        g, models = await asyncio.gather(c.generate(model="mnist", n=2, label=3, seed=5),
                                         c.models())
        grids = await c.encode(g.images)
        back = await c.decode(grids)
        events = [e async for e in c.stream(model="mnist", n=2, label=3, seed=5)]
    return {"pngs": [base64.b64encode(p).decode() for p in g.pngs],
            "tokens": [t.tolist() for t in g.tokens], "default": models.default,
            "grids": grids.tolist(), "back": len(back),
            "kinds": [type(e).__name__ for e in events],
            "final": [t.tolist() for t in events[-1].tokens]}
print(json.dumps(asyncio.run(main())))
"""


def test_the_async_client_answers_like_the_api(client_env, server, tmp_path):
    got = py(client_env, client_code(ASYNC, server), tmp_path)
    body = {"model": "mnist", "n": 2, "label": 3, "seed": 5}
    answer = api(server, "POST", "/generate", json=body,
                 headers={"Accept": "application/json"}).json()
    assert got["pngs"] == [im["png"] for im in answer["images"]]
    assert got["tokens"] == got["final"] == [im["tokens"] for im in answer["images"]]
    assert got["default"] == "mnist" and got["back"] == 2
    assert len(got["grids"]) == 2
    assert got["kinds"] == ["RowEvent"] * 14 + ["Generation"]


STREAM = """
import base64, io, json
import numpy as np
from taming_client import Generation, RowEvent, TamingClient
out = {"rows": [], "previews": [], "after_final": 0}
with TamingClient(URL, api_key=KEY) as c:
    for item in c.stream(**BODY):
        if "final" in out:
            out["after_final"] += 1
        if isinstance(item, RowEvent):
            out["rows"].append([item.image, item.row, item.tokens.tolist()])
            out["previews"].append(list(item.preview.size))
        else:
            assert isinstance(item, Generation)
            out["final"] = [t.tolist() for t in item.tokens]
            out["pngs"] = [base64.b64encode(p).decode() for p in item.pngs]
print(json.dumps(out))
"""


@pytest.mark.parametrize("grid", [None, [7, 9]])
def test_stream_gives_each_row_then_the_generation(client_env, server, tmp_path, grid):
    body = {"model": "mnist", "n": 2, "label": 1, "seed": 8}
    if grid:
        body["grid"] = grid
    got = py(client_env, f"BODY = {body!r}\n" + client_code(STREAM, server), tmp_path)
    answer = api(server, "POST", "/generate", json=body,
                 headers={"Accept": "application/json"}).json()
    assert got["after_final"] == 0  # the Generation comes last
    assert got["pngs"] == [im["png"] for im in answer["images"]]
    final = [im["tokens"] for im in answer["images"]]
    assert got["final"] == final
    rows, cols = grid or (7, 7)
    if grid and not got["rows"]:
        return  # the server streams the model's own grid; a wider one answers at once
    assert sorted((i, r) for i, r, _ in got["rows"]) == [(i, r) for i in range(2)
                                                         for r in range(rows)]
    for image, row, tokens in got["rows"]:
        assert tokens == final[image][row]  # a completed row never changes afterwards
    for i in range(2):  # each image's rows arrive in order
        assert [r for im, r, _ in got["rows"] if im == i] == list(range(rows))
    assert got["previews"] == [[cols * 4, rows * 4]] * (2 * rows)


# ---- the command line ---------------------------------------------------------------------
def taming(env_dir: Path, server: str, cwd: Path, *args: str, key: str | None = KEY,
           stdin: bytes | None = None) -> subprocess.CompletedProcess:
    environ = {"TAMING_URL": server}
    if key:
        environ["TAMING_API_KEY"] = key
    return run(env_dir, [str(env_dir / "bin" / "taming"), *args], cwd, stdin=stdin, **environ)


def test_cli_generate_writes_the_servers_image(client_env, server, tmp_path):
    done = taming(client_env, server, tmp_path, "generate", "--label", "7", "-n", "4",
                  "--seed", "1", "-o", "sevens.png", "--tokens", "t.json")
    assert done.returncode == 0, done.stderr
    assert b"sevens.png" in done.stdout and b"seeds 1-4" in done.stdout
    body = {"model": "mnist", "n": 4, "label": 7, "seed": 1}
    tiled = api(server, "POST", "/generate", json=body, headers={"Accept": "image/png"})
    assert np.array_equal(pixels((tmp_path / "sevens.png").read_bytes()), pixels(tiled.content))
    answer = api(server, "POST", "/generate", json=body,
                 headers={"Accept": "application/json"}).json()
    tokens = json.loads((tmp_path / "t.json").read_text())
    assert tokens["tokens"] == [im["tokens"] for im in answer["images"]]

    # every sampling option reaches the server; one image is written as the server sent it
    opts = {"model": "fashion-mnist", "label": "Sneaker", "seed": 3, "temperature": 0.8,
            "top_k": 40, "top_p": 0.9, "cfg_scale": 2.0, "grid": [7, 8]}
    done = taming(client_env, server, tmp_path, "generate", "--model", "fashion-mnist",
                  "--label", "Sneaker", "--seed", "3", "--temperature", "0.8", "--top-k", "40",
                  "--top-p", "0.9", "--cfg-scale", "2", "--grid", "7x8", "-o", "shoe.png")
    assert done.returncode == 0, done.stderr
    one = api(server, "POST", "/generate", json=opts, headers={"Accept": "image/png"})
    assert (tmp_path / "shoe.png").read_bytes() == one.content


def test_cli_stream_draws_rows_as_they_arrive(client_env, server, tmp_path):
    done = taming(client_env, server, tmp_path, "generate", "--label", "0", "-n", "2",
                  "--seed", "4", "--stream", "-o", "zeros.png")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 14  # 7 token rows x 4 pixel rows, two pixel rows per line
    assert all(len(line) == 28 + 2 + 28 for line in lines)  # two images side by side
    assert any(set(line) - {" "} for line in lines)  # the digits are drawn
    body = {"model": "mnist", "n": 2, "label": 0, "seed": 4}
    tiled = api(server, "POST", "/generate", json=body, headers={"Accept": "image/png"})
    assert np.array_equal(pixels((tmp_path / "zeros.png").read_bytes()), pixels(tiled.content))


def test_cli_encode_then_decode(client_env, server, tmp_path):
    pngs = [api(server, "POST", "/generate", json={"label": d, "seed": d},
                headers={"Accept": "image/png"}).content for d in (2, 5)]
    for i, png in enumerate(pngs):
        (tmp_path / f"{i}.png").write_bytes(png)
    done = taming(client_env, server, tmp_path, "encode", "0.png", "1.png")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    expected = api(server, "POST", "/encode", files=[
        ("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]).json()
    assert printed == expected  # {model, shape, tokens}, the server's own answer
    done = taming(client_env, server, tmp_path, "encode", "-", "-o", "tokens.json",
                  stdin=pngs[0])
    assert done.returncode == 0 and done.stdout == b""
    assert json.loads((tmp_path / "tokens.json").read_text())["tokens"] == expected["tokens"][:1]

    done = taming(client_env, server, tmp_path, "decode", "tokens.json", "-o", "out.png")
    assert done.returncode == 0, done.stderr
    decoded = api(server, "POST", "/decode", json={"tokens": expected["tokens"][0]},
                  headers={"Accept": "image/png"}).content
    assert np.array_equal(pixels((tmp_path / "out.png").read_bytes()), pixels(decoded))
    # piped: encode | decode, several images tiled as the server tiles them
    done = taming(client_env, server, tmp_path, "decode", "-", "-o", "both.png",
                  stdin=json.dumps(expected).encode())
    assert done.returncode == 0, done.stderr
    both = api(server, "POST", "/decode", json={"tokens": expected["tokens"]},
               headers={"Accept": "image/png"}).content
    assert np.array_equal(pixels((tmp_path / "both.png").read_bytes()), pixels(both))


def test_cli_models_and_errors(client_env, server, tmp_path):
    done = taming(client_env, server, tmp_path, "models")
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert "mnist (default)" in text and "Ankle boot" in text and "K=512" in text
    done = taming(client_env, server, tmp_path, "models", "--json")
    assert json.loads(done.stdout)["default"] == "mnist"

    done = taming(client_env, server, tmp_path, "generate", "--top-p", "5")
    assert done.returncode == 1 and not (tmp_path / "generated.png").exists()
    assert "top_p" in done.stderr.decode() and "422" in done.stderr.decode()
    done = taming(client_env, server, tmp_path, "models", key=None)
    assert done.returncode == 1 and "API key" in done.stderr.decode()
    done = taming(client_env, server, tmp_path, "models", "--api-key", KEY, key=None)
    assert done.returncode == 0
    done = taming(client_env, "http://127.0.0.1:9", tmp_path, "models")
    assert done.returncode == 1 and "cannot reach" in done.stderr.decode()
    done = taming(client_env, server, tmp_path, "decode", "missing.json")
    assert done.returncode == 1 and "missing.json" in done.stderr.decode()
    done = taming(client_env, server, tmp_path, "generate", "--grid", "seven")
    assert done.returncode == 2 and "ROWSxCOLS" in done.stderr.decode()


# ---- 503: retried after Retry-After within the budget -------------------------------------
OVERLOAD = """
import json, threading, time
from taming_client import TamingClient, TamingError
out = [None] * 4
def one(i):
    t0 = time.monotonic()
    try:
        with TamingClient(URL, retry_budget=BUDGET) as c:
            c.generate(n=8, grid=[14, 14], seed=i)
        out[i] = ["ok", time.monotonic() - t0]
    except TamingError as e:
        out[i] = [e.status, e.code, e.retry_after, time.monotonic() - t0]
threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""

DRAINING = """
import json, time
from taming_client import TamingClient, TamingError
t0 = time.monotonic()
try:
    with TamingClient(URL, retry_budget=BUDGET) as c:
        c.generate(seed=1)
    print(json.dumps(None))
except TamingError as e:
    print(json.dumps([e.status, e.code, e.retry_after, time.monotonic() - t0]))
"""


def rejected(base: str, reason: str) -> float:
    return metric(httpx.get(f"{base}/metrics").text, "taming_rejected_total", reason=reason)


def test_503_is_retried_after_retry_after_within_the_budget(client_env, tmp_path):
    proc, base = start_server(TAMING_CHECKPOINT_DIR=tiny_root(), TAMING_MODELS="mnist",
                              TAMING_GENERATE_SLOTS=1, TAMING_MAX_QUEUE=8,
                              TAMING_SHUTDOWN_GRACE_S=30)
    try:
        # four requests of 8 images at once, few images sampled at a time and a queue of 8
        # images (a request fits only an empty queue): while the first one's images wait,
        # the others are refused
        got = py(client_env, "BUDGET = 0\n" + client_code(OVERLOAD, base, None), tmp_path)
        refused = [r for r in got if r[0] != "ok"]
        assert refused, got
        assert all(r[:2] == [503, "overloaded"] and r[2] > 0 for r in refused), got
        # with a budget, every one gets through: the refused ones waited and tried again
        before = rejected(base, "queue_full")
        got = py(client_env, "BUDGET = 60\n" + client_code(OVERLOAD, base, None), tmp_path)
        assert all(r[0] == "ok" for r in got), got
        assert rejected(base, "queue_full") > before
        assert max(r[1] for r in got) >= refused[0][2]

        proc.send_signal(signal.SIGTERM)  # draining: every request gets 503 + Retry-After
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/readyz").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, code, wait, elapsed = py(
            client_env, "BUDGET = 0\n" + client_code(DRAINING, base, None), tmp_path)
        assert (status, code) == (503, "draining") and elapsed < wait
        # a budget of 2.5 waits: tried at 0, 1 and 2 waits, then gives up (3 would exceed it)
        before = rejected(base, "draining")
        status, code, _, elapsed = py(
            client_env, f"BUDGET = {2.5 * wait}\n" + client_code(DRAINING, base, None), tmp_path)
        assert (status, code) == (503, "draining")
        assert 2 * wait <= elapsed < 2.5 * wait
        assert rejected(base, "draining") - before == 3
    finally:
        stop(proc)
