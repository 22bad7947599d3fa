"""The paper's VQGAN tokenizer (Esser et al., the published CompVis configs), for serving.

Why a second family beside models/vqvae.py rather than a configuration of it: the two share
only the idea. The paper's network has residual blocks at every resolution (with a 1x1
shortcut where the width changes), attention blocks at chosen resolutions and in a middle
block, GroupNorm with 32 groups, stride-2 3x3 convolutions padded on the right and bottom
only, 1x1 convolutions before and after quantization, an unbounded output read in [-1, 1],
and two quantizers (nearest code, and a Gumbel projection whose argmax picks the code).
Folding all that into VQVAEConfig would make every field a switch inside the shipped
models' code path, which tests pin bit for bit. So this family is its own module behind the
same tokenizer interface (`config.image_size/channels/downsample/codebook_size/grid`,
`encode`, `decode_ids`, and from `models.vqvae.Tokenizer` the checked `decode` and the pixel
forms), and the server, the engine, the samplers and FrozenTokenizer cannot tell the two
apart.

Inference only: training these networks is the reference code's job; the importer
(`python -m training import-taming`) brings their weights here. The Gumbel quantizer picks
the most likely code (the argmax of its logits): the reference adds Gumbel noise even when
evaluating, so its own encodings are draws around that mode.

Images in [0, 1] go in as (B, C, H, W), are mapped to [-1, 1] as the paper's data loaders
do, and decoded images are clamped back from [-1, 1] to [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vqvae import Tokenizer

FAMILY = "taming-vqgan"  # config.json's vqvae.family for this module


@dataclass
class TamingVQGANConfig:
    """The published `ddconfig` plus `n_embed`/`embed_dim` and the quantizer kind."""

    resolution: int = 256  # the training size: which levels hold attention follows from it
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    quantizer: str = "nearest"  # "nearest" (VectorQuantizer2) or "gumbel" (GumbelQuantize)
    family: str = FAMILY

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if self.family != FAMILY:
            raise ValueError(f"family must be {FAMILY!r}, got {self.family!r}")
        if self.quantizer not in ("nearest", "gumbel"):
            raise ValueError(f"quantizer must be 'nearest' or 'gumbel', got {self.quantizer!r}")
        if self.in_channels != self.out_ch or self.in_channels not in (1, 3):
            raise ValueError(f"in_channels and out_ch must both be 1 or 3, got "
                             f"{self.in_channels} and {self.out_ch}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be positive multipliers, got {self.ch_mult}")
        widths = [self.ch * m for m in (1, *self.ch_mult)]
        if any(w % 32 for w in widths):
            raise ValueError(f"every width must be a multiple of GroupNorm's 32 groups, got {widths}")
        if self.num_res_blocks < 1 or self.n_embed < 1 or self.embed_dim < 1 or self.z_channels < 1:
            raise ValueError("num_res_blocks, n_embed, embed_dim and z_channels must be positive")
        if self.quantizer == "gumbel" and self.embed_dim != self.z_channels:
            # GumbelVQ projects quant_conv's embed_dim outputs with a z_channels-input conv
            raise ValueError("a Gumbel quantizer needs embed_dim == z_channels")
        if self.resolution % self.downsample:
            raise ValueError(f"resolution {self.resolution} is not divisible by {self.downsample}")

    # the tokenizer interface (models/vqvae.py's VQVAEConfig has the same names)
    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.resolution, self.resolution)

    @property
    def channels(self) -> int:
        return self.in_channels

    @property
    def codebook_size(self) -> int:
        return self.n_embed

    @property
    def grid(self) -> tuple[int, int]:
        side = self.resolution // self.downsample
        return (side, side)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResBlock(nn.Module):
    """norm, swish, 3x3 conv, twice; a 1x1 conv carries the input where the width changes."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """One-head self-attention over every position of the feature map, residual."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)  # the reference's q, k, v 1x1 convs, stacked
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (B, HW, C)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(y.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """A stride-2 3x3 conv after one zero column and row on the right and bottom (the
    reference's asymmetric padding: even sizes halve exactly)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual blocks of one resolution (each followed by attention where the config
    puts it), then the change of resolution, if any."""

    def __init__(self, cin: int, cout: int, blocks: int, attention: bool,
                 resample: nn.Module | None) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout) for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(blocks if attention else 0))
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return self.resample(x)


class Middle(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.res1, self.attn, self.res2 = ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: TamingVQGANConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in (1, *cfg.ch_mult)]
        n = len(cfg.ch_mult)
        self.stem = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels, res = [], cfg.resolution
        for i in range(n):
            last = i == n - 1
            levels.append(Level(widths[i], widths[i + 1], cfg.num_res_blocks,
                                res in cfg.attn_resolutions,
                                None if last else Downsample(widths[i + 1])))
            res = res if last else res // 2
        self.levels = nn.ModuleList(levels)
        self.mid = Middle(widths[-1])
        self.out_norm = _norm(widths[-1])
        self.out_conv = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for level in self.levels:
            x = level(x)
        return self.out_conv(F.silu(self.out_norm(self.mid(x))))


class Decoder(nn.Module):
    """Levels in the order they run, coarsest first (the reference indexes them finest
    first); each has one residual block more than the encoder's."""

    def __init__(self, cfg: TamingVQGANConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        widths = [cfg.ch * m for m in cfg.ch_mult][::-1]  # coarsest first
        res = cfg.resolution // cfg.downsample
        self.stem = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = Middle(widths[0])
        levels, cin = [], widths[0]
        for i in range(n):
            last = i == n - 1
            levels.append(Level(cin, widths[i], cfg.num_res_blocks + 1,
                                res in cfg.attn_resolutions, None if last else Upsample(widths[i])))
            cin, res = widths[i], res if last else res * 2
        self.levels = nn.ModuleList(levels)
        self.out_norm = _norm(widths[-1])
        self.out_conv = nn.Conv2d(widths[-1], cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.stem(z))
        for level in self.levels:
            x = level(x)
        return self.out_conv(F.silu(self.out_norm(x)))


class NearestQuantizer(nn.Module):
    """The code nearest (squared L2) to each latent vector."""

    def __init__(self, cfg: TamingVQGANConfig) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.zeros(cfg.n_embed, cfg.embed_dim))

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> int64 (B, h, w)."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        e = self.codebook
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None] - 2 * flat @ e.t()
        return dist.argmin(1).view(B, h, w)


class GumbelQuantizer(nn.Module):
    """A 1x1 conv scores every code at each position; the best-scoring code is picked."""

    def __init__(self, cfg: TamingVQGANConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.embed_dim, cfg.n_embed, 1)
        self.codebook = nn.Parameter(torch.zeros(cfg.n_embed, cfg.embed_dim))

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z).argmax(1)


class TamingVQGAN(Tokenizer):
    def __init__(self, cfg: TamingVQGANConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantizer = (NearestQuantizer if cfg.quantizer == "nearest" else GumbelQuantizer)(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> int64 token grids (B, H/f, W/f)."""
        return self.quantizer.indices(self.quant_conv(self.encoder(images * 2 - 1)))

    def decode_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """`decode` without the range check (ids already checked), so that it traces."""
        z = self.quantizer.codebook[tokens].permute(0, 3, 1, 2)
        x = self.decoder(self.post_quant_conv(z))
        return (x.clamp(-1, 1) + 1) / 2
