"""The memory a checkpoint needs, counted before loading, and the start-up check against
the device's free memory."""

from __future__ import annotations

import pytest
from service_helpers import settings, tiny_root

from models.checkpoint import CheckpointError, load_bundle, read_config
from models.footprint import HEADROOM, footprint
from service import registry


def test_the_count_is_the_loaded_models_bytes():
    folder = tiny_root() / "mnist"
    need = footprint(read_config(folder))
    b = load_bundle(folder)
    tensors = [*b.vqvae.parameters(), *b.vqvae.buffers(), *b.gpt.parameters(), *b.gpt.buffers()]
    assert need.weights_bytes == sum(t.numel() * t.element_size() for t in tensors)
    c = b.gpt.config
    assert need.kv_bytes_per_row == 2 * c.n_layer * c.seq_len * c.d_model * 4
    assert footprint(read_config(tiny_root() / "tokenizer-only")).kv_bytes_per_row == 0


def test_slots_are_cut_to_what_fits_and_a_model_that_cannot_fit_is_refused(monkeypatch):
    need = footprint(read_config(tiny_root() / "mnist"))
    room = (need.weights_bytes + 3 * 2 * need.kv_bytes_per_row) / HEADROOM + 1
    monkeypatch.setattr(registry, "free_bytes", lambda device: room)
    s = settings(checkpoint_dir=tiny_root(), models=["mnist"], generate_slots=64)
    entry = registry.load_models(s)["mnist"]
    assert entry.slots == 3
    assert entry.info["memory"] == {"weights_bytes": need.weights_bytes, "slots": 3,
                                    "kv_cache_bytes": 6 * need.kv_bytes_per_row,
                                    "total_bytes": need.total(3)}
    monkeypatch.setattr(registry, "free_bytes", lambda device: need.weights_bytes)
    with pytest.raises(CheckpointError, match=r"mnist: needs .* GiB .* but cpu has .* free"):
        registry.load_models(s)


def test_unknown_free_memory_keeps_the_setting(monkeypatch):
    monkeypatch.setattr(registry, "free_bytes", lambda device: None)
    s = settings(checkpoint_dir=tiny_root(), models=["mnist", "tokenizer-only"], generate_slots=5)
    models = registry.load_models(s)
    assert models["mnist"].slots == 5 and models["tokenizer-only"].slots == 0
    assert models["tokenizer-only"].info["memory"]["kv_cache_bytes"] == 0
