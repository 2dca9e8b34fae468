"""``save_pretrained`` writes only what the hub layout holds, and keeps what a folder had."""

from __future__ import annotations

import os

import pytest
import torch

import moelab
from moelab.bench.train_step import hf_config
from moelab.checkpoints import api
from moelab.files import UMASK
from moelab.models import tree
from moelab.models.model import Model
from moelab.train.config import LoraConfig
from moelab.train.lora import add_lora

FAMILIES = ["tiny-qwen3", "tiny-gpt-oss"]


def _model(name: str) -> Model:
    hf = hf_config(name, 2)
    family, _ = api.FAMILIES[hf["model_type"]]
    cfg = family.Config.from_hf(hf)
    return Model(family, cfg, family.init_params(cfg, generator=torch.Generator().manual_seed(0)))


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("targets", [["experts"], ["attention"]])
def test_a_model_with_adapters_is_refused_and_the_folder_kept(name, targets, tmp_path):
    model = _model(name)
    moelab.save_pretrained(model, tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    add_lora(model.params, LoraConfig(rank=4, targets=targets))
    with pytest.raises(ValueError, match="carries LoRA adapters .*save_adapter"):
        moelab.save_pretrained(model, tmp_path / "ckpt")
    assert _snapshot(tmp_path / "ckpt") == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left


@pytest.mark.parametrize("name", FAMILIES)
def test_a_param_without_a_hub_name_is_refused(name, tmp_path):
    model = _model(name)
    model.params["layers"][1]["mlp"]["mystery"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"no hub name for params \['layers\.1\.mlp\.mystery'\]"):
        moelab.save_pretrained(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_saving_over_a_folder_replaces_the_weights_and_keeps_the_rest(tmp_path):
    model = _model("tiny-qwen3")
    folder = tmp_path / "ckpt"
    moelab.save_pretrained(model, folder, max_shard_bytes=2**16)  # sharded: several files
    assert (folder / "model.safetensors.index.json").exists()
    (folder / "tokenizer.json").write_text('{"tokens": 1}')
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("kept")
    kept = (folder / "tokenizer.json").stat().st_ino
    for _, t in tree.leaves(model.params):
        t.data.add_(1.0)
    moelab.save_pretrained(model, folder)  # one file now: the old shards and index must go
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "extra",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (folder / "tokenizer.json").read_text() == '{"tokens": 1}'
    assert (folder / "tokenizer.json").stat().st_ino == kept  # linked into place, not copied
    assert (folder / "extra" / "notes.txt").read_text() == "kept"
    again = moelab.load_pretrained(folder)
    for (path, a), (_, b) in zip(tree.leaves(model.params), tree.leaves(again.params)):
        assert torch.equal(a, b), tree.dotted(path)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~UMASK
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~UMASK


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "ckpt").write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        moelab.save_pretrained(_model("tiny-qwen3"), tmp_path / "ckpt")
    assert (tmp_path / "ckpt").read_text() == "not a folder"
