"""The transformer: window convention, id layout, relative positions."""

import pytest
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


def _relative(n_layer: int) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(codebook_size=16, n_classes=0, grid=(4, 6), window=(2, 3), n_layer=n_layer,
                    d_model=32, n_head=4, dropout=0.0, positions="relative")
    m = GPT(cfg).eval()
    with torch.no_grad():
        m.rel_bias.normal_(0, 1.0)
    return m


def test_relative_positions_predict_a_cell_from_its_window_wherever_the_crop_sits():
    # one layer: a cell's logits depend on its window alone, so two crops of one canvas that
    # both hold a cell's window give it the same logits, at different places in the crop
    m = _relative(1)
    canvas = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(1))
    start = torch.tensor([m.config.null_class])

    def logits(crop: torch.Tensor) -> torch.Tensor:
        seq = torch.cat([start, crop.flatten()[:-1]])[None]
        with torch.no_grad():
            return m(seq)[0][0].view(4, 6, -1)

    a, b = logits(canvas[:, :6]), logits(canvas[:, 2:])
    # canvas column 4 is column 4 of crop a, column 2 of crop b; its window spans 3..5
    assert torch.allclose(a[1:, 4], b[1:, 2], atol=1e-5)
    assert not torch.allclose(a[1:, 4], a[1:, 3], atol=1e-3)  # and the test can tell cells apart


@pytest.mark.parametrize("positions", ["absolute", "relative"])
def test_relative_model_has_no_absolute_embeddings(positions):
    cfg = GPTConfig(codebook_size=16, n_classes=2, grid=(2, 3), window=(2, 3), n_layer=1,
                    d_model=16, n_head=2, positions=positions)
    names = {n for n, _ in GPT(cfg).named_parameters()}
    assert ("row_emb.weight" in names) == (positions == "absolute")
    assert ("rel_bias" in names) == (positions == "relative")


def test_unknown_positions_are_refused():
    with pytest.raises(ValueError, match="positions"):
        GPTConfig(positions="rope")
