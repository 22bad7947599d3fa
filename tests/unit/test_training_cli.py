"""The training CLI end to end on small real slices (fast: tiny models, a few hundred images)."""

import json

import pytest
import torch
from training_helpers import run_training as run

from models.checkpoint import load_bundle
from models.sampling import make_batch
from models.slots import sample

TINY_VQ = ["--widths", "8,16,16", "--codebook-size", "16", "--code-dim", "4", "--batch-size", "64"]
TINY_GPT = ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--batch-size", "64"]


@pytest.mark.slow
def test_help(root):
    out = run(root, "--help")
    assert out.returncode == 0 and "vqvae" in out.stdout and "evaluate-generator" in out.stdout
    out = run(root, "vqvae", "--help")
    assert out.returncode == 0 and "--dataset" in out.stdout and "--resume" in out.stdout


@pytest.mark.slow  # a real process
def test_missing_dataset_gives_one_line_error(root, tmp_path):
    out = run(root, "vqvae", "--dataset", f"idx:{tmp_path}/none", "--out", str(tmp_path / "x"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "error:" in out.stderr


@pytest.mark.slow
def test_vqvae_then_transformer_on_a_real_slice(root, tmp_path):
    ck, runs = tmp_path / "ck", tmp_path / "runs"
    out = run(root, "vqvae", "--dataset", "mnist", "--out", str(ck), "--run-dir", str(runs / "vq"),
              "--epochs", "1", "--limit", "256", *TINY_VQ)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (runs / "vq" / "recon_epoch001.png").is_file()
    # resume continues from the saved epoch
    out = run(root, "vqvae", "--dataset", "mnist", "--out", str(ck), "--run-dir", str(runs / "vq"),
              "--epochs", "2", "--limit", "256", "--resume", *TINY_VQ)
    assert out.returncode == 0 and "resumed" in out.stdout
    assert "lr_scheduler" not in out.stderr  # nothing to fast-forward: the rate follows the step
    assert json.loads((ck / "config.json").read_text())["training"]["vqvae"]["epochs"] == 2
    out = run(root, "evaluate-vqvae", "--checkpoint", str(ck), "--train-images", "500",
              "--classifier", str(root / "checkpoints" / "mnist" / "classifier.safetensors"))
    assert out.returncode == 0, out.stderr[-2000:]
    ev = json.loads((ck / "config.json").read_text())["evaluation"]["vqvae"]
    assert 0 < ev["psnr_db"] and 0 < ev["code_usage"] <= 1 and ev["images"] == 500
    # a tokenizer trained for two epochs on 256 digits is far from the real training digits
    assert ev["train_images"] == 500 and ev["fid_ratio_reconstructions"] > 1
    assert 0 < ev["domain_fid_real_train"] < ev["domain_fid_reconstructions_train"]

    out = run(root, "transformer", "--checkpoint", str(ck), "--run-dir", str(runs / "gpt"),
              "--epochs", "1", "--limit", "256", *TINY_GPT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (runs / "gpt" / "samples_epoch001.png").is_file()
    out = run(root, "transformer", "--checkpoint", str(ck), "--run-dir", str(runs / "gpt"),
              "--epochs", "2", "--limit", "256", "--resume", *TINY_GPT)
    assert out.returncode == 0 and "resumed" in out.stdout, out.stderr[-2000:]
    assert "lr_scheduler" not in out.stderr and (runs / "gpt" / "samples_epoch002.png").is_file()
    b = load_bundle(ck, require_gpt=True)
    codes = sample(b.gpt, make_batch(b.gpt.config, 2, (7, 7), label=3,
                                     generator=torch.Generator().manual_seed(0)), (7, 7))
    assert b.vqvae.decode(codes.view(2, 7, 7)).shape == (2, 1, 28, 28)
    out = run(root, "evaluate-generator", "--checkpoint", str(ck), "--samples", "200",
              "--train-images", "500", "--classifier",
              str(root / "checkpoints" / "mnist" / "classifier.safetensors"), "--no-write")
    assert out.returncode == 0, out.stderr[-2000:]
    ev = json.loads(out.stdout.strip().splitlines()[-1])
    assert ev["samples"] == 200 and 0 <= ev["class_accuracy"] <= 1 and 0 < ev["sample_code_usage"] <= 1
    # one epoch on 256 digits: the samples sit farther from the test digits than real digits do
    assert ev["fid_ratio_samples"] > 1 and ev["domain_fid_samples"] > ev["domain_fid_real_train"]
    assert "generator" not in json.loads((ck / "config.json").read_text()).get("evaluation", {})


@pytest.mark.slow
def test_torchrun_two_processes_gloo(root, tmp_path):
    ck = tmp_path / "ddp"
    out = run(root, "vqvae", "--dataset", "mnist", "--out", str(ck), "--run-dir", str(tmp_path / "r"),
              "--epochs", "1", "--limit", "256", "--device", "cpu", *TINY_VQ, nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["training"]["vqvae"]["world_size"] == 2
    load_bundle(ck)
