"""Checkpoint folders: config.json plus safetensors weights. No pickle is ever loaded.

A folder holds `config.json` (architecture, data set, classes, defaults, evaluation),
`vqvae.safetensors` and, once the generator is trained, `transformer.safetensors`.
Every load checks that the files exist, parse, and match the config's shapes, and raises
CheckpointError with a one-line reason naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .gpt import GPT, GPTConfig
from .sampling import SAMPLING_DEFAULTS
from .taming_vqgan import FAMILY as TAMING_FAMILY
from .taming_vqgan import TamingVQGAN, TamingVQGANConfig
from .vqvae import VQVAE, VQVAEConfig

Tokenizer = VQVAE | TamingVQGAN  # one interface: encode/decode(_pixels), config.grid etc.

CONFIG = "config.json"
VQVAE_FILE = "vqvae.safetensors"
GPT_FILE = "transformer.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be served; the message names the file and the reason."""


@dataclass
class Bundle:
    """Everything one model folder holds, ready to run."""

    name: str
    path: Path
    config: dict
    vqvae: Tokenizer
    gpt: GPT | None
    digest: str
    classes: list[str] = field(default_factory=list)
    quantization: str | None = None  # the transformer's weights, when not as trained

    @property
    def grid(self) -> tuple[int, int]:
        return self.vqvae.config.grid


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto (cuda:local_rank when CUDA is present, else cpu), cpu, cuda or cuda:N;
    ValueError for anything else, or for CUDA on a machine without it."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{name!r} is not a device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name!r}: CUDA is not available on this machine")
    return dev


def sampling_defaults(cfg: dict) -> dict:
    """The sampler's defaults, overridden by what the checkpoint's config ships."""
    shipped = cfg.get("sampling_defaults") or {}
    if not isinstance(shipped, dict):
        raise CheckpointError(f"{CONFIG}: sampling_defaults is not an object")
    return {**SAMPLING_DEFAULTS, **{k: v for k, v in shipped.items()
                                    if k in SAMPLING_DEFAULTS and (v is not None or k == "top_k")}}


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vqvae"), dict):
        raise CheckpointError(f"{path}: no 'vqvae' section")
    return cfg


def write_config(folder: Path, cfg: dict) -> None:
    """Write atomically, so a crash never leaves half a config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, folder / CONFIG)


def save_weights(module: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    tmp = Path(str(path) + ".tmp")
    save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file into `module`, checking names and shapes exactly."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated ({str(e).splitlines()[0]})") from e
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise CheckpointError(
                f"{path}: tensor {k} has shape {list(state[k].shape)}, config.json implies {list(v.shape)}")
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise CheckpointError(f"{path}: tensor {k} holds NaN or infinite values")
    module.load_state_dict(state)


def vqvae_from_config(cfg: dict) -> Tokenizer:
    """The tokenizer the 'vqvae' section describes: the project's VQ-VAE, or the paper's
    VQGAN where its `family` says so (models/taming_vqgan.py says why these are two)."""
    section = cfg["vqvae"]
    try:
        if section.get("family") == TAMING_FAMILY:
            return TamingVQGAN(TamingVQGANConfig(**section))
        return VQVAE(VQVAEConfig(**section))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{CONFIG}: bad 'vqvae' section ({e})") from e


def gpt_from_config(cfg: dict) -> GPT:
    try:
        return GPT(GPTConfig(**cfg["transformer"]))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{CONFIG}: bad 'transformer' section ({e})") from e


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def save_vqvae(folder: Path, model: Tokenizer, extra: dict | None = None) -> None:
    """Write the tokenizer weights and its config section (keeping other sections)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = read_config(folder) if (folder / CONFIG).is_file() else {}
    cfg.update(extra or {})
    cfg["vqvae"] = model.config.to_dict()
    save_weights(model, folder / VQVAE_FILE)
    write_config(folder, cfg)


def save_gpt(folder: Path, model: GPT, extra: dict | None = None) -> None:
    folder = Path(folder)
    cfg = read_config(folder)
    cfg.update(extra or {})
    cfg["transformer"] = model.config.to_dict()
    save_weights(model, folder / GPT_FILE)
    write_config(folder, cfg)


def load_bundle(folder: str | Path, device: str | torch.device = "cpu",
                require_gpt: bool = False) -> Bundle:
    """Load and validate a model folder; raises CheckpointError naming the bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    cfg = read_config(folder)
    vq = vqvae_from_config(cfg)
    load_weights(vq, folder / VQVAE_FILE)
    files = [folder / VQVAE_FILE]
    gpt = None
    if "transformer" in cfg:
        gpt = gpt_from_config(cfg)
        load_weights(gpt, folder / GPT_FILE)
        files.append(folder / GPT_FILE)
        if gpt.config.codebook_size != vq.config.codebook_size:
            raise CheckpointError(f"{folder / CONFIG}: transformer and vqvae codebook sizes differ")
        if tuple(gpt.config.grid) != vq.config.grid:
            raise CheckpointError(f"{folder / CONFIG}: transformer grid differs from the vqvae grid")
    elif require_gpt:
        raise CheckpointError(f"{folder / CONFIG}: no 'transformer' section (generator not trained)")
    classes = list(cfg.get("classes") or [])
    if gpt is not None and classes and len(classes) != gpt.config.n_classes:
        raise CheckpointError(f"{folder / CONFIG}: {len(classes)} class names for "
                              f"{gpt.config.n_classes} classes")
    vq.eval().to(device)
    if gpt is not None:
        gpt.eval().to(device)
    return Bundle(name=folder.name, path=folder, config=cfg, vqvae=vq, gpt=gpt,
                  digest=file_digest(*files), classes=classes)
