"""Odd-but-valid checkpoints: shard indexes, stored dtypes, layer subsets, MXFP4 extremes.

Each is loaded by moelab and by Transformers (the oracle) and the two are compared.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import rel_err
from hf_fixtures import (
    gpt_oss_model,
    load_reference,
    qwen3_model,
    save_qwen3,
    save_random_mxfp4,
)
from safetensors.torch import load_file, save_file

import moelab
from moelab.models import tree

pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save_qwen3(tmp_path_factory.mktemp("edges") / "sharded", max_shard_size="100KB")


@pytest.fixture(scope="module")
def sharded_logits(sharded):
    return load_reference(sharded)(IDS).logits


def _index(path) -> dict:
    return json.loads((path / INDEX).read_text())


def test_index_naming_the_wrong_shard_loads_the_tensor_where_it_is(
    sharded, sharded_logits, tmp_path
):
    path = shutil.copytree(sharded, tmp_path / "ckpt")
    index = _index(path)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    moved = next(n for n, s in index["weight_map"].items() if s == shards[-1])
    index["weight_map"][moved] = shards[0]  # the tensor lives in the last shard, not the first
    (path / INDEX).write_text(json.dumps(index))
    assert rel_err(moelab.load_pretrained(path)(IDS), sharded_logits) <= 1e-5
    assert rel_err(load_reference(path)(IDS).logits, sharded_logits) == 0.0


def test_index_listing_a_tensor_no_shard_holds_is_refused_by_name(sharded, tmp_path):
    path = shutil.copytree(sharded, tmp_path / "ckpt")
    index = _index(path)
    shard = index["weight_map"]["model.norm.weight"]
    tensors = load_file(path / shard)
    del tensors["model.norm.weight"]
    save_file(tensors, path / shard, metadata={"format": "pt"})
    with pytest.raises(moelab.CheckpointError, match=r"absent: \['model\.norm\.weight'\]"):
        moelab.load_pretrained(path)


def test_extra_tensor_hidden_in_a_shard_is_named(sharded, tmp_path):
    path = shutil.copytree(sharded, tmp_path / "ckpt")
    shard = sorted(set(_index(path)["weight_map"].values()))[1]
    tensors = load_file(path / shard)
    tensors["model.layers.0.mlp.shared_expert.weight"] = torch.ones(3)
    save_file(tensors, path / shard, metadata={"format": "pt"})
    with pytest.raises(moelab.CheckpointError, match=r"1 unexpected: .*shared_expert\.weight"):
        moelab.load_pretrained(path)


def test_single_file_beside_a_shard_index_wins_as_in_transformers(sharded, tmp_path):
    # Transformers looks for model.safetensors before the index; a folder holding both (a
    # consolidated file added next to the shards) must give the same weights in moelab
    path = shutil.copytree(sharded, tmp_path / "ckpt")
    save_qwen3(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", path / "model.safetensors")
    ref = load_reference(path)(IDS).logits
    assert rel_err(ref, load_reference(tmp_path / "other")(IDS).logits) == 0.0
    assert rel_err(moelab.load_pretrained(path)(IDS), ref) <= 1e-5


def test_stored_dtype_is_cast_to_the_config_dtype_as_transformers_does(sharded, tmp_path):
    # a bf16 file under an fp32 config loads as fp32, exactly the bf16 values
    bf16_file = shutil.copytree(sharded, tmp_path / "bf16_file")
    for shard in sorted(set(_index(bf16_file)["weight_map"].values())):
        tensors = {n: t.bfloat16() for n, t in load_file(bf16_file / shard).items()}
        save_file(tensors, bf16_file / shard, metadata={"format": "pt"})
    model = moelab.load_pretrained(bf16_file)
    hf = load_reference(bf16_file)
    assert model.params["embed"]["weight"].dtype == torch.float32
    assert torch.equal(model.params["embed"]["weight"], hf.model.embed_tokens.weight)
    assert rel_err(model(IDS), hf(IDS).logits) <= 1e-5
    # an fp32 file under a bf16 config loads as bf16 when no dtype is asked for, as in Transformers
    bf16_config = shutil.copytree(sharded, tmp_path / "bf16_config")
    config = json.loads((bf16_config / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (bf16_config / "config.json").write_text(json.dumps(config))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(bf16_config)
    model = moelab.load_pretrained(bf16_config)
    assert model.params["norm"]["weight"].dtype == hf.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(model.params["norm"]["weight"], hf.model.norm.weight)


def _drop_config_dtype(path) -> None:
    config = json.loads((path / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (path / "config.json").write_text(json.dumps(config))


def _dtypes(model) -> set[torch.dtype]:
    return {t.dtype for _, t in tree.leaves(model.params)}


@pytest.mark.parametrize("shards", [None, "30KB"], ids=["one file", "shards"])
@pytest.mark.parametrize("family", ["qwen3", "gpt_oss"])
def test_config_without_dtype_loads_the_stored_dtype_as_transformers_does(tmp_path, family, shards):
    """Transformers 5's from_pretrained defaults to dtype="auto", which takes a config with no
    dtype / torch_dtype to the stored one: bf16 here (moelab loaded fp32). A dtype asked for
    still wins."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "ckpt"
    model = (qwen3_model if family == "qwen3" else gpt_oss_model)().to(torch.bfloat16)
    model.save_pretrained(path, **({"max_shard_size": shards} if shards else {}))
    _drop_config_dtype(path)
    assert (path / INDEX).exists() == (shards is not None)
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(path, dtype="auto").dtype == torch.bfloat16
    ours = moelab.load_pretrained(path)
    assert _dtypes(ours) == {torch.bfloat16}
    assert torch.equal(ours.params["embed"]["weight"], hf.model.embed_tokens.weight)
    assert _dtypes(moelab.load_pretrained(path, dtype=torch.float32)) == {torch.float32}


# Which stored dtype Transformers' dtype="auto" picks where the tensors disagree: the index's
# metadata.dtype, else the first floating-point tensor by name, of the first shard only.
# (tensor stored as fp16 or the index's metadata.dtype, files, the dtype picked)
PICKED = {
    "first name fp16 (lm_head)": ("lm_head.weight", "one file", torch.float16),
    "a later name fp16": ("model.norm.weight", "one file", torch.bfloat16),
    "first name fp16, first shard": ("lm_head.weight", "shards", torch.float16),
    # the shard holding lm_head renamed to sort last: the new first shard's tensors are bf16
    "first name fp16, last shard": ("lm_head.weight", "shards, lm_head's last", torch.bfloat16),
    "index metadata.dtype float16": ("metadata.dtype", "shards", torch.float16),
}


def _swap_first_and_last_shard(path) -> None:
    index = _index(path)
    first, *_, last = sorted(set(index["weight_map"].values()))
    swap = {first: last, last: first}
    (path / first).rename(path / "swapping")
    (path / last).rename(path / first)
    (path / "swapping").rename(path / last)
    index["weight_map"] = {n: swap.get(f, f) for n, f in index["weight_map"].items()}
    (path / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("case", list(PICKED))
def test_config_without_dtype_picks_among_stored_dtypes_as_transformers_does(tmp_path, case):
    from transformers import AutoModelForCausalLM

    fp16, files, expected = PICKED[case]
    path = tmp_path / "ckpt"
    sharded = files != "one file"
    qwen3_model().to(torch.bfloat16).save_pretrained(
        path, **({"max_shard_size": "100KB"} if sharded else {})
    )
    _drop_config_dtype(path)
    if fp16 == "metadata.dtype":
        index = _index(path)
        index["metadata"]["dtype"] = "float16"
        (path / INDEX).write_text(json.dumps(index))
    for file in sorted(set(_index(path)["weight_map"].values())) if sharded else [SINGLE]:
        tensors = load_file(path / file)
        if fp16 in tensors:
            tensors[fp16] = tensors[fp16].half()
            save_file(tensors, path / file, metadata={"format": "pt"})
            # Transformers writes lm_head into the first shard, which the swap below moves
            assert not sharded or file == min(_index(path)["weight_map"].values())
    if files == "shards, lm_head's last":
        _swap_first_and_last_shard(path)
    assert AutoModelForCausalLM.from_pretrained(path).dtype == expected
    assert _dtypes(moelab.load_pretrained(path)) == {expected}


def test_fewer_layers_than_stored_qwen3(sharded, tmp_path):
    path = shutil.copytree(sharded, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (path / "config.json").write_text(json.dumps(config))
    model = moelab.load_pretrained(path)
    assert len(model.params["layers"]) == 2
    assert rel_err(model(IDS), load_reference(path)(IDS).logits) <= 1e-5


# ---- GPT-OSS MXFP4 ----


@pytest.fixture(scope="module")
def odd_mxfp4(tmp_path_factory):
    """3 experts, random codes and exponents over the whole byte range, 0 and 255 included."""

    def edit(blocks, scales):
        scales[0, 0, :2] = torch.tensor([0, 255])
        scales[-1, -1, :2] = torch.tensor([1, 254])

    return save_random_mxfp4(tmp_path_factory.mktemp("mxfp4"), edit)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_extreme_exponents_dequantise_as_transformers_bit_for_bit(odd_mxfp4, dtype):
    model = moelab.load_pretrained(odd_mxfp4, dtype=dtype)
    hf = load_reference(odd_mxfp4, dtype)
    for layer in range(2):
        ref = hf.model.layers[layer].mlp.experts
        gate_up = ref.gate_up_proj.detach().transpose(1, 2)  # [E, 2I, H], gate/up interleaved
        gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
        down = ref.down_proj.detach().transpose(1, 2)
        ours = model.params["layers"][layer]["mlp"]["experts"]
        assert ours["gate_up"].dtype == gate_up.dtype == dtype
        # exponent 255 overflows to inf, exponent 0 gives subnormals: compare the bits
        assert torch.equal(_bits(ours["gate_up"]), _bits(gate_up)), layer
        assert torch.equal(_bits(ours["down"]), _bits(down)), layer
    values = ours["gate_up"].float()
    assert values.isinf().any() and values.isfinite().any()
    assert ((values != 0) & (values.abs() < 2.0**-126)).any()  # subnormal


def test_mxfp4_save_split_across_shards_loads_in_transformers(tmp_path):
    gpt_oss_model(num_local_experts=3, num_hidden_layers=2).save_pretrained(tmp_path / "bf16")
    model = moelab.load_pretrained(tmp_path / "bf16")
    out = tmp_path / "mxfp4"
    moelab.save_pretrained(model, out, experts_format="mxfp4", max_shard_bytes=3000)
    weight_map = _index(out)["weight_map"]
    blocks = [n for n in weight_map if n.endswith("_blocks")]
    assert len(blocks) == 4
    assert any(weight_map[n] != weight_map[n.replace("_blocks", "_scales")] for n in blocks)
    again = moelab.load_pretrained(out)
    hf = load_reference(out, torch.float32)
    ref = hf.model.layers[1].mlp.experts.gate_up_proj.detach().transpose(1, 2)
    ref = torch.cat([ref[:, 0::2], ref[:, 1::2]], dim=1)
    assert torch.equal(again.params["layers"][1]["mlp"]["experts"]["gate_up"], ref)
    assert rel_err(again(IDS), hf(IDS).logits) <= 1e-5


def test_mxfp4_fewer_layers_than_stored(odd_mxfp4, tmp_path):
    path = shutil.copytree(odd_mxfp4, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 1
    config["layer_types"] = config["layer_types"][:1]
    (path / "config.json").write_text(json.dumps(config))
    full = moelab.load_pretrained(odd_mxfp4)
    model = moelab.load_pretrained(path)
    assert len(model.params["layers"]) == 1
    for name in ("gate_up", "down", "gate_up_bias"):
        a = model.params["layers"][0]["mlp"]["experts"][name]
        b = full.params["layers"][0]["mlp"]["experts"][name]
        assert torch.equal(_bits(a), _bits(b)), name
