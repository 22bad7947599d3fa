"""The adversarial half of the VQGAN: a patch discriminator, hinge losses, the adaptive weight.

The discriminator lives only in training state (runs/.../state.safetensors); the serving
checkpoint holds the tokenizer alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs to a grid of real/fake logits, one per overlapping patch.

    `layers` strided 4x4 convs (the last one stride 1) and a 1-channel output conv; on 28x28
    images one layer gives a 12x12 grid of logits over 16-pixel windows, two layers a 5x5 grid
    over 34-pixel windows. GroupNorm rather than the original BatchNorm: a sample's logits do
    not depend on the rest of its batch, so real and fake images share one forward pass and
    DDP ranks have no buffers to sync.
    """

    def __init__(self, channels: int = 1, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                     nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():  # the DCGAN initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x in [0, 1] -> logits (B, 1, h, w)."""
        return self.net(x * 2 - 1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """The paper's lambda: ||grad of the reconstruction loss|| / ||grad of the GAN loss||, both
    at the decoder's last layer, so neither loss swamps the other (detached, clamped)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)
