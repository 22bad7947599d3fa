"""Encode-then-decode over HTTP on real test images reaches the model card's PSNR.

Needs the shipped tokenizer (checkpoints/NAME/vqvae.safetensors) and the data set; the card
value is config.json's evaluation.vqvae.psnr_db, measured on the same held-out split.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import REAL, settings

from models.checkpoint import read_config
from service.app import create_app

LIMIT = {"mnist": 500, "fashion-mnist": 640}  # held-out images sent (mnist: its whole split)
BATCH = 64


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2))
    return 10 * math.log10(1.0 / mse)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_encode_decode_round_trip_reaches_the_card_psnr(name):
    folder = REAL / name
    if not (folder / "vqvae.safetensors").is_file():
        pytest.skip(f"no shipped tokenizer in {folder}")
    data_mod = pytest.importorskip("training.data")
    cfg = read_config(folder)
    try:
        test = data_mod.load_dataset(cfg["dataset"]).test
    except data_mod.DatasetError as e:
        pytest.skip(str(e))
    images = test.images[: LIMIT[name]].numpy()  # (N, C, H, W) uint8
    s = settings(checkpoint_dir=REAL, models=[name], max_images=BATCH)
    with TestClient(create_app(s)) as client:
        vq = client.app.state.service.models[name].bundle.vqvae
        grids, decoded = [], []
        for i in range(0, len(images), BATCH):
            chunk = images[i: i + BATCH]
            files = []
            for j, im in enumerate(chunk):
                buf = io.BytesIO()
                Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)).save(
                    buf, format="PNG")
                files.append(("files", (f"{i + j}.png", buf.getvalue(), "image/png")))
            r = client.post(f"/encode?model={name}", files=files)
            assert r.status_code == 200, r.text
            tokens = r.json()["tokens"]
            grids += tokens
            r = client.post("/decode", json={"model": name, "tokens": tokens},
                            headers={"Accept": "application/json"})
            assert r.status_code == 200, r.text
            for im in r.json()["images"]:
                decoded.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(im["png"])))))
    out = np.stack(decoded)
    if out.ndim == 3:
        out = out[:, None]
    else:
        out = out.transpose(0, 3, 1, 2)
    served = _psnr(images, out)
    # the server's tokens are the tokenizer's own, and its pixels lose only the uint8 rounding
    with torch.inference_mode():
        x = torch.from_numpy(images).float() / 255
        codes = vq.encode(x)
        assert codes.tolist() == grids
        local = 10 * math.log10(1.0 / float(((vq.decode(codes) - x) ** 2).mean()))
    assert abs(served - local) < 0.2, (served, local)
    card = (cfg.get("evaluation") or {}).get("vqvae", {}).get("psnr_db")
    if card is None:
        pytest.skip(f"served PSNR {served:.2f} dB; the card has no evaluation yet")
    print(f"{name}: served PSNR {served:.2f} dB, in-process {local:.2f} dB, card {card:.2f} dB")
    assert served >= card - 1.0, (served, card)
    assert abs(served - card) < 1.0, (served, card)
