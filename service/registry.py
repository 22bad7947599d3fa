"""The model registry: every checkpoint folder loaded, validated and described once at start-up.

Model names are the folder names. Requests only ever look a name up in this dict; a name from
a request never reaches the file system.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import (
    CONFIG,
    Bundle,
    CheckpointError,
    load_bundle,
    read_config,
    resolve_device,
    sampling_defaults,
)
from models.footprint import Footprint, footprint, free_bytes
from models.quantize import QUANTIZATIONS, quantize
from models.sampling import make_batch
from models.vqvae import FrozenTokenizer

from .settings import Settings

log = logging.getLogger("taming.registry")



@dataclass
class ModelEntry:
    """One loaded model and what requests need to know about it."""

    name: str
    bundle: Bundle
    device: str
    defaults: dict
    info: dict = field(default_factory=dict)
    tokenizer: Any = None  # encode/decode: a FrozenTokenizer, or the eager VQ-VAE
    max_grid: tuple[int, int] = (32, 32)  # largest grid /generate and /decode take
    slots: int = 0  # images its engine samples at once: TAMING_GENERATE_SLOTS, or what fits
    memory: dict = field(default_factory=dict)  # models.footprint's figures

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.bundle.vqvae

    @property
    def can_generate(self) -> bool:
        return self.bundle.gpt is not None

    @property
    def canvases(self) -> bool:
        """Whether grids beyond its own are cached canvases in the generation engine (a
        relative-position transformer), not the paper's re-forwarding sampler."""
        return self.can_generate and self.bundle.gpt.relative

    @property
    def channels(self) -> int:
        return self.bundle.vqvae.config.channels

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.bundle.vqvae.config.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.bundle.grid)

    @property
    def codebook_size(self) -> int:
        return self.bundle.vqvae.config.codebook_size

    @property
    def n_classes(self) -> int:
        gpt = self.bundle.gpt
        return gpt.config.n_classes if gpt is not None else len(self.bundle.classes)

    def class_index(self, label: int | str) -> int:
        """A class index or name -> its index; ValueError for an unknown class."""
        if isinstance(label, int):
            if 0 <= label < self.n_classes:
                return label
            raise ValueError(f"unknown class {label}: model {self.name!r} has classes "
                             f"0..{self.n_classes - 1}")
        names = self.bundle.classes
        if label in names:
            return names.index(label)
        folded = [c.casefold() for c in names]
        if label.casefold() in folded:
            return folded.index(label.casefold())
        raise ValueError(f"unknown class {label!r}: model {self.name!r} has classes {names}")


def device_of(name: str) -> str:
    try:
        return str(resolve_device(name))
    except ValueError as e:
        raise CheckpointError(f"TAMING_DEVICE={e}") from e


def checkpoint_folders(settings: Settings) -> list[Path]:
    """The folders to serve: TAMING_MODELS, or every sub-folder with a config.json."""
    root = Path(settings.checkpoint_dir)
    if settings.models:
        return [Path(m) if ("/" in m or m.startswith(".")) else root / m for m in settings.models]
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint folder not found (set TAMING_CHECKPOINT_DIR)")
    found = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        if (d / CONFIG).is_file():
            found.append(d)
        else:
            log.warning("skipping %s: no %s", d, CONFIG)
    if not found:
        raise CheckpointError(f"{root}: no checkpoint folders (none holds a {CONFIG})")
    return found


def describe(entry: ModelEntry, settings: Settings) -> dict:
    b = entry.bundle
    cfg = b.config
    return {
        "name": entry.name,
        "dataset": cfg.get("dataset"),
        "image_size": list(entry.image_size),
        "channels": entry.channels,
        "grid": list(entry.grid),
        "max_grid": list(entry.max_grid),
        "codebook_size": entry.codebook_size,
        "classes": list(b.classes),
        "can_generate": entry.can_generate,
        "n_classes": entry.n_classes,
        "unconditional": b.gpt is None or b.gpt.config.unconditional,
        "guidance": b.gpt is not None and b.gpt.config.guidance,
        "defaults": dict(entry.defaults),
        "digest": b.digest,
        "device": entry.device,
        "quantization": b.quantization,
        "evaluation": cfg.get("evaluation") or {},
        "memory": dict(entry.memory),
    }


def max_grid_of(cfg: dict, default: int, folder: Path) -> tuple[int, int]:
    """A checkpoint's own largest grid (config.json `max_grid`: [rows, cols], e.g. the
    canvases a scene model paints), else TAMING_MAX_GRID for both."""
    given = cfg.get("max_grid")
    if given is None:
        return (default, default)
    if (not isinstance(given, list) or len(given) != 2
            or not all(isinstance(v, int) and v >= 1 for v in given)):
        raise CheckpointError(f"{folder / CONFIG}: max_grid must be [rows, cols], got {given!r}")
    return (given[0], given[1])


def quantizations(settings: Settings) -> dict[str, str]:
    """TAMING_QUANTIZE as {model name or '*': kind}; raises CheckpointError."""
    out: dict[str, str] = {}
    for entry in settings.quantize:
        name, sep, kind = entry.partition("=")
        if not sep or not name.strip() or kind.strip() not in QUANTIZATIONS:
            raise CheckpointError(f"TAMING_QUANTIZE: {entry!r} is not NAME=KIND with KIND one "
                                  f"of {', '.join(QUANTIZATIONS)}")
        out[name.strip()] = kind.strip()
    return out


def load_models(settings: Settings) -> dict[str, ModelEntry]:
    """Load and validate every folder; raises CheckpointError with a one-line reason."""
    device = device_of(settings.device)
    quantized = quantizations(settings)
    models: dict[str, ModelEntry] = {}
    reserved = 0  # the KV caches of the models before this one, allocated when serving starts
    for folder in checkpoint_folders(settings):
        cfg = read_config(folder) if Path(folder).is_dir() else None
        need = footprint(cfg) if cfg is not None else None
        slots = fitting_slots(folder, need, device, settings.generate_slots, reserved)
        bundle = load_bundle(folder, device=device)
        name = bundle.name
        if name in models:
            raise CheckpointError(f"{folder}: a second model named {name!r}")
        kind = quantized.get(name, quantized.get("*"))
        if kind and bundle.gpt is not None:
            if torch.device(device).type == "cpu":
                bundle.gpt = quantize(bundle.gpt, kind, in_place=True)
                bundle.quantization = kind
            else:
                log.info("%s: TAMING_QUANTIZE applies on CPU only; serving it as loaded", name)
        max_grid = max_grid_of(bundle.config, settings.max_grid, folder)
        if any(s > m * bundle.vqvae.config.downsample
               for s, m in zip(bundle.vqvae.config.image_size, max_grid, strict=True)):
            log.warning("%s: image size exceeds the largest grid %s", folder, list(max_grid))
        try:
            defaults = sampling_defaults(bundle.config)
        except CheckpointError as e:
            raise CheckpointError(f"{folder}/{e}") from e
        entry = ModelEntry(name=name, bundle=bundle, device=device, defaults=defaults,
                           tokenizer=frozen_tokenizer(bundle.vqvae), max_grid=max_grid,
                           slots=slots if bundle.gpt is not None else 0)
        entry.memory = need.describe(entry.slots) if need is not None else {}
        reserved += entry.memory.get("kv_cache_bytes", 0)
        if entry.can_generate:
            try:  # the shipped defaults must be valid settings for this model
                make_batch(bundle.gpt.config, 1, entry.grid, **{
                    k: defaults[k] for k in ("temperature", "top_k", "top_p", "cfg_scale")})
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{folder / CONFIG}: bad sampling_defaults ({e})") from e
        entry.info = describe(entry, settings)
        models[name] = entry
        log.info("loaded model %s from %s (%s, generator: %s)", name, folder, bundle.digest,
                 "yes" if entry.can_generate else "no")
    return models


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def fitting_slots(folder: Path, need: Footprint | None, device: str, wanted: int,
                  reserved: int) -> int:
    """TAMING_GENERATE_SLOTS, cut to what the device's free memory holds beside the weights
    (a warning says so); CheckpointError where not even one slot, or the weights, fit."""
    free = free_bytes(torch.device(device)) if need is not None else None
    if free is None:
        return wanted
    free -= reserved
    slots = need.slots_that_fit(free, wanted)
    if slots == 0:
        raise CheckpointError(
            f"{folder}: needs {gib(need.total(1))} ({gib(need.weights_bytes)} of weights and a "
            f"KV cache of {gib(need.total(1) - need.weights_bytes)} a slot) but {device} has "
            f"{gib(free)} free (of which models use at most a share; see docs/api.md)")
    if slots < wanted:
        log.warning("%s: %d generation slots fit in %s's free memory (%s), not "
                    "TAMING_GENERATE_SLOTS=%d", folder, slots, device, gib(free), wanted)
    return slots


def frozen_tokenizer(vq) -> Any:
    """The VQ-VAE as TorchScript graphs; the eager model where this torch cannot trace it."""
    try:
        return FrozenTokenizer(vq)
    except Exception as e:  # TorchScript is deprecated: a later torch may drop it
        log.warning("serving the eager VQ-VAE: TorchScript tracing failed (%s: %s)",
                    type(e).__name__, e)
        return vq


@torch.inference_mode()
def warm_up(entry: ModelEntry) -> None:
    """Run the tokenizer once each way, so the first request pays no first-call costs (the
    generation engine warms its own steps up)."""
    vq = entry.tokenizer
    c, (h, w) = entry.channels, entry.image_size
    dev = torch.device(entry.device)
    vq.decode_pixels(vq.encode_pixels(torch.zeros(1, h, w, c, dtype=torch.uint8, device=dev)))
