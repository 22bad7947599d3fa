"""VQGAN training: its losses, resumable state, the CLI on a real slice, and the evaluation figures."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from training_helpers import run_training as run

from models.checkpoint import load_bundle
from training.classifier import Classifier, load_classifier, save_classifier
from training.common import load_states, save_states
from training.data import load_dataset
from training.evaluation import Reference, tokenizer_report
from training.perceptual import PerceptualLoss, PerceptualNet
from training.vqgan import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss

TINY_VQ = ["--widths", "8,16,16", "--codebook-size", "16", "--code-dim", "4", "--batch-size", "64"]
TINY_GAN = ["--loss", "vqgan", "--disc-start", "1", "--disc-width", "8", "--perceptual-epochs", "1"]


def test_patch_discriminator_scores_patches():
    x = torch.rand(3, 1, 28, 28)
    assert PatchDiscriminator(1, 8, layers=2)(x).shape == (3, 1, 5, 5)
    assert PatchDiscriminator(1, 8, layers=1)(x).shape == (3, 1, 12, 12)
    assert PatchDiscriminator(3, 8, layers=2)(torch.rand(2, 3, 28, 28)).shape == (2, 1, 5, 5)
    # GroupNorm: a sample's logits do not depend on the rest of its batch
    d = PatchDiscriminator(1, 8).train()
    assert torch.allclose(d(x)[:1], d(x[:1]), atol=1e-5)


def test_hinge_losses():
    confident = hinge_d_loss(torch.full((4, 1, 5, 5), 2.0), torch.full((4, 1, 5, 5), -2.0))
    assert float(confident) == 0.0  # beyond the margin on both sides: nothing to learn
    fooled = hinge_d_loss(torch.full((4, 1, 5, 5), -1.0), torch.full((4, 1, 5, 5), 1.0))
    assert float(fooled) == pytest.approx(2.0)
    assert float(hinge_g_loss(torch.full((2, 1, 5, 5), 3.0))) == -3.0


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    last = torch.nn.Conv2d(4, 1, 3, padding=1)
    h = torch.randn(2, 4, 8, 8)
    out = last(h)
    rec = out.pow(2).mean()
    gan = -(out * 3).mean()
    w = adaptive_weight(rec, gan, last.weight)
    g_rec = torch.autograd.grad(last(h).pow(2).mean(), last.weight)[0]
    g_gan = torch.autograd.grad(-(last(h) * 3).mean(), last.weight)[0]
    assert float(w) == pytest.approx(float(g_rec.norm() / (g_gan.norm() + 1e-4)), rel=1e-5)
    assert not w.requires_grad
    rec.backward()  # the graph survives for the real backward pass


def test_perceptual_loss_is_a_distance_that_trains_the_generator():
    torch.manual_seed(0)
    loss = PerceptualLoss(PerceptualNet(1, 10))
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(loss(x, x), torch.zeros(4), atol=1e-6)
    y = F.avg_pool2d(x, 3, 1, 1).requires_grad_(True)
    d = loss(x, y)
    assert d.shape == (4,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())  # the feature net stays frozen
    assert not loss.train().training


def test_state_file_holds_several_modules_and_optimizers(tmp_path):
    def make():
        torch.manual_seed(1)
        a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
        return a, b, torch.optim.Adam(a.parameters()), torch.optim.Adam(b.parameters(), lr=0.5)

    a, b, oa, ob = make()
    for _ in range(2):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(torch.randn(4, m.in_features)).sum().backward()
            o.step()
    save_states(tmp_path / "s.safetensors", {"model": a, "disc": b}, {"opt": oa, "disc_opt": ob},
                {"epoch": 3})
    a2, b2, oa2, ob2 = make()
    meta = load_states(tmp_path / "s.safetensors", {"model": a2, "disc": b2}, {"opt": oa2, "disc_opt": ob2})
    assert meta["epoch"] == 3
    assert torch.equal(a2.weight, a.weight) and torch.equal(b2.weight, b.weight)
    assert ob2.param_groups[0]["lr"] == 0.5
    assert torch.equal(ob2.state_dict()["state"][0]["exp_avg"], ob.state_dict()["state"][0]["exp_avg"])
    # the transformer's state (one model, one optimizer) loads into its own pair alone
    save_states(tmp_path / "one.safetensors", {"model": a}, {"opt": oa}, {"epoch": 1})
    assert load_states(tmp_path / "one.safetensors", {"model": a2}, {"opt": oa2})["epoch"] == 1


def test_classifier_files_of_both_architectures_load(root, tmp_path):
    old = load_classifier(root / "checkpoints" / "mnist" / "classifier.safetensors")
    assert old.arch == 1 and old.test_accuracy >= 0.99
    clf = Classifier(1, 10).eval()
    save_classifier(clf, tmp_path / "c.safetensors")
    again = load_classifier(tmp_path / "c.safetensors")
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    assert again.arch == 2 and torch.equal(again.features(x), clf.features(x))


@pytest.mark.slow
def test_tokenizer_report_separates_the_floor_from_the_reconstructions(root):
    folder = root / "checkpoints" / "mnist"
    data = load_dataset("mnist")
    clf = load_classifier(folder / "classifier.safetensors")
    ref = Reference(clf, data, n_train=1000, seed=0)
    r = tokenizer_report(load_bundle(folder).vqvae, ref)
    assert r["train_images"] == 1000
    # real digits are closer to the test digits than the tokenizer's reconstructions are
    assert 0 < r["domain_fid_real_train"] < r["domain_fid_reconstructions_train"]
    assert r["fid_ratio_reconstructions"] > 1
    assert r["psnr_db_train"] > 20 and r["code_usage_train"] > 0.9
    assert r["reconstruction_class_accuracy"] > 0.9 and r["real_train_class_accuracy"] > 0.95


@pytest.mark.slow
def test_vqgan_cli_trains_resumes_and_ships_no_discriminator(root, tmp_path):
    ck, rd = tmp_path / "ck", tmp_path / "run"
    args = ["vqvae", "--dataset", "mnist", "--out", str(ck), "--run-dir", str(rd), "--limit", "128",
            *TINY_VQ, *TINY_GAN]
    out = run(root, *args, "--epochs", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    # the learning rates follow the global step: no scheduler stepped before its optimizer
    assert "lr_scheduler" not in out.stderr
    assert (rd / "perceptual.safetensors").is_file() and (rd / "recon_epoch001.png").is_file()
    log = json.loads(out.stdout.strip().splitlines()[-1])
    assert log["epoch"] == 1 and "d" in log and "w" in log and log["w"] > 0
    state = load_file(str(rd / "state.safetensors"))
    assert any(k.startswith("disc.") for k in state) and any(k.startswith("disc_opt.") for k in state)
    # the serving checkpoint is the tokenizer alone (load_bundle rejects unexpected tensors)
    assert not any(k.startswith("disc") for k in load_file(str(ck / "vqvae.safetensors")))
    load_bundle(ck)
    out = run(root, *args, "--epochs", "2", "--resume")
    assert out.returncode == 0 and "resumed" in out.stdout, out.stderr[-2000:]
    assert "lr_scheduler" not in out.stderr
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["training"]["vqvae"]["epochs"] == 2 and cfg["training"]["vqvae"]["loss"] == "vqgan"
    assert (rd / "recon_epoch002.png").is_file()
    # a VQGAN state never resumes a plain run
    out = run(root, "vqvae", "--dataset", "mnist", "--out", str(ck), "--run-dir", str(rd), "--limit", "128",
              *TINY_VQ, "--epochs", "3", "--resume")
    assert out.returncode != 0 and "vqgan" in out.stderr

    # fine-tuning a trained tokenizer keeps its architecture
    out = run(root, "vqvae", "--dataset", "mnist", "--out", str(tmp_path / "ft"), "--run-dir",
              str(tmp_path / "ftrun"), "--limit", "128", "--batch-size", "64", "--epochs", "1",
              "--init", str(ck), "--perceptual", str(rd / "perceptual.safetensors"), *TINY_GAN)
    assert out.returncode == 0, out.stderr[-2000:]
    ft = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert ft["vqvae"] == cfg["vqvae"] and ft["training"]["vqvae"]["init"]["from"] == str(ck)
    # decoder only: the encoder and codebook, hence every token grid, stay; the decoder moves,
    # grown by a full-resolution block
    out = run(root, "vqvae", "--dataset", "mnist", "--out", str(tmp_path / "dec"), "--run-dir",
              str(tmp_path / "decrun"), "--limit", "128", "--batch-size", "64", "--epochs", "1",
              "--init", str(ck), "--train-decoder-only", "--perceptual", str(rd / "perceptual.safetensors"),
              "--decoder-fine-blocks", "1", *TINY_GAN)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = load_bundle(ck).vqvae, load_bundle(tmp_path / "dec").vqvae
    x = load_dataset("mnist").test.floats()[:200]
    assert torch.equal(before.encode(x), after.encode(x))
    assert torch.equal(before.quantizer.embed, after.quantizer.embed)
    assert not torch.equal(before.decoder.net[-1].weight, after.decoder.net[-1].weight)
    assert (before.config.decoder_fine_blocks, after.config.decoder_fine_blocks) == (0, 1)
    assert after.decoder.net[-4].block[-1].weight.abs().sum() > 0  # the new block learned


@pytest.mark.slow
def test_decoder_only_carries_the_transformer_along(root, tmp_path):
    """The shipped MNIST tokenizer, decoder fine-tuned: the folder serves with the shipped transformer."""
    rd = tmp_path / "run"
    out = run(root, "perceptual", "--dataset", "mnist", "--out", str(rd / "p.safetensors"), "--epochs", "1",
              "--limit", "128")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["train_images"] == 128
    out = run(root, "vqvae", "--dataset", "mnist", "--out", str(tmp_path / "ck"), "--run-dir", str(rd),
              "--limit", "128", "--epochs", "1", "--init", str(root / "checkpoints" / "mnist"),
              "--train-decoder-only", "--perceptual", str(rd / "p.safetensors"), *TINY_GAN)
    assert out.returncode == 0, out.stderr[-2000:]
    shipped = load_bundle(root / "checkpoints" / "mnist")
    tuned = load_bundle(tmp_path / "ck", require_gpt=True)
    assert torch.equal(tuned.gpt.tok_emb.weight, shipped.gpt.tok_emb.weight)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["sampling_defaults"] == shipped.config["sampling_defaults"]
    assert cfg["training"]["transformer"]["carried_from"] == str(root / "checkpoints" / "mnist")
    assert cfg["training"]["vqvae"]["init"]["trained"] == "decoder only"


@pytest.mark.slow
def test_vqgan_torchrun_two_processes_gloo(root, tmp_path):
    ck = tmp_path / "ddp"
    out = run(root, "vqvae", "--dataset", "mnist", "--out", str(ck), "--run-dir", str(tmp_path / "r"),
              "--epochs", "1", "--limit", "256", "--device", "cpu", *TINY_VQ, *TINY_GAN, nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((ck / "config.json").read_text())["training"]["vqvae"]["world_size"] == 2
    load_bundle(ck)


def test_carried_transformer_brings_its_classes_and_limits(tmp_path):
    """A decoder-only run on a folder of photographs names its data's folders as classes; the
    transformer it carries was trained unconditional (or on other classes): its own classes,
    and its serving limit, go with it, or the folder does not load."""
    from models.checkpoint import CONFIG, GPT_FILE
    from training.vqvae import carry_transformer

    init, out = tmp_path / "init", tmp_path / "out"
    init.mkdir()
    out.mkdir()
    (init / GPT_FILE).write_bytes(b"weights")
    (init / CONFIG).write_text(json.dumps({"classes": [], "max_grid": [256, 256], "vqvae": {},
                                           "transformer": {"n_classes": 0}}))
    (out / CONFIG).write_text(json.dumps({"classes": ["Storm", "Wood"], "vqvae": {}}))
    assert carry_transformer(init, out)
    cfg = json.loads((out / CONFIG).read_text())
    assert cfg["classes"] == [] and cfg["max_grid"] == [256, 256]
    assert cfg["transformer"] == {"n_classes": 0} and (out / GPT_FILE).read_bytes() == b"weights"
