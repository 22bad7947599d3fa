"""Checkpoint folders: identical outputs after a round trip, clear errors naming the file."""

import json

import pytest
import torch

from models.checkpoint import CheckpointError, load_bundle, save_gpt, save_vqvae
from models.gpt import GPT, GPTConfig
from models.vqvae import VQVAE, VQVAEConfig


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(widths=(8, 16, 16), codebook_size=16, code_dim=4)).eval()
    gpt = GPT(GPTConfig(codebook_size=16, n_classes=3, grid=(7, 7), n_layer=1, d_model=32, n_head=2)).eval()
    f = tmp_path / "tiny"
    save_vqvae(f, vq, {"name": "tiny", "dataset": "mnist", "classes": ["a", "b", "c"]})
    save_gpt(f, gpt)
    return f, vq, gpt


def test_round_trip_gives_identical_outputs(folder):
    f, vq, gpt = folder
    b = load_bundle(f)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(b.vqvae.encode(x), vq.encode(x))
    t = torch.randint(0, 16, (2, 7, 7))
    assert torch.equal(b.vqvae.decode(t), vq.decode(t))
    idx = torch.randint(0, 16, (2, 49))
    assert torch.equal(b.gpt(idx)[0], gpt(idx)[0])
    assert b.digest.startswith("sha256:") and b.classes == ["a", "b", "c"]


def test_no_pickle_files_written(folder):
    f, _, _ = folder
    assert sorted(p.name for p in f.iterdir()) == ["config.json", "transformer.safetensors",
                                                    "vqvae.safetensors"]


def test_truncated_weights_name_the_file(folder):
    f, _, _ = folder
    data = (f / "vqvae.safetensors").read_bytes()
    (f / "vqvae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"vqvae\.safetensors"):
        load_bundle(f)


def test_garbage_weights_name_the_file(folder):
    f, _, _ = folder
    (f / "transformer.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"transformer\.safetensors"):
        load_bundle(f)


def test_mismatched_config_names_the_file(folder):
    f, _, _ = folder
    cfg = json.loads((f / "config.json").read_text())
    cfg["vqvae"]["codebook_size"] = 32
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"vqvae\.safetensors.*shape"):
        load_bundle(f)


def test_bad_json_and_missing_files(folder, tmp_path):
    f, _, _ = folder
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_bundle(tmp_path / "absent")
    (f / "transformer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"transformer\.safetensors: missing"):
        load_bundle(f)
    (f / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_bundle(f)


def test_shipped_checkpoints_load_and_are_small(root):
    for name in ("mnist", "fashion-mnist"):
        f = root / "checkpoints" / name
        b = load_bundle(f, require_gpt=True)
        assert b.vqvae.config.grid == (7, 7)
        assert (f / "vqvae.safetensors").stat().st_size < 5_000_000
        assert (f / "transformer.safetensors").stat().st_size < 20_000_000
        ev = b.config["evaluation"]
        assert ev["vqvae"]["code_usage"] >= 0.9
        assert ev["vqvae"]["psnr_db"] >= (21 if name == "fashion-mnist" else 20)


@pytest.mark.slow
def test_loading_and_serving_never_unpickle(root, monkeypatch):
    """Every unpickling entry point raises: the shipped models still load and answer."""
    import pickle

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    def refuse(*a, **k):
        raise AssertionError("pickle was used")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, refuse)
    for name in ("mnist", "fashion-mnist"):
        assert load_bundle(root / "checkpoints" / name).gpt is not None
    app = create_app(Settings(checkpoint_dir=root / "checkpoints", torch_threads=1))
    with TestClient(app) as client:
        assert client.post("/generate", json={"seed": 1, "model": "fashion-mnist"}).status_code == 200
