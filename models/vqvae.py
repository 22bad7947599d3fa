"""VQ-VAE tokenizer: a convolutional encoder, a vector quantizer and a decoder.

Images in [0, 1] go in as (B, C, H, W); token grids come out as int64 (B, H/f, W/f).
Both halves are fully convolutional, so `decode` accepts any grid size.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .images import to_pixels


@dataclass
class VQVAEConfig:
    image_size: tuple[int, int] = (28, 28)
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    downsample: int = 4  # 28x28 -> 7x7; must be a power of two
    widths: tuple[int, ...] = (16, 48, 96)  # one width per resolution, finest first
    res_blocks: int = 1  # residual blocks per resolution (twice that at the coarsest)
    # the decoder's residual blocks at full resolution, where photographs' fine texture is
    # drawn; none by default, since they cost the most per pixel
    decoder_fine_blocks: int = 0
    codebook_size: int = 256  # K
    code_dim: int = 32
    quantizer: str = "ema"  # "ema" (ours) or "plain" (loss-trained, random init, no restarts)
    beta: float = 0.25  # commitment weight, on the encoder term
    ema_decay: float = 0.99
    dead_code_threshold: float = 1.0  # EMA count under which a code counts as dead
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_size = tuple(self.image_size)
        self.widths = tuple(self.widths)
        levels = self.downsample.bit_length() - 1
        if self.downsample < 1 or 2**levels != self.downsample:
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        if len(self.widths) != levels + 1:
            raise ValueError(f"widths needs {levels + 1} entries for downsample {self.downsample}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.decoder_fine_blocks < 0:
            raise ValueError(f"decoder_fine_blocks must be >= 0, got {self.decoder_fine_blocks}")
        if self.quantizer not in ("ema", "plain"):
            raise ValueError(f"quantizer must be 'ema' or 'plain', got {self.quantizer!r}")
        if any(s % self.downsample for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} is not divisible by {self.downsample}")

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.downsample, self.image_size[1] // self.downsample)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["widths"] = list(self.widths)
        return d


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
            _norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        w = cfg.widths
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, w[0], 3, padding=1)]
        for i in range(len(w) - 1):
            # the finest level only gets the stem: full-resolution blocks are costly
            if i > 0:
                layers += [ResBlock(w[i]) for _ in range(cfg.res_blocks)]
            layers.append(nn.Conv2d(w[i], w[i + 1], 4, stride=2, padding=1))
        layers += [ResBlock(w[-1]) for _ in range(2 * cfg.res_blocks)]
        layers += [_norm(w[-1]), nn.SiLU(), nn.Conv2d(w[-1], cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        w = cfg.widths[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, w[0], 3, padding=1)]
        layers += [ResBlock(w[0]) for _ in range(2 * cfg.res_blocks)]
        for i in range(len(w) - 1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(w[i], w[i + 1], 3, padding=1)]
            n = cfg.res_blocks if i < len(w) - 2 else cfg.decoder_fine_blocks
            layers += [ResBlock(w[i + 1]) for _ in range(n)]
        layers += [_norm(w[-1]), nn.SiLU(), nn.Conv2d(w[-1], cfg.channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # bounded output: the sigmoid keeps every pixel in [0, 1]
        return torch.sigmoid(self.net(z))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with a straight-through gradient.

    mode "ema": the codebook follows exponential moving averages of its assigned encoder
    outputs, is initialised from encoder outputs on the first training batch, and dead codes
    are restarted from current encoder outputs. mode "plain": codebook trained by the
    codebook loss, random init, no restarts (kept for the ablation).
    The commitment weight beta always multiplies ||z_e - sg(e)||^2, the encoder term.
    """

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.K, self.D = cfg.codebook_size, cfg.code_dim
        self.mode, self.beta, self.decay = cfg.quantizer, cfg.beta, cfg.ema_decay
        self.dead_threshold = cfg.dead_code_threshold
        embed = torch.empty(self.K, self.D).uniform_(-1.0 / self.K, 1.0 / self.K)
        if self.mode == "plain":
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("ema_count", torch.ones(self.K))
            self.register_buffer("ema_sum", embed.clone())
        self.register_buffer("initialised", torch.tensor(self.mode == "plain"))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared L2) for each row of (N, D)."""
        e = self.embed
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None])
        return dist.argmin(1)

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        idx = torch.randperm(flat.shape[0], device=flat.device)
        picks = flat[idx[: self.K]] if flat.shape[0] >= self.K else flat[
            torch.randint(0, flat.shape[0], (self.K,), device=flat.device)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(picks, 0)  # every rank starts from the same codebook
        self.embed.copy_(picks)
        self.ema_sum.copy_(picks)
        self.ema_count.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.K).type(flat.dtype)
        count = onehot.sum(0)
        summed = onehot.t() @ flat
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
            torch.distributed.all_reduce(summed)
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(summed, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + self.K * 1e-5) * n  # Laplace smoothing
        self.embed.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Move codes whose EMA count fell under the threshold onto random encoder outputs."""
        dead = self.ema_count < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        picks = flat[torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(picks, 0)  # every rank restarts to the same vectors
        self.embed[dead] = picks
        self.ema_sum[dead] = picks
        self.ema_count[dead] = 1.0
        return n_dead

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """z: (B, D, h, w) -> (z_q with straight-through grad, codes (B, h, w), loss, stats)."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        if self.training and not bool(self.initialised):
            self._init_from(flat.detach())
        codes = self.nearest(flat.detach())
        q = self.embed[codes]
        commit = F.mse_loss(flat, q.detach())
        if self.mode == "plain":
            loss = F.mse_loss(q, flat.detach()) + self.beta * commit
        else:
            loss = self.beta * commit
            if self.training:
                self._ema_update(flat.detach(), codes)
                self.restart_dead_codes(flat.detach())
        q = flat + (q - flat).detach()  # straight-through: decoder grads flow to the encoder
        counts = torch.bincount(codes, minlength=self.K).float()
        probs = counts / counts.sum()
        stats = {
            "usage": float((counts > 0).float().mean()),
            "perplexity": float(torch.exp(-(probs * torch.log(probs + 1e-10)).sum())),
        }
        z_q = q.view(B, h, w, D).permute(0, 3, 1, 2).contiguous()
        return z_q, codes.view(B, h, w), loss, stats


class Tokenizer(nn.Module):
    """What every tokenizer family shares, over its own `encode` and `decode_ids`: the
    range-checked `decode`, and the serving forms in uint8 pixels (B, H, W, C) as image files
    hold them, so that a server's model thread makes one call per batch (see FrozenTokenizer)."""

    config: VQVAEConfig  # or any config with `codebook_size`

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 token grids (B, h, w) of any size -> images (B, C, h*f, w*f) in [0, 1]."""
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be integer, got {tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.config.codebook_size})")
        return self.decode_ids(tokens.long())

    def decode_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) -> int64 token grids (B, H/f, W/f)."""
        return self.encode(pixels.permute(0, 3, 1, 2).float().div(255.0))

    @torch.no_grad()
    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 token grids (B, h, w), ids already checked -> uint8 (B, h*f, w*f, C)."""
        return to_pixels(self.decode_ids(tokens))


class VQVAE(Tokenizer):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """x in [0, 1] -> (reconstruction, codes, quantizer loss, stats)."""
        z = self.encoder(x * 2 - 1)
        z_q, codes, qloss, stats = self.quantizer(z)
        return self.decoder(z_q), codes, qloss, stats

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> int64 token grids (B, H/f, W/f)."""
        z = self.encoder(images * 2 - 1)
        B, D, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, D)).view(B, h, w)

    def decode_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """`decode` without the range check (ids already checked), so that it traces."""
        return self.decoder(self.quantizer.embed[tokens].permute(0, 3, 1, 2).contiguous())



class _MethodGraph(nn.Module):
    """One method of a VQ-VAE as a module's forward, for tracing."""

    def __init__(self, vq: VQVAE, method: str) -> None:
        super().__init__()
        self.vq, self.method = vq, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.vq, self.method)(x)


class FrozenTokenizer:
    """`encode_pixels` and `decode_pixels` of a trained tokenizer (a VQ-VAE here, or the
    paper's VQGAN of models/taming_vqgan.py) as frozen TorchScript graphs, for serving.

    An eager forward takes the GIL back after each of its Python-level ops, and beside a busy
    event loop each take can wait out a switch interval; a frozen graph with uint8 pixels in
    and out costs its thread one take per batch (BENCHMARKS.md, "The GIL convoy"). Outputs
    are the eager ones bit for bit, for any batch size and grid (the trace keeps shapes
    symbolic). `decode_pixels` does not range-check ids: its caller validates them.
    """

    def __init__(self, vq: nn.Module) -> None:
        cfg = vq.config
        dev = next(vq.parameters()).device
        h, w = cfg.image_size
        was_training = vq.training
        vq.eval()
        # torch 2.13 marks TorchScript deprecated; the one TracerWarning is group_norm's
        # training-only size check, which inference never takes
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            pixels = torch.zeros(2, h, w, cfg.channels, dtype=torch.uint8, device=dev)
            tokens = torch.zeros(2, h // cfg.downsample, w // cfg.downsample, dtype=torch.long,
                                 device=dev)
            # no trace check (a second run of each graph, at every start-up): the graphs
            # have no data-dependent branches, and tests pin them to the eager outputs
            self._encode = torch.jit.freeze(torch.jit.trace(
                _MethodGraph(vq, "encode_pixels").eval(), pixels, check_trace=False))
            self._decode = torch.jit.freeze(torch.jit.trace(
                _MethodGraph(vq, "decode_pixels").eval(), tokens, check_trace=False))
        vq.train(was_training)
        self.config = cfg

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) -> int64 token grids (B, H/f, W/f)."""
        return self._encode(pixels)

    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 token grids (B, h, w), ids already checked -> uint8 (B, h*f, w*f, C)."""
        return self._decode(tokens)
