"""The paper's minGPT as a GPTConfig: a shared vocabulary and one position embedding per
position of the sequence (the equality with the reference is proven through the API in
tests/service/test_taming_import.py)."""

from __future__ import annotations

import pytest
import torch

from models.gpt import GPT, GPTConfig


def paper(**kw) -> GPTConfig:
    base = dict(codebook_size=16, n_classes=0, grid=(3, 3), window=(3, 5), n_layer=1,
                n_head=2, d_model=16, dropout=0.0, positions="sequence", vocabulary="shared")
    return GPTConfig(**{**base, **kw})


def test_a_shared_vocabulary_holds_codes_only():
    cls = paper(n_classes=10)
    assert cls.vocab_size == 16 and cls.class_token(7) == 7
    assert not cls.unconditional and not cls.guidance
    sos = paper(start_token=5)
    assert sos.class_token(None) == sos.null_class == 5 and sos.unconditional
    own = GPTConfig()
    assert own.unconditional and own.guidance and own.class_token(None) == own.null_class


@pytest.mark.parametrize("kw", [{"n_classes": 17}, {"start_token": 16}, {"vocabulary": "x"},
                                {"positions": "x"}])
def test_configs_that_cannot_be_built(kw):
    with pytest.raises(ValueError):
        paper(**kw)


def test_sequence_positions_are_one_embedding_per_position():
    torch.manual_seed(0)
    gpt = GPT(paper()).eval()
    assert gpt.pos_emb.weight.shape == (9, 16) and not hasattr(gpt, "row_emb")
    idx = torch.tensor([[3, 1, 2]])
    x = gpt.embed(idx, torch.arange(3))
    assert torch.allclose(x, gpt.tok_emb(idx) + gpt.pos_emb.weight[:3])
