"""Colour and other sizes end to end: both training commands on a tiny RGB folder of non-square
images and on a folder of photographs cut into crops, then the trained checkpoints served
(generate, encode, decode, the stream) and judged (evaluate-scenes)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import png_array, settings
from training_helpers import run_training as run

from service.app import create_app
from training.photos import landscape_list

TINY_VQ = ["--widths", "8,16,16", "--codebook-size", "16", "--code-dim", "4", "--batch-size", "16"]
TINY_GPT = ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--batch-size", "16"]


def _photographs() -> list[Image.Image]:
    """Real photographs (the landscapes data set's, which `make data` installs)."""
    rows = [f for _, f, _ in landscape_list() if f.is_file()]
    if len(rows) < 4:
        pytest.fail("the landscapes photographs are missing: run `make data`")
    out = []
    for f in rows[:4]:
        with Image.open(f) as im:
            im.draft("RGB", (400, 300))
            out.append(im.convert("RGB").resize((200, 120)))
    return out


def _serve_and_call(checkpoint, size: tuple[int, int]) -> None:
    """Serve one trained checkpoint; every endpoint answers in colour at its size."""
    app = create_app(settings(checkpoint_dir=checkpoint.parent, models=[checkpoint.name]))
    with TestClient(app) as client:
        info = client.get(f"/models/{checkpoint.name}").json()
        assert info["channels"] == 3
        r = client.post("/generate", json={"model": checkpoint.name, "seed": 3},
                        headers={"Accept": "application/json"})
        assert r.status_code == 200, r.text
        image = r.json()["images"][0]
        pixels = png_array(base64.b64decode(image["png"]))
        assert pixels.shape == (*size, 3)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        enc = client.post(f"/encode?model={checkpoint.name}", content=buf.getvalue(),
                          headers={"content-type": "image/png"})
        assert enc.status_code == 200, enc.text
        assert np.array(enc.json()["tokens"]).shape[-2:] == np.array(image["tokens"]).shape
        dec = client.post("/decode", json={"model": checkpoint.name, "tokens": image["tokens"]})
        assert dec.status_code == 200 and np.array_equal(png_array(dec.content), pixels)
        with client.stream("POST", "/generate", json={"model": checkpoint.name, "seed": 3},
                           headers={"Accept": "text/event-stream"}) as s:
            assert s.status_code == 200
            lines = [line for line in s.iter_lines() if line.startswith("event: ")]
        rows = len(image["tokens"])
        assert lines == ["event: row"] * rows + ["event: done"]


@pytest.mark.slow
def test_rgb_folder_of_non_square_images_trains_and_serves(root, tmp_path):
    data = tmp_path / "rgb"
    for k, photo in enumerate(_photographs()):
        for cls, box in (("left", (0, 0, 100, 60)), ("right", (100, 60, 200, 120))):
            (data / cls).mkdir(parents=True, exist_ok=True)
            for j in range(5):  # 40x24: non-square, a multiple of the tokenizer's 4
                part = photo.crop(box).resize((40 + j, 24 + j)).resize((40, 24))
                part.save(data / cls / f"{k}-{j}.png")
    ck = tmp_path / "ck" / "colours"
    out = run(root, "vqvae", "--dataset", f"folder:{data}", "--out", str(ck), "--run-dir",
              str(tmp_path / "vq"), "--epochs", "1", *TINY_VQ)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Image.open(tmp_path / "vq" / "recon_epoch001.png").mode == "RGB"
    out = run(root, "transformer", "--checkpoint", str(ck), "--run-dir", str(tmp_path / "gpt"),
              "--epochs", "1", "--window", "3,5", *TINY_GPT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Image.open(tmp_path / "gpt" / "samples_epoch001.png").mode == "RGB"
    _serve_and_call(ck, (24, 40))


@pytest.mark.slow
def test_photo_crops_train_with_relative_positions_and_are_judged(root, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for k, photo in enumerate(_photographs()):
        photo.save(photos / f"p{k}.jpg")
    ck = tmp_path / "ck" / "scenes"
    out = run(root, "vqvae", "--dataset", f"crops:{photos}", "--crop-size", "16", "--image-size",
              "32", "--crops", "64", "--out", str(ck), "--run-dir", str(tmp_path / "vq"),
              "--epochs", "1", *TINY_VQ)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["vqvae"]["image_size"] == [32, 32]  # serves larger than it trained on
    assert cfg["training"]["vqvae"]["train_crop"] == [16, 16]
    out = run(root, "transformer", "--checkpoint", str(ck), "--run-dir", str(tmp_path / "gpt"),
              "--epochs", "1", "--crops", "64", "--window", "3,5", "--positions", "relative",
              "--unconditional", *TINY_GPT)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["transformer"]["positions"] == "relative" and cfg["transformer"]["n_classes"] == 0
    assert cfg["classes"] == [] and cfg["training"]["transformer"]["streamed_crops"] is True
    out = run(root, "evaluate-scenes", "--checkpoint", str(ck), "--images", "64")
    assert out.returncode == 0, out.stderr[-2000:]
    ev = json.loads((ck / "config.json").read_text())["evaluation"]["scenes"]
    floor = ev["swd_floor"]["mean"]
    # a blurred crop is farther from real crops than other real crops are; an untrained
    # model's samples farther still; crops of the other (training) photographs are farther
    # than the held-out photographs' own crops
    assert 0 < floor < ev["swd_blur"]["mean"] and ev["ratio_samples"] > 1
    assert ev["swd_training_crops"]["mean"] > floor
    assert ev["ratio_training_crops"] == round(ev["swd_training_crops"]["mean"] / floor, 2)
    assert 0 < ev["tokenizer"]["code_usage"] <= 1
    _serve_and_call(ck, (32, 32))
