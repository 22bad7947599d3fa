"""The paper's published models, imported and served, answer as the reference code does.

Tiny seeded models built from the paper's config structure with the reference
implementation (tests/taming_reference.py) are saved as taming log folders, imported with
`python -m training import-taming`, and served: through the HTTP API, /encode gives the
reference quantizer's tokens, /decode the reference decoder's pixels within one level, and
greedy /generate (top_k 1) the reference transformer's greedy grid, for an unconditional
model with a nearest-code tokenizer and a class-conditional one with a Gumbel tokenizer
(and first-stage-only folders of both tokenizers).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import taming_reference as ref
import torch
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import assert_error, png_array, png_of, settings

from service.app import create_app
from training.__main__ import main as training_main

JSON = {"Accept": "application/json"}
KINDS = ("vq", "gumbel", "uncond", "class")
CLASSES = [f"kind {i}" for i in range(10)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, the reference models by name): every kind imported through the CLI."""
    root = tmp_path_factory.mktemp("taming")
    models = {}
    for seed, kind in enumerate(KINDS):
        model = ref.tiny(kind, seed)
        log = ref.save_log_folder(model, root / "logs" / f"2020-11-09T13-31-51_{kind}")
        argv = ["import-taming", str(log), "--out", str(root / "checkpoints" / kind)]
        if kind == "class":
            names = root / "classes.txt"
            names.write_text("\n".join(CLASSES) + "\n")
            argv += ["--classes", str(names)]
        assert training_main(argv) == 0
        models[kind] = model
    s = settings(checkpoint_dir=root / "checkpoints", models=list(KINDS), default_model="uncond")
    with TestClient(create_app(s)) as client:
        yield client, models


def first_stage(model):
    return model if isinstance(model, ref.FirstStage) else model.first_stage_model


@pytest.mark.parametrize("kind", KINDS)
def test_encode_gives_the_reference_quantizer_tokens(served, kind):
    client, models = served
    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    files = [("files", (f"{i}.png", png_of(p), "image/png")) for i, p in enumerate(pixels)]
    r = client.post(f"/encode?model={kind}", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["shape"] == [8, 8]
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    expected = first_stage(models[kind]).codes(x)
    assert len(expected.unique()) > 4  # a test that many codes could fail
    assert r.json()["tokens"] == expected.tolist()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(8, 8), (8, 12)])
def test_decode_gives_the_reference_decoder_pixels(served, kind, shape):
    client, models = served
    ids = torch.randint(0, ref.N_EMBED, (2, *shape), generator=torch.Generator().manual_seed(2))
    r = client.post("/decode", json={"model": kind, "tokens": ids.tolist()}, headers=JSON)
    assert r.status_code == 200, r.text
    ours = np.stack([png_array(base64.b64decode(im["png"])) for im in r.json()["images"]])
    theirs = first_stage(models[kind]).pixels(ids).numpy()
    assert ours.shape == theirs.shape == (2, shape[0] * 4, shape[1] * 4, 3)
    assert np.abs(ours.astype(np.float64) - theirs).max() <= 1.0
    assert ours.std() > 10  # not a flat image


@pytest.mark.parametrize("kind,label", [("uncond", None), ("class", 7), ("class", 2)])
def test_greedy_generate_is_the_reference_greedy_grid(served, kind, label):
    client, models = served
    body = {"model": kind, "top_k": 1, "seed": 11}
    if label is not None:
        body["label"] = CLASSES[label]
    r = client.post("/generate", json=body, headers=JSON)
    assert r.status_code == 200, r.text
    tokens = r.json()["images"][0]["tokens"]
    cond = models[kind].sos_token if label is None else label
    expected = models[kind].greedy(cond, 64).view(8, 8)
    assert tokens == expected.tolist()
    # and the image is the reference decoder's picture of that grid
    image = png_array(base64.b64decode(r.json()["images"][0]["png"]))
    theirs = models[kind].first_stage_model.pixels(expected[None]).numpy()[0]
    assert np.abs(image.astype(np.float64) - theirs).max() <= 1.0


def test_greedy_grid_streams_and_answers_alike_on_every_route(served):
    """SSE rows, the OpenAI Images route and the Open Inference Protocol give the grid and
    picture of /generate."""
    client, models = served
    body = {"model": "class", "label": 7, "top_k": 1, "seed": 3}
    plain = client.post("/generate", json=body, headers=JSON).json()["images"][0]
    rows, done = [], None
    with client.stream("POST", "/generate", json=body, headers={"Accept": "text/event-stream"}) as s:
        assert s.status_code == 200
        event = None
        for line in s.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "row":
                rows.append(json.loads(line[6:])["tokens"])
            elif line.startswith("data: ") and event == "done":
                done = json.loads(line[6:])
    assert rows == plain["tokens"] and done["images"][0]["tokens"] == plain["tokens"]

    r = client.post("/v1/images/generations", json={"model": "class", "prompt": CLASSES[7],
                                                    "top_k": 1, "seed": 3})
    assert r.status_code == 200, r.text
    assert np.array_equal(png_array(base64.b64decode(r.json()["data"][0]["b64_json"])),
                          png_array(base64.b64decode(plain["png"])))

    v2 = {"inputs": [{"name": "LABEL", "shape": [1], "datatype": "INT64", "data": [7]},
                     {"name": "SEED", "shape": [1], "datatype": "INT64", "data": [3]}],
          "parameters": {"top_k": 1}}
    r = client.post("/v2/models/class-generate/infer", json=v2)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["TOKENS"]["data"] == sum(plain["tokens"], [])


def test_sampled_generation_follows_the_seed(served):
    """At the paper's defaults (top-k, top-p) a seed gives one picture, another seed another."""
    client, _ = served
    a, b, c = (client.post("/generate", json={"model": "uncond", "seed": s}, headers=JSON)
               .json()["images"][0]["tokens"] for s in (5, 5, 6))
    assert a == b and a != c


def test_what_the_paper_models_cannot_do_is_a_clear_422(served):
    client, _ = served
    for kind in ("vq", "gumbel"):
        e = assert_error(client.post("/generate", json={"model": kind}), 422, "generator_unavailable")
        assert "/encode" in e["message"]
    e = assert_error(client.post("/generate", json={"model": "class"}), 422, "invalid_request")
    assert "name one" in e["message"]
    e = assert_error(client.post("/generate", json={"model": "class", "label": 1, "cfg_scale": 3}),
                     422, "guidance_unavailable")
    assert "null class" in e["message"]
    assert_error(client.post("/generate", json={"model": "uncond", "cfg_scale": 2}), 422,
                 "guidance_unavailable")
    assert_error(client.post("/generate", json={"model": "uncond", "label": 0}), 422,
                 "invalid_request")
    assert_error(client.post("/decode", json={"model": "vq", "tokens": [[ref.N_EMBED]]}), 422)


def test_models_lists_the_imported_models(served):
    client, _ = served
    listed = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(listed) == set(KINDS)
    assert [listed[k]["can_generate"] for k in KINDS] == [False, False, True, True]
    cls = listed["class"]
    assert cls["classes"] == CLASSES and cls["n_classes"] == 10
    assert not cls["unconditional"] and not cls["guidance"]
    assert listed["uncond"]["unconditional"] and not listed["uncond"]["guidance"]
    assert cls["defaults"] == {"temperature": 1.0, "top_k": ref.N_EMBED, "top_p": 0.92,
                               "cfg_scale": 1.0}
    assert listed["uncond"]["defaults"]["top_p"] == 1.0
    assert cls["grid"] == [8, 8] and cls["image_size"] == [32, 32] and cls["channels"] == 3
    assert cls["dataset"] == "taming.data.imagenet.ImageNetTrain"


def test_encode_then_decode_through_the_paper_tokenizer(served):
    """A picture's tokens decode to the reference decoder's picture of those tokens."""
    client, models = served
    im = Image.new("RGB", (32, 32), (200, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    tokens = client.post("/encode?model=gumbel", content=buf.getvalue(),
                         headers={"Content-Type": "image/png"}).json()["tokens"]
    r = client.post("/decode", json={"model": "gumbel", "tokens": tokens})
    assert r.status_code == 200
    theirs = models["gumbel"].pixels(torch.tensor(tokens)).numpy()[0]
    assert np.abs(png_array(r.content).astype(np.float64) - theirs).max() <= 1.0


def test_a_wider_canvas_slides_the_paper_window(served):
    """Beyond the training grid an absolute-position model samples with the paper's
    re-forwarding window: the cells whose window is the training grid's own corner (row 0,
    columns 0..4 of an 8x8 window) are the reference's greedy ones."""
    client, models = served
    r = client.post("/generate", json={"model": "uncond", "top_k": 1, "grid": [8, 10]},
                    headers=JSON)
    assert r.status_code == 200, r.text
    tokens = r.json()["images"][0]["tokens"]
    assert len(tokens) == 8 and all(len(row) == 10 for row in tokens)
    expected = models["uncond"].greedy(models["uncond"].sos_token, 64).view(8, 8)
    assert tokens[0][:5] == expected[0, :5].tolist()
