"""Int8 transformer weights: close to float32, and still batch-invariant."""

import pytest
import torch

from models.gpt import GPT, GPTConfig
from models.quantize import Int8Linear, quantize
from models.sampling import make_batch, reference_generate
from models.slots import SlotSampler, compiled_steps, generate


def _gpt(positions: str = "absolute") -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(codebook_size=64, n_classes=3, grid=(4, 5), window=(3, 5), n_layer=2,
                    n_head=4, d_model=64, dropout=0.0, positions=positions)
    return GPT(cfg).eval()


def test_int8_linear_is_close_to_float32_and_exact_per_row():
    torch.manual_seed(1)
    lin = torch.nn.Linear(100, 37)  # no multiple of 8 anywhere
    q = Int8Linear(lin)
    x = torch.randn(3, 5, 100)
    want = lin(x)
    got = q(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    # a row's answer does not depend on the rows beside it (per-row input scales)
    assert torch.equal(q(x[1:2, 2:3]), got[1:2, 2:3])


@pytest.mark.parametrize("positions", ["absolute", "relative"])
def test_int8_transformer_logits_stay_near_float32(positions):
    gpt = _gpt(positions)
    q = quantize(gpt, "int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert any(isinstance(m, torch.nn.Linear) for m in gpt.modules())  # a copy: gpt untouched
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = gpt(ids)[0], q(ids)[0]
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_int8_step_engine_picks_the_reference_codes_in_any_company():
    q = quantize(_gpt(), "int8")
    cfg = q.config
    batch = make_batch(cfg, 4, cfg.grid, label=1, top_k=20, cfg_scale=2.0,
                       generator=torch.Generator().manual_seed(3))
    want = reference_generate(q, batch)  # one image at a time, whole re-forwards
    assert torch.equal(generate(q, batch), want)
    sampler = SlotSampler(q, 8)  # the traced step over a quantized model
    run = compiled_steps(sampler)
    sampler.admit([0, 1], [2, 3], batch.rows(0, 2), cfg.null_class)
    for _ in range(cfg.seq_len):
        run(8)
    assert torch.equal(sampler.out[:2], want[:2])


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize(_gpt(), "int3")
