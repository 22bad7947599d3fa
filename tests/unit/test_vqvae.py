"""The tokenizer: quantizer mechanics and encode/decode shapes."""

import pytest
import torch

from models.images import to_pixels
from models.vqvae import VQVAE, FrozenTokenizer, VectorQuantizer, VQVAEConfig


def small_cfg(**kw) -> VQVAEConfig:
    base = dict(widths=(8, 16, 16), codebook_size=16, code_dim=4)
    base.update(kw)
    return VQVAEConfig(**base)


def test_nearest_code_matches_brute_force():
    torch.manual_seed(0)
    q = VectorQuantizer(small_cfg(codebook_size=37, code_dim=5))
    flat = torch.randn(300, 5)
    brute = torch.stack([((q.embed - v) ** 2).sum(1).argmin() for v in flat])
    assert torch.equal(q.nearest(flat), brute)


@pytest.mark.parametrize("mode", ["ema", "plain"])
def test_straight_through_gradient_reaches_encoder(mode):
    torch.manual_seed(0)
    m = VQVAE(small_cfg(quantizer=mode)).train()
    recon, codes, qloss, _ = m(torch.rand(4, 1, 28, 28))
    (recon.mean() + qloss).backward()
    g = m.encoder.net[0].weight.grad
    assert g is not None and g.abs().sum() > 0


def test_commitment_weight_is_on_the_encoder_term():
    """beta scales the encoder's pull toward the codes; the codebook term has weight 1."""
    torch.manual_seed(0)
    for beta in (0.25, 1.0):
        q = VectorQuantizer(small_cfg(quantizer="plain", beta=beta)).train()
        z = torch.randn(2, 4, 3, 3, requires_grad=True)
        _, codes, loss, _ = q(z)
        loss.backward()
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
        e = q.embed.detach()[codes.flatten()]
        expected_z_grad = beta * 2 * (flat - e) / flat.numel()
        assert torch.allclose(z.grad.permute(0, 2, 3, 1).reshape(-1, 4), expected_z_grad, atol=1e-6)
        # codebook gradient has weight 1 regardless of beta
        expected_e_grad = torch.zeros_like(q.embed)
        expected_e_grad.index_add_(0, codes.flatten(), 2 * (e - flat) / flat.numel())
        assert torch.allclose(q.embed.grad, expected_e_grad, atol=1e-6)


def test_ema_moves_codes_toward_assigned_vectors():
    torch.manual_seed(0)
    q = VectorQuantizer(small_cfg(ema_decay=0.5, dead_code_threshold=0.0)).train()
    q.initialised.fill_(True)
    target = torch.full((1, 4), 3.0)
    code = int(q.nearest(target))
    before = (q.embed[code] - target).norm()
    z = target.view(1, 4, 1, 1).expand(1, 4, 2, 2).contiguous()
    for _ in range(3):
        q(z)
    assert (q.embed[code] - target).norm() < before * 0.5


def test_dead_code_is_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    q = VectorQuantizer(small_cfg()).train()
    q.initialised.fill_(True)
    q.ema_count.fill_(10.0)
    q.ema_count[3] = 0.01  # code 3 is dead
    q.embed[3] = 100.0
    flat = torch.randn(50, 4)
    assert q.restart_dead_codes(flat) == 1
    assert any(torch.allclose(q.embed[3], v) for v in flat)
    assert q.ema_count[3] == 1.0


def test_codebook_initialised_from_encoder_outputs():
    torch.manual_seed(0)
    q = VectorQuantizer(small_cfg(codebook_size=8, ema_decay=1.0, dead_code_threshold=0.0)).train()
    z = torch.randn(2, 4, 4, 4)
    q(z)  # decay 1: the EMA keeps the initial codebook, so we can see where it came from
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert bool(q.initialised)
    for code in q.embed:
        assert ((flat - code).norm(dim=1) < 1e-4).any()


def test_usage_and_perplexity_reported():
    q = VectorQuantizer(small_cfg(codebook_size=4)).eval()
    q.embed.copy_(torch.eye(4))
    z = torch.eye(4).view(4, 4, 1, 1)  # each vector hits a different code
    _, _, _, stats = q(z)
    assert stats["usage"] == 1.0
    assert abs(stats["perplexity"] - 4.0) < 1e-3


@pytest.mark.parametrize("grid", [(7, 7), (1, 1), (3, 5), (14, 9)])
def test_decode_any_grid_size_and_encode_shapes(grid):
    torch.manual_seed(0)
    m = VQVAE(small_cfg()).eval()
    tokens = torch.randint(0, 16, (2, *grid))
    images = m.decode(tokens)
    assert images.shape == (2, 1, grid[0] * 4, grid[1] * 4)
    assert images.min() >= 0 and images.max() <= 1
    assert m.encode(images).shape == (2, *grid)
    assert m.encode(images).dtype == torch.int64


def test_rgb_and_bad_configs():
    m = VQVAE(small_cfg(channels=3, image_size=(16, 24))).eval()
    assert m.encode(torch.rand(1, 3, 16, 24)).shape == (1, 4, 6)
    with pytest.raises(ValueError):
        VQVAEConfig(downsample=3)
    with pytest.raises(ValueError):
        VQVAEConfig(channels=2)
    with pytest.raises(ValueError):
        VQVAEConfig(decoder_fine_blocks=-1)
    with pytest.raises(ValueError):
        m.decode(torch.tensor([[[16]]]))


@pytest.mark.parametrize("channels", [1, 3])
def test_frozen_tokenizer_matches_eager_for_any_batch_and_grid(channels):
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(channels=channels, widths=(8, 16, 16), codebook_size=32, code_dim=4,
                           decoder_fine_blocks=channels // 3))
    vq.quantizer.embed.normal_()
    vq.train()
    frozen = FrozenTokenizer(vq)  # traced at batch 2 on a 7x7 grid
    assert vq.training  # the caller's mode is left alone
    vq.eval()
    with torch.inference_mode():
        for shape in [(1, 7, 7), (5, 7, 7), (3, 7, 14), (2, 9, 4)]:
            tokens = torch.randint(0, 32, shape)
            pixels = to_pixels(vq.decode(tokens))  # uint8 (B, H, W, C), as files hold them
            assert pixels.dtype == torch.uint8 and pixels.shape[-1] == channels
            assert torch.equal(vq.decode_pixels(tokens), pixels), shape
            assert torch.equal(frozen.decode_pixels(tokens), pixels), shape
            codes = vq.encode(pixels.permute(0, 3, 1, 2).float() / 255)
            assert torch.equal(vq.encode_pixels(pixels), codes), shape
            assert torch.equal(frozen.encode_pixels(pixels), codes), shape
            assert frozen.encode_pixels(pixels).dtype == torch.int64


def test_a_grown_decoder_decodes_as_before_and_round_trips(tmp_path):
    """Full-resolution blocks added to a trained decoder start as the identity: the same
    pixels until training moves them; the checkpoint keeps them."""
    from models.checkpoint import load_bundle, save_vqvae
    from training.vqvae import grow_decoder

    torch.manual_seed(0)
    vq = VQVAE(small_cfg(channels=3, decoder_fine_blocks=1)).eval()
    grown = grow_decoder(vq, 3)
    assert grown.config.decoder_fine_blocks == 3 and not grown.training
    added = sum(p.numel() for p in grown.parameters()) - sum(p.numel() for p in vq.parameters())
    assert added == 2 * sum(p.numel() for p in grown.decoder.net[-4].parameters())
    tokens = torch.randint(0, 16, (2, 7, 7))
    with torch.no_grad():
        assert torch.equal(grown.decode(tokens), vq.decode(tokens))
        x = torch.rand(2, 3, 28, 28)
        assert torch.equal(grown.encode(x), vq.encode(x))
    save_vqvae(tmp_path, grown)
    loaded = load_bundle(tmp_path).vqvae
    assert loaded.config.decoder_fine_blocks == 3
    with torch.no_grad():
        assert torch.equal(loaded.decode(tokens), vq.decode(tokens))
    with pytest.raises(SystemExit, match="already has 3"):
        grow_decoder(grown, 2)
