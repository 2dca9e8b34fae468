"""Bad checkpoints are refused with one clear error, before any data is read."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hf_fixtures import save_qwen3

import moelab


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_qwen3(tmp_path_factory.mktemp("good") / "ckpt")


@pytest.fixture
def ckpt(good, tmp_path):
    return shutil.copytree(good, tmp_path / "ckpt")


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(moelab.CheckpointError, match=r"1 missing: .*experts\.5\.up_proj"):
        moelab.load_pretrained(ckpt)


def test_unexpected_and_wrong_shape_reported_together(ckpt):
    def edit(t):
        t["model.layers.0.mlp.mystery.weight"] = t["model.norm.weight"].clone()
        t["model.layers.0.self_attn.q_norm.weight"] = t["model.layers.0.self_attn.q_norm.weight"][
            :16
        ]

    _rewrite(ckpt, edit)
    with pytest.raises(moelab.CheckpointError) as info:
        moelab.load_pretrained(ckpt)
    message = str(info.value)
    assert "1 unexpected: model.layers.0.mlp.mystery.weight" in message
    assert "q_norm.weight: stored [16], expected [32]" in message


def test_fp8_tensors_are_refused_whole(ckpt):
    def edit(t):
        for name in [n for n in t if ".experts." in n]:
            t[name] = t[name].to(torch.float8_e4m3fn)

    _rewrite(ckpt, edit)
    with pytest.raises(moelab.CheckpointError, match=r"\d+ tensors are stored as FP8 \(e\.g\. "):
        moelab.load_pretrained(ckpt)


def test_non_float_tensors_are_listed_before_any_is_read(ckpt):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
        t["model.layers.1.self_attn.k_norm.weight"] = torch.ones_like(
            t["model.layers.1.self_attn.k_norm.weight"], dtype=torch.uint8
        )

    _rewrite(ckpt, edit)
    with pytest.raises(moelab.CheckpointError, match="2 wrong dtype: ") as info:
        moelab.load_pretrained(ckpt)
    message = str(info.value)
    assert "model.norm.weight: stored int32, expected bf16, fp16 or fp32" in message
    assert "k_norm.weight: stored uint8" in message


def test_truncated_file(ckpt):
    file = ckpt / "model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(moelab.CheckpointError, match="truncated"):
        moelab.load_pretrained(ckpt)


def test_corrupt_header(ckpt):
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    with pytest.raises(moelab.CheckpointError, match="corrupt safetensors header"):
        moelab.load_pretrained(ckpt)


def test_missing_shard(tmp_path):
    path = save_qwen3(tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    os.remove(shard)
    with pytest.raises(moelab.CheckpointError, match=f"shards .* missing: \\['{shard.name}'\\]"):
        moelab.load_pretrained(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="llama"), "unsupported model_type 'llama'"),
        (lambda c: c.pop("num_local_experts"), "lacks num_experts"),
        (lambda c: c.pop("hidden_size"), "lacks required keys: hidden_size"),
        (
            lambda c: c.update(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}),
            "unsupported rope type 'dynamic'",
        ),
        (lambda c: c.update(dtype="float13"), "unknown dtype"),
        (lambda c: c.update(decoder_sparse_step=0), "decoder_sparse_step must be >= 1"),
        (lambda c: c.update(rms_norm_eps=-1.0), "rms_norm_eps=-1.0 must be > 0"),
        (lambda c: c.update(num_key_value_heads=3), "4 attention heads do not group into 3 kv"),
        (lambda c: c.update(num_experts_per_tok=9), "top-k 9 exceeds the 8 experts"),
        (lambda c: c.update(hidden_size="64"), "hidden_size='64' must be an integer >= 1"),
        (lambda c: c.update(moe_intermediate_size=0), "moe_intermediate_size=0 must be an"),
        (
            lambda c: c.update(quantization_config={"quant_method": "fp8"}),
            "quant_method='fp8' is not supported for qwen3_moe",
        ),
    ],
)
def test_bad_config(ckpt, edit, message):
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(moelab.CheckpointError, match=message):
        moelab.load_pretrained(ckpt)


def test_null_sizes_take_their_defaults_as_in_transformers(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(num_key_value_heads=None, rms_norm_eps=None)
    (ckpt / "config.json").write_text(json.dumps(config))
    cfg = moelab.read_config(ckpt)
    assert cfg.num_kv_heads == cfg.num_heads and cfg.rms_norm_eps == 1e-6


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(moelab.CheckpointError, match="does not exist"):
        moelab.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(moelab.CheckpointError, match="config.json does not exist"):
        moelab.load_pretrained(tmp_path / "empty")
