"""`python -m training import-taming SOURCE --out checkpoints/NAME`: the paper's published
models (CompVis taming-transformers log folders) as this project's checkpoint folders.

SOURCE is a log folder as the downloads unpack (`configs/*-project.yaml` and
`checkpoints/last.ckpt`), or a `.ckpt` with `--config YAML`. A `VQModel` or `GumbelVQ`
gives a tokenizer-only folder; a `Net2NetTransformer` (unconditional, or class-conditional
through its Labelator) gives both halves.

The `.ckpt` is a PyTorch Lightning pickle. It is read by `read_checkpoint`, an unpickler
that rebuilds tensors and plain containers only: every other class it names (Lightning
callbacks, OmegaConf containers, numpy scalars, anything) becomes an inert `Placeholder`
that is never imported and never called, and only the tensors of `state_dict` are ever read
from the archive. The weights land as safetensors; no pickle is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import shutil
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import GPT_FILE, VQVAE_FILE, save_weights, write_config
from models.gpt import GPT, GPTConfig
from models.taming_vqgan import TamingVQGAN, TamingVQGANConfig

HERE = Path(__file__).resolve().parent
IMAGENET_CLASSES = HERE / "imagenet_classes.txt"
LICENCE = (
    "The weights were published by CompVis (Esser, Rombach and Ommer) with the "
    "taming-transformers repository (https://github.com/CompVis/taming-transformers), whose "
    "code is MIT-licensed; the model downloads are linked from its README. Each model was "
    "trained on a data set with terms of its own, which its outputs inherit: ImageNet is for "
    "non-commercial research and educational use (image-net.org terms of access), FFHQ is "
    "CC BY-NC-SA 4.0 (NVIDIA), CelebA-HQ is for non-commercial research (CelebA's agreement). "
    "Check the terms of the data set named in this card before any other use."
)


class TamingImportError(ValueError):
    """A source this importer cannot turn into a checkpoint; the message says why."""


# ---- the restricted unpickler ----------------------------------------------------------------
class Placeholder:
    """Stands for any class a checkpoint names that is not a tensor or a plain container.
    It keeps what the pickle gave it as data and does nothing else."""

    module = name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self.module}.{self.name}>"


STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class StorageKind:
    dtype: torch.dtype


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor the pickle describes; its bytes stay in the archive until `materialise`."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: StorageRef, offset: int, size: tuple, stride: tuple, *_: Any) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise TamingImportError("a tensor in the checkpoint has no storage of its own")
    return TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


ALLOWED = {  # (module, name) -> what the unpickler hands back
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "list"): list, ("builtins", "dict"): dict, ("builtins", "tuple"): tuple,
    ("torch", "Size"): tuple,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Tensors and containers come back; any other name a Placeholder subclass."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.placeholders: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageKind(STORAGE_DTYPES[name])
        self.placeholders.add(f"{module}.{name}")
        return type(name, (Placeholder,), {"module": module, "name": name})

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageKind)):
            raise TamingImportError(f"the checkpoint holds a storage this reader does not know ({pid!r:.80})")
        return StorageRef(str(pid[2]), pid[1].dtype, int(pid[4]))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A Lightning `.ckpt` (torch's zip format) -> (its state_dict's tensors, the classes it
    named that became placeholders)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise TamingImportError(f"{path}: not a zip-format torch checkpoint ({e}); the legacy format "
                           "of torch < 1.6 is not read") from e
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise TamingImportError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder") != b"little":
            raise TamingImportError(f"{path}: a big-endian checkpoint")
        unpickler = RestrictedUnpickler(archive.open(pickles[0]))
        try:
            obj = unpickler.load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            if isinstance(e, TamingImportError):
                raise
            raise TamingImportError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from e
        state = obj.get("state_dict") if isinstance(obj, dict) else None
        if state is None and isinstance(obj, dict) and obj and all(
                isinstance(v, TensorRef) for v in obj.values()):
            state = obj  # a bare state dict
        if not isinstance(state, dict):
            raise TamingImportError(f"{path}: no state_dict in the checkpoint")
        cache: dict[str, torch.Tensor] = {}
        out = {}
        for k, ref in state.items():
            if isinstance(ref, TensorRef):
                out[str(k)] = materialise(archive, prefix, ref, cache)
    return out, sorted(unpickler.placeholders)


def materialise(archive: zipfile.ZipFile, prefix: str, ref: TensorRef,
                cache: dict[str, torch.Tensor]) -> torch.Tensor:
    st = ref.storage
    if st.key not in cache:
        try:
            raw = archive.read(f"{prefix}data/{st.key}")
        except KeyError as e:
            raise TamingImportError(f"the checkpoint names storage {st.key} but does not hold it") from e
        flat = torch.frombuffer(bytearray(raw), dtype=st.dtype) if raw else torch.empty(0, dtype=st.dtype)
        if flat.numel() != st.numel:
            raise TamingImportError(f"storage {st.key} holds {flat.numel()} values, not {st.numel}")
        cache[st.key] = flat
    flat = cache[st.key]
    extent = ref.offset + sum((s - 1) * d for s, d in zip(ref.size, ref.stride, strict=True)) + 1
    if any(s == 0 for s in ref.size):
        return torch.empty(ref.size, dtype=st.dtype)
    if ref.offset < 0 or extent > flat.numel():
        raise TamingImportError(f"a tensor reaches past the end of storage {st.key}")
    return flat.as_strided(ref.size, ref.stride, ref.offset).clone()


# ---- the project configs -------------------------------------------------------------------
def _target(section: Any) -> str:
    return section.get("target", "") if isinstance(section, dict) else str(section)


def tokenizer_config(section: dict) -> TamingVQGANConfig:
    """A first-stage config (`taming.models.vqgan.VQModel` or `GumbelVQ`) -> ours."""
    target = _target(section)
    kinds = {"taming.models.vqgan.VQModel": "nearest", "taming.models.vqgan.GumbelVQ": "gumbel"}
    if target not in kinds:
        raise TamingImportError(f"first stage {target!r} is not served (VQModel and GumbelVQ are)")
    p = section.get("params") or {}
    if p.get("remap"):
        raise TamingImportError("a first stage with a remapped codebook (remap) is not served")
    dd = p.get("ddconfig") or {}
    if dd.get("double_z"):
        raise TamingImportError("ddconfig.double_z is true: that is not a VQGAN encoder")
    if dd.get("resamp_with_conv", True) is not True or dd.get("give_pre_end"):
        raise TamingImportError("ddconfig asks for resampling without convolutions or give_pre_end")
    try:
        return TamingVQGANConfig(
            resolution=int(dd["resolution"]), in_channels=int(dd["in_channels"]),
            out_ch=int(dd["out_ch"]), ch=int(dd["ch"]), ch_mult=tuple(dd["ch_mult"]),
            num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions") or ()),
            z_channels=int(dd["z_channels"]), embed_dim=int(p["embed_dim"]),
            n_embed=int(p["n_embed"]), quantizer=kinds[target])
    except KeyError as e:
        raise TamingImportError(f"the first-stage config lacks {e}") from e
    except (TypeError, ValueError) as e:
        raise TamingImportError(f"the first-stage config cannot be served: {e}") from e


@dataclass
class TransformerSpec:
    config: GPTConfig
    vocab_size: int  # the reference's, which may exceed the codebook
    block_size: int


def transformer_config(params: dict, tok: TamingVQGANConfig) -> TransformerSpec:
    """A Net2NetTransformer's params -> our GPTConfig (minGPT as a special case of ours)."""
    if _target(params.get("transformer_config")) != "taming.modules.transformer.mingpt.GPT":
        raise TamingImportError("the transformer is not taming's minGPT")
    perm = params.get("permuter_config")
    if perm is not None and _target(perm) != "taming.modules.transformer.permuter.Identity":
        raise TamingImportError(f"permuter {_target(perm)!r} is not served (raster order only)")
    t = params["transformer_config"].get("params") or {}
    if int(t.get("n_unmasked", 0)):
        raise TamingImportError("n_unmasked > 0 (a bidirectional prefix) is not served")
    cond = params.get("cond_stage_config")
    if cond == "__is_unconditional__" or params.get("unconditional"):
        n_classes = 0
    elif _target(cond) == "taming.modules.util.Labelator":
        n_classes = int((cond.get("params") or {})["n_classes"])
    else:
        raise TamingImportError(f"conditioning {_target(cond)!r} is not served (unconditional and "
                           "class-conditional models are)")
    vocab, block = int(t["vocab_size"]), int(t["block_size"])
    rows, cols = tok.grid
    if vocab < tok.n_embed:
        raise TamingImportError(f"vocab_size {vocab} is smaller than the codebook ({tok.n_embed})")
    if block < rows * cols:
        raise TamingImportError(f"block_size {block} cannot hold the {rows}x{cols} grid")
    try:
        cfg = GPTConfig(codebook_size=tok.n_embed, n_classes=n_classes, grid=(rows, cols),
                        window=(rows, 2 * cols - 1), n_layer=int(t.get("n_layer", 12)),
                        n_head=int(t.get("n_head", 8)), d_model=int(t.get("n_embd", 256)),
                        dropout=0.0, positions="sequence", vocabulary="shared",
                        start_token=int(params.get("sos_token", 0)))
    except ValueError as e:
        raise TamingImportError(f"the transformer cannot be served: {e}") from e
    return TransformerSpec(cfg, vocab, block)


# ---- the weights -------------------------------------------------------------------------------
class Reads(dict):
    """A state dict that remembers which tensors were read, so that none is left over."""

    def __init__(self, items: dict) -> None:
        super().__init__(items)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)

    def check_all_read(self, what: str, ignored: tuple[str, ...] = ()) -> None:
        left = sorted(k for k in set(self) - self.read if not k.startswith(ignored))
        if left:
            raise TamingImportError(f"{what}: the checkpoint holds tensors its config does not "
                                    f"describe ({left[:3]})")


def _stack(sd: dict, src: str, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {s: torch.cat([sd[f"{src}.{p}.{s}"] for p in parts]) for s in ("weight", "bias")}


def tokenizer_weights(sd: dict, prefix: str, cfg: TamingVQGANConfig) -> dict[str, torch.Tensor]:
    """The reference's first-stage tensors (under `prefix`) under this model's names."""
    src = Reads({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    out: dict[str, torch.Tensor] = {}
    n = len(cfg.ch_mult)

    def conv(dst: str, s: str) -> None:
        for p in ("weight", "bias"):
            if f"{s}.{p}" in src:
                out[f"{dst}.{p}"] = src[f"{s}.{p}"]

    def res(dst: str, s: str) -> None:
        for part in ("norm1", "conv1", "norm2", "conv2"):
            conv(f"{dst}.{part}", f"{s}.{part}")
        conv(f"{dst}.skip", f"{s}.nin_shortcut")

    def attn(dst: str, s: str) -> None:
        conv(f"{dst}.norm", f"{s}.norm")
        if f"{s}.q.weight" in src:
            for p, t in _stack(src, s, ("q", "k", "v")).items():
                out[f"{dst}.qkv.{p}"] = t
        conv(f"{dst}.proj", f"{s}.proj_out")

    def middle(dst: str, s: str) -> None:
        res(f"{dst}.res1", f"{s}.block_1")
        attn(f"{dst}.attn", f"{s}.attn_1")
        res(f"{dst}.res2", f"{s}.block_2")

    for side, levels, blocks, resample in (("encoder", "down", cfg.num_res_blocks, "downsample"),
                                           ("decoder", "up", cfg.num_res_blocks + 1, "upsample")):
        conv(f"{side}.stem", f"{side}.conv_in")
        middle(f"{side}.mid", f"{side}.mid")
        conv(f"{side}.out_norm", f"{side}.norm_out")
        conv(f"{side}.out_conv", f"{side}.conv_out")
        for i in range(n):
            j = i if side == "encoder" else n - 1 - i  # our decoder runs coarsest first
            for b in range(blocks):
                res(f"{side}.levels.{j}.res.{b}", f"{side}.{levels}.{i}.block.{b}")
                attn(f"{side}.levels.{j}.attn.{b}", f"{side}.{levels}.{i}.attn.{b}")
            conv(f"{side}.levels.{j}.resample.conv", f"{side}.{levels}.{i}.{resample}.conv")
    conv("quant_conv", "quant_conv")
    conv("post_quant_conv", "post_quant_conv")
    for name in ("quantize.embedding.weight", "quantize.embed.weight"):
        if name in src:
            out["quantizer.codebook"] = src[name]
    conv("quantizer.proj", "quantize.proj")
    src.check_all_read("tokenizer", ("loss.",))  # the training losses' weights are not served
    return out


def transformer_weights(sd: dict, spec: TransformerSpec) -> dict[str, torch.Tensor]:
    """minGPT's tensors under this GPT's names: key, query and value stacked into qkv (query
    first, as our forward splits it), positions cut to the training sequence, the embedding
    and head cut to the ids a shared vocabulary uses."""
    cfg = spec.config
    src = Reads({k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")})
    K, T = cfg.codebook_size, cfg.seq_len
    out = {"tok_emb.weight": src["tok_emb.weight"][:K], "head.weight": src["head.weight"][:K],
           "pos_emb.weight": src["pos_emb"].reshape(-1, cfg.d_model)[:T],
           "ln_f.weight": src["ln_f.weight"], "ln_f.bias": src["ln_f.bias"]}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}"
        mask = src[f"{b}.attn.mask"] if f"{b}.attn.mask" in src else None
        if mask is not None and not torch.equal(mask.reshape(mask.shape[-2:]),
                                                torch.tril(torch.ones(mask.shape[-2:]))):
            raise TamingImportError(f"layer {i}'s attention mask is not causal")
        for p in ("weight", "bias"):
            out[f"{b}.ln1.{p}"], out[f"{b}.ln2.{p}"] = src[f"{b}.ln1.{p}"], src[f"{b}.ln2.{p}"]
            out[f"{b}.attn.proj.{p}"] = src[f"{b}.attn.proj.{p}"]
            out[f"{b}.mlp.fc.{p}"], out[f"{b}.mlp.proj.{p}"] = src[f"{b}.mlp.0.{p}"], src[f"{b}.mlp.2.{p}"]
        for p, t in _stack(src, f"{b}.attn", ("query", "key", "value")).items():
            out[f"{b}.attn.qkv.{p}"] = t
    src.check_all_read("transformer")
    return out


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor the module has, of its shape, and nothing else."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TamingImportError(f"{what}: the checkpoint does not match its config (missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise TamingImportError(f"{what}: {k} has shape {list(state[k].shape)}, the config "
                               f"implies {list(v.shape)}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


# ---- the command ---------------------------------------------------------------------------
def locate(source: Path, config: Path | None) -> tuple[Path, Path]:
    """(checkpoint, project config) of a log folder or a `.ckpt` with --config."""
    if source.is_dir():
        ckpt = source / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise TamingImportError(f"{source}: no checkpoints/last.ckpt")
        if config is None:
            # a run's log folder holds <stamp>-project.yaml (a resumed run a newer one beside
            # the first); the tokenizer downloads ship one configs/model.yaml
            found = sorted((source / "configs").glob("*-project.yaml")) or [
                p for p in sorted((source / "configs").glob("*.yaml"))
                if not p.name.endswith("-lightning.yaml")]
            if not found or (len(found) > 1 and not found[-1].name.endswith("-project.yaml")):
                raise TamingImportError(f"{source}: no configs/*-project.yaml (nor a single "
                                        "configs/*.yaml); name it with --config")
            config = found[-1]
        return ckpt, config
    if not source.is_file():
        raise TamingImportError(f"{source}: no such file or folder")
    if config is None:
        raise TamingImportError(f"{source}: a .ckpt needs --config YAML (its project config)")
    return source, config


def read_yaml(path: Path) -> dict:
    import yaml  # the train extra's; only the importer needs it

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TamingImportError(f"{path}: unreadable config ({e})") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise TamingImportError(f"{path}: no 'model' section")
    return cfg


def paper_sampling(n_classes: int, K: int) -> dict:
    """The paper's settings: its ImageNet samples use top-k 600 and top-p 0.92; its
    sampling script's default is top-k 250 for the others."""
    if n_classes:
        return {"temperature": 1.0, "top_k": min(600, K), "top_p": 0.92, "cfg_scale": 1.0}
    return {"temperature": 1.0, "top_k": min(250, K), "top_p": 1.0, "cfg_scale": 1.0}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_classes(path: Path | None, n_classes: int) -> list[str]:
    if path is None:
        return []
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if n_classes and len(names) != n_classes:
        raise TamingImportError(f"{path}: {len(names)} class names for a model with {n_classes} classes")
    if not n_classes:
        raise TamingImportError("--classes given for a model without classes")
    return names


def import_taming(source: Path, out: Path, config: Path | None = None,
                  classes: Path | None = None, name: str | None = None,
                  sampling: dict | None = None) -> Path:
    ckpt, config = locate(Path(source), Path(config) if config else None)
    project = read_yaml(config)
    model = project["model"]
    target = _target(model)
    params = model.get("params") or {}
    if target == "taming.models.cond_transformer.Net2NetTransformer":
        first = params.get("first_stage_config")
        prefix = "first_stage_model."
    else:
        first, prefix = model, ""
    tok_cfg = tokenizer_config(first)
    spec = transformer_config(params, tok_cfg) if prefix else None
    state, placeholders = read_checkpoint(ckpt)

    tokenizer = TamingVQGAN(tok_cfg)
    load_into(tokenizer, tokenizer_weights(state, prefix, tok_cfg), "tokenizer")
    gpt = None
    if spec is not None:
        gpt = GPT(spec.config)
        try:
            weights = transformer_weights(state, spec)
        except KeyError as e:
            raise TamingImportError(f"transformer: the checkpoint lacks {e}") from e
        load_into(gpt, weights, "transformer")
    n_classes = spec.config.n_classes if spec else 0
    names = read_classes(classes, n_classes)

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TamingImportError(f"{out}: exists and is not empty")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, out / "configs" / config.name)
    data = (project.get("data") or {}).get("params") or {}
    dataset = _target(data.get("train")) or None
    source_info = {"checkpoint": ckpt.name, "sha256": sha256(ckpt), "config": config.name,
                   "target": target, "log_folder": Path(source).name,
                   "placeholders": placeholders}
    cfg = {"name": name or out.name, "dataset": dataset, "classes": names,
           "vqvae": tok_cfg.to_dict(), "source": source_info}
    save_weights(tokenizer, out / VQVAE_FILE)
    if gpt is not None:
        cfg["transformer"] = spec.config.to_dict()
        cfg["sampling_defaults"] = {**paper_sampling(n_classes, tok_cfg.n_embed), **(sampling or {})}
        save_weights(gpt, out / GPT_FILE)
    write_config(out, cfg)
    (out / "README.md").write_text(card(cfg, spec, tok_cfg))
    return out


def card(cfg: dict, spec: TransformerSpec | None, tok: TamingVQGANConfig) -> str:
    src = cfg["source"]
    lines = [f"# {cfg['name']}", "",
             "Imported with `python -m training import-taming` from a CompVis "
             "taming-transformers log folder.", "",
             f"- source: `{src['log_folder']}` (`{src['target']}`)",
             f"- checkpoint: `{src['checkpoint']}`, sha256 `{src['sha256']}`",
             f"- config: `configs/{src['config']}` (copied here)",
             f"- data set: {cfg['dataset'] or 'not named in the config'}",
             f"- tokenizer: {tok.quantizer} quantizer, {tok.n_embed} codes of {tok.embed_dim}, "
             f"f{tok.downsample}, {tok.resolution}x{tok.resolution} -> {tok.grid[0]}x{tok.grid[1]}"]
    if spec is not None:
        c = spec.config
        cond = f"{c.n_classes} classes (Labelator)" if c.n_classes else \
            f"unconditional (start token {c.start_token})"
        lines += [f"- transformer: minGPT, {c.n_layer} layers, {c.n_head} heads, width "
                  f"{c.d_model}, {cond}; vocab_size {spec.vocab_size}, block_size "
                  f"{spec.block_size}",
                  f"- sampling defaults: {json.dumps(cfg['sampling_defaults'])}",
                  "- guidance: not available (the model was trained without a null class)"]
        if spec.vocab_size > c.codebook_size:
            lines.append(f"- the head's {spec.vocab_size - c.codebook_size} rows past the "
                         "codebook were dropped (they name no code)")
    else:
        lines.append("- tokenizer only: /encode and /decode; /generate answers 422")
    if src["placeholders"]:
        lines.append(f"- classes the checkpoint named, read as inert placeholders: "
                     f"{', '.join(src['placeholders'])}")
    return "\n".join(lines + ["", "## Licence", "", LICENCE, ""])


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a taming log folder (configs/*-project.yaml, "
                   "checkpoints/last.ckpt) or a .ckpt file with --config")
    p.add_argument("--out", required=True, help="checkpoint folder to write, e.g. checkpoints/NAME")
    p.add_argument("--config", default=None, help="the project YAML of a bare .ckpt")
    p.add_argument("--classes", default=None, help="class names, one a line (ImageNet's "
                   "ship as training/imagenet_classes.txt)")
    p.add_argument("--name", default=None, help="the model's name in config.json (default: the folder's)")
    p.add_argument("--top-k", type=int, default=None, help="override the paper's default")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)


def main(args: argparse.Namespace) -> Path:
    sampling = {k: v for k, v in (("top_k", args.top_k), ("top_p", args.top_p),
                                  ("temperature", args.temperature)) if v is not None}
    out = import_taming(Path(args.source), Path(args.out), args.config, args.classes,
                        args.name, sampling)
    print(f"wrote {out}")
    return out
