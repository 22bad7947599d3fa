"""The reference implementation (taming-transformers, installed without its dependencies) and
tiny seeded models built from the paper's config structure, saved exactly as a taming log
folder: `configs/<stamp>-project.yaml` and a Lightning-style `checkpoints/last.ckpt` whose
pickle names classes that are not installed (pytorch_lightning, omegaconf).

The reference's minGPT imports `top_k_top_p_filtering` from `transformers`, which only its
sampling helpers use: a stand-in module answers that import (and leaves sys.modules right
after, so that nothing else in the test process mistakes it for the library), and nothing
here calls it.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2


def _import_mingpt():
    stubbed = "transformers" not in sys.modules
    if stubbed:
        stub = types.ModuleType("transformers")

        def unused(*args, **kwargs):
            raise AssertionError("the tests never use the reference's top-k/top-p filter")

        stub.top_k_top_p_filtering = unused
        sys.modules["transformers"] = stub
    try:
        from taming.modules.transformer.mingpt import GPT
    finally:
        if stubbed:
            del sys.modules["transformers"]
    return GPT


MinGPT = _import_mingpt()

# the structure of the published configs, at a size two CPU cores run in seconds
DDCONFIG = {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3,
            "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
            "attn_resolutions": [8], "dropout": 0.0}
N_EMBED, EMBED_DIM = 32, 16
GPT_PARAMS = {"vocab_size": N_EMBED, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}


class FirstStage(nn.Module):
    """VQModel's / GumbelVQ's modules under their names (Lightning itself is not installed)."""

    def __init__(self, gumbel: bool) -> None:
        super().__init__()
        self.gumbel = gumbel
        self.encoder, self.decoder = Encoder(**DDCONFIG), Decoder(**DDCONFIG)
        z = DDCONFIG["z_channels"]
        self.quantize = (GumbelQuantize(z, EMBED_DIM, n_embed=N_EMBED) if gumbel
                         else VectorQuantizer2(N_EMBED, EMBED_DIM, beta=0.25))
        self.quant_conv = nn.Conv2d(z, EMBED_DIM, 1)
        self.post_quant_conv = nn.Conv2d(EMBED_DIM, z, 1)
        self.loss = nn.Module()  # the training losses' weights ride along in real checkpoints
        self.loss.discriminator = nn.Conv2d(3, 4, 3)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1] -> (B, h, w) ids: the nearest code, or the Gumbel logits' argmax (the
        reference's own quantizer adds Gumbel noise even in eval mode)."""
        h = self.quant_conv(self.encoder(x))
        if self.gumbel:
            return self.quantize.proj(h).argmax(1)
        _, _, (_, _, ind) = self.quantize(h)
        return ind.view(h.shape[0], h.shape[2], h.shape[3])

    @torch.no_grad()
    def pixels(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> the reference decoder's image in [0, 255] floats (B, H, W, C)."""
        B, h, w = ids.shape
        z = self.quantize.get_codebook_entry(ids.flatten(), (B, h, w, EMBED_DIM))
        x = self.decoder(self.post_quant_conv(z)).clamp(-1, 1)
        return ((x + 1) / 2 * 255).permute(0, 2, 3, 1)


class Net2Net(nn.Module):
    """Net2NetTransformer's modules under their names."""

    def __init__(self, gumbel: bool, sos_token: int | None) -> None:
        super().__init__()
        self.first_stage_model = FirstStage(gumbel)
        self.transformer = MinGPT(**GPT_PARAMS)
        self.sos_token = sos_token

    @torch.no_grad()
    def greedy(self, cond: int, steps: int) -> torch.Tensor:
        """Net2NetTransformer.sample with sample=False: the argmax at every step."""
        x = torch.tensor([[cond]])
        for _ in range(steps):
            logits, _ = self.transformer(x[:, -GPT_PARAMS["block_size"]:])
            x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return x[0, 1:]


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights far from the reference's init (whose zero position embeddings and 0.02
    heads would make every greedy step a near tie)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_out.weight",
                              "ln1.weight", "ln2.weight", "ln_f.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() > 1 or name.endswith("pos_emb"):
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith(("embedding.weight", "embed.weight")):
                p.copy_(torch.randn(p.shape, generator=g))
            if name.endswith("transformer.head.weight"):
                p.mul_(4)
    return model.eval()


def first_stage_config(gumbel: bool) -> dict:
    params = {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": dict(DDCONFIG),
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}
    if gumbel:
        params.update(kl_weight=1e-8, temperature_scheduler_config={
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": {"warm_up_steps": 0, "max_decay_steps": 1000, "lr_start": 0.9,
                       "lr_max": 0.9, "lr_min": 1e-6}})
    target = "taming.models.vqgan.GumbelVQ" if gumbel else "taming.models.vqgan.VQModel"
    return {"target": target, "params": params}


def project_config(model: nn.Module) -> dict:
    """The project YAML taming's main.py writes, for this model."""
    data = {"target": "main.DataModuleFromConfig", "params": {"batch_size": 1, "train": {
        "target": "taming.data.faceshq.FFHQTrain", "params": {"size": 32}}}}
    if isinstance(model, FirstStage):
        cfg = first_stage_config(model.gumbel)
        return {"model": {"base_learning_rate": 4.5e-6, **cfg}, "data": data}
    params = {"transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                                     "params": dict(GPT_PARAMS)},
              "first_stage_config": first_stage_config(model.first_stage_model.gumbel),
              "first_stage_key": "image"}
    if model.sos_token is None:
        params["cond_stage_config"] = {"target": "taming.modules.util.Labelator",
                                       "params": {"n_classes": 10}}
        params["cond_stage_key"] = "class_label"
        data["params"]["train"]["target"] = "taming.data.imagenet.ImageNetTrain"
    else:
        params["cond_stage_config"] = "__is_unconditional__"
        params["sos_token"] = model.sos_token
    return {"model": {"base_learning_rate": 4.5e-6,
                      "target": "taming.models.cond_transformer.Net2NetTransformer",
                      "params": params}, "data": data}


@contextmanager
def foreign_classes():
    """Classes under the module names of packages that are not installed, present only while
    a checkpoint is pickled (pickle looks a class up by its module to name it)."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks",
             "pytorch_lightning.callbacks.model_checkpoint", "omegaconf", "omegaconf.dictconfig"]
    assert not any(n in sys.modules for n in names)
    mods = {n: types.ModuleType(n) for n in names}

    class ModelCheckpoint:
        def __reduce__(self):  # what pickling a callback that runs code on load would do
            return (ModelCheckpoint, ("monitor",))

    class DictConfig(dict):
        pass

    for cls, module in ((ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint"),
                        (DictConfig, "omegaconf.dictconfig")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
    mods["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    mods["omegaconf.dictconfig"].DictConfig = DictConfig
    sys.modules.update(mods)
    try:
        yield ModelCheckpoint, DictConfig
    finally:
        for n in names:
            sys.modules.pop(n, None)


def save_log_folder(model: nn.Module, folder: Path, stamp: str = "2020-11-09T13-31-51") -> Path:
    """The model as a taming log folder, the way the paper's downloads unpack."""
    (folder / "configs").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    (folder / "configs" / f"{stamp}-project.yaml").write_text(yaml.safe_dump(project_config(model)))
    state = model.state_dict()
    with foreign_classes() as (ModelCheckpoint, DictConfig):
        first = next(iter(state.values()))
        ckpt = {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8",
                "state_dict": state,
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros_like(first)}},
                                      "param_groups": [{"lr": 4.5e-6, "params": [0]}]}],
                "lr_schedulers": [], "hparams_name": "kwargs",
                "hyper_parameters": DictConfig(ckpt_path=None)}
        torch.save(ckpt, folder / "checkpoints" / "last.ckpt")
    return folder


def tiny(kind: str, seed: int) -> nn.Module:
    """'vq' / 'gumbel': first stages; 'uncond': Net2Net with a nearest-code tokenizer and a
    start token; 'class': Net2Net with a Gumbel tokenizer and a Labelator of 10 classes."""
    torch.manual_seed(seed)
    model = {"vq": lambda: FirstStage(False), "gumbel": lambda: FirstStage(True),
             "uncond": lambda: Net2Net(False, sos_token=3),
             "class": lambda: Net2Net(True, sos_token=None)}[kind]()
    return randomise(model, seed)
