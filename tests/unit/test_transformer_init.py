"""`transformer --init`: a class-conditional model started from an unconditional one keeps its
weights and, before any training, predicts exactly as it does for every class."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from models.checkpoint import save_gpt, write_config
from models.gpt import GPT, GPTConfig
from training.generator import init_from

K = 256  # the mnist tokenizer's codebook, which the source checkpoint carries


def _config(n_classes: int, **kw) -> GPTConfig:
    base = dict(codebook_size=K, n_classes=n_classes, grid=(7, 7), window=(2, 3), n_layer=1,
                n_head=2, d_model=16, dropout=0.0, positions="relative")
    base.update(kw)
    return GPTConfig(**base)


@pytest.fixture
def source(tmp_path, root):
    """A checkpoint folder: the mnist tokenizer's files and an unconditional transformer."""
    folder = tmp_path / "src"
    folder.mkdir()
    for name in ("config.json", "vqvae.safetensors"):
        shutil.copy(root / "checkpoints" / "mnist" / name, folder / name)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("transformer", None)
    write_config(folder, cfg)
    torch.manual_seed(0)
    model = GPT(_config(0))
    save_gpt(folder, model, {"classes": []})
    return folder, model


def test_new_classes_start_as_the_null_class(source):
    folder, src = source
    model = GPT(_config(3))
    info = init_from(model, folder)
    assert info["classes_before"] == 0
    codes = torch.randint(0, K, (2, 49))
    src.eval()
    model.eval()
    with torch.no_grad():
        ref, _ = src(src.training_inputs(codes, torch.full((2,), src.config.null_class)))
        for c in range(3):
            out, _ = model(model.training_inputs(codes, torch.full((2,), K + c)))
            torch.testing.assert_close(out, ref)
        out, _ = model(model.training_inputs(codes, torch.full((2,), model.config.null_class)))
        torch.testing.assert_close(out, ref)


def test_refuses_another_shape(source):
    folder, _ = source
    with pytest.raises(SystemExit, match="d_model"):
        init_from(GPT(_config(3, d_model=32)), folder)
