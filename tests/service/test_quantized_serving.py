"""TAMING_QUANTIZE: a shipped model served with int8 weights on CPU, through the HTTP API."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from service_helpers import live_server, serving_models, settings

from models.checkpoint import CheckpointError, load_bundle
from models.quantize import quantize
from models.sampling import make_batch, reference_generate
from service.app import create_app
from service.registry import load_models

JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def server():
    app = create_app(settings(**serving_models("mnist", "fashion-mnist"),
                              quantize=["mnist=int8"]))
    with live_server(app) as base:
        yield base


def test_models_report_which_transformer_is_int8(server):
    info = {m["name"]: m for m in httpx.get(f"{server}/models").json()["models"]}
    assert info["mnist"]["quantization"] == "int8"
    assert info["fashion-mnist"]["quantization"] is None


def test_seeded_int8_images_are_the_int8_reference_in_any_company(server):
    asks = [{"model": "mnist", "label": i % 10, "seed": 100 + i, "n": 1 + i % 2,
             **({"top_k": 30} if i % 3 else {"cfg_scale": 2.0})} for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda a: httpx.post(f"{server}/generate", json=a, headers=JSON,
                                                     timeout=120), asks))
    bundle = load_bundle(Path(serving_models("mnist")["checkpoint_dir"]) / "mnist")
    int8 = quantize(bundle.gpt, "int8")
    defaults = httpx.get(f"{server}/models/mnist").json()["defaults"]
    cfg = int8.config
    differs = 0
    for ask, r in zip(asks, answers, strict=True):
        assert r.status_code == 200, r.text
        for i, image in enumerate(r.json()["images"]):
            kw = {**defaults, **{k: v for k, v in ask.items() if k not in ("seed", "n", "model")}}
            batch = make_batch(cfg, 1, cfg.grid, generator=torch.Generator().manual_seed(
                ask["seed"] + i), **kw)
            assert image["tokens"] == reference_generate(int8, batch)[0].view(cfg.grid).tolist()
            differs += image["tokens"] != reference_generate(bundle.gpt, batch)[0].view(
                cfg.grid).tolist()
    assert differs, "the served codes should be int8's, which differ from float32's somewhere"


@pytest.mark.parametrize("value", ["mnist", "mnist=int3", "=int8"])
def test_a_bad_quantize_setting_stops_start_up(value):
    with pytest.raises(CheckpointError, match="TAMING_QUANTIZE"):
        load_models(settings(**serving_models("mnist"), quantize=[value]))
