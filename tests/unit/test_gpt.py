"""The transformer: window convention, id layout, cached forward == full forward."""

import torch

from models.gpt import GPT, GPTConfig, window_mask


def test_window_mask_convention():
    # grid 3x3, window 2 rows x 3 columns: position p predicts cell p, key q holds cell q-1
    m = window_mask((3, 3), (2, 3))
    assert m[:, 0].all()  # class token always visible
    assert m.diagonal().all()  # each position sees itself
    assert not torch.triu(m, diagonal=1).any()  # never the future
    # query 4 predicts cell (1,1); keys 1..3 hold (0,0),(0,1),(0,2): all within 1 row, |dc|<=1
    assert m[4, 1:5].tolist() == [True, True, True, True]
    # query 2 predicts cell (0,2); key 1 holds (0,0): two columns away -> hidden
    assert not m[2, 1]
    # query 7 predicts cell (2,1); key 3 holds (0,2): two rows up -> hidden (window has 2 rows)
    assert not m[7, 3]
    assert m[7, 5] and m[7, 6]  # (1,1) and (1,2) visible


def test_full_window_is_causal():
    m = window_mask((4, 5), (4, 9))
    assert torch.equal(m, torch.tril(torch.ones(20, 20, dtype=torch.bool)))


def test_ids_never_collide_and_head_predicts_codes_only():
    cfg = GPTConfig(codebook_size=16, n_classes=3, grid=(2, 2), n_layer=1, d_model=16, n_head=2)
    ids = {cfg.class_token(c) for c in range(3)} | {cfg.null_class}
    assert min(ids) == 16 and len(ids) == 4 and cfg.vocab_size == 20
    logits, _ = GPT(cfg)(torch.tensor([[cfg.null_class, 1, 2, 3]]))
    assert logits.shape == (1, 4, 16)
