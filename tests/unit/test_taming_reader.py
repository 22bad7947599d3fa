"""The importer's checkpoint reader and its refusals (tests/service/test_taming_import.py
proves the imported models equal to the reference code)."""

from __future__ import annotations

import os
import sys
from collections import OrderedDict

import pytest
import taming_reference as ref
import torch
import yaml

from training.__main__ import main as training_main
from training.taming_import import Placeholder, TamingImportError, import_taming, read_checkpoint


class RunsCode:
    """What a hostile checkpoint holds: unpickling it would run a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tensors_come_back_exactly_and_nothing_else_runs_or_is_imported(tmp_path, monkeypatch):
    ran, imported = tmp_path / "ran", tmp_path / "imported"
    (tmp_path / "boom_on_import.py").write_text(
        f"open({str(imported)!r}, 'w').close()\nclass Callback:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import boom_on_import  # the class must be importable to be pickled at all

    imported.unlink()
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    state = OrderedDict(w=base, t=base.t(), view=base[1:3, 2:], half=torch.ones(3).half(),
                        ids=torch.arange(5), empty=torch.zeros(0, 3))
    torch.save({"state_dict": state, "callbacks": {boom_on_import.Callback: RunsCode(str(ran))},
                "hyper_parameters": boom_on_import.Callback()}, tmp_path / "x.ckpt")
    del sys.modules["boom_on_import"]

    got, placeholders = read_checkpoint(tmp_path / "x.ckpt")
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert not ran.exists() and not imported.exists() and "boom_on_import" not in sys.modules
    assert placeholders == ["boom_on_import.Callback", f"{os.system.__module__}.system"]


def test_a_placeholder_is_inert():
    cls = type("DictConfig", (Placeholder,), {"module": "omegaconf", "name": "DictConfig"})
    obj = cls(1, 2)
    obj.__setstate__({"content": 3})
    obj["k"] = "v"
    assert obj.args == (1, 2) and obj.state == {"content": 3} and obj.items == [("k", "v")]
    assert "omegaconf.DictConfig" in repr(obj)


def test_not_a_checkpoint_or_no_state_dict(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"not a zip")
    with pytest.raises(TamingImportError, match="not a zip-format"):
        read_checkpoint(tmp_path / "bad.ckpt")
    torch.save({"epoch": 1}, tmp_path / "empty.ckpt")
    with pytest.raises(TamingImportError, match="no state_dict"):
        read_checkpoint(tmp_path / "empty.ckpt")


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return ref.save_log_folder(ref.tiny("class", 0), tmp_path_factory.mktemp("t") / "log")


def test_a_ckpt_with_its_config_imports_like_the_folder(log, tmp_path):
    a = import_taming(log, tmp_path / "a")
    config = next((log / "configs").glob("*.yaml"))
    b = import_taming(log / "checkpoints" / "last.ckpt", tmp_path / "b", config=config)
    for f in ("vqvae.safetensors", "transformer.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert (a / "configs" / config.name).is_file()
    card = (a / "README.md").read_text()
    assert "Licence" in card and "sha256" in card and "MIT" in card


def edited(log, tmp_path, edit) -> str:
    cfg = yaml.safe_load(next((log / "configs").glob("*.yaml")).read_text())
    edit(cfg["model"]["params"])
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("edit,message", [
    (lambda p: p.update(cond_stage_config={"target": "taming.models.vqgan.VQModel"}),
     "conditioning"),
    (lambda p: p["first_stage_config"]["params"].update(remap="used.npy"), "remap"),
    (lambda p: p["transformer_config"]["params"].update(block_size=16), "block_size"),
    (lambda p: p["transformer_config"]["params"].update(n_layer=3), "lacks"),
    (lambda p: p["transformer_config"]["params"].update(n_layer=1), "does not describe"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(num_res_blocks=0), "positive"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(ch=64), "shape"),
    (lambda p: p.update(permuter_config={"target": "taming.modules.transformer.permuter.Random"}),
     "permuter"),
])
def test_what_cannot_be_served_is_refused_with_a_reason(log, tmp_path, capsys, edit, message):
    config = edited(log, tmp_path, edit)
    code = training_main(["import-taming", str(log / "checkpoints" / "last.ckpt"),
                          "--config", config, "--out", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.json").exists()


def test_the_cli_refusals(log, tmp_path, capsys):
    ckpt = str(log / "checkpoints" / "last.ckpt")
    assert training_main(["import-taming", ckpt, "--out", str(tmp_path / "o")]) == 2
    assert "--config" in capsys.readouterr().err
    assert training_main(["import-taming", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "last.ckpt" in capsys.readouterr().err
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    assert training_main(["import-taming", str(log), "--out", str(tmp_path / "o"),
                          "--classes", str(names)]) == 2
    assert "2 class names" in capsys.readouterr().err
    assert training_main(["import-taming", str(log), "--out", str(log)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_the_shipped_imagenet_classes(root):
    names = (root / "training" / "imagenet_classes.txt").read_text().splitlines()
    assert len(names) == 1000 and names[0].startswith("tench") and names[-1].startswith("toilet tissue")


def test_a_tokenizer_download_with_configs_model_yaml(tmp_path):
    log = ref.save_log_folder(ref.tiny("vq", 4), tmp_path / "vqgan_imagenet_f16_16384")
    project = next((log / "configs").glob("*-project.yaml"))
    project.rename(log / "configs" / "model.yaml")
    out = import_taming(log, tmp_path / "out")
    assert (out / "configs" / "model.yaml").is_file() and not (out / "transformer.safetensors").exists()
    (log / "configs" / "other.yaml").write_text("model: {}\n")
    with pytest.raises(TamingImportError, match="--config"):
        import_taming(log, tmp_path / "out2")
