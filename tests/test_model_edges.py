"""Model forwards on odd but valid inputs against Transformers on tiny random checkpoints:
windows shorter or longer than the sequence, mixed layer types, extreme sinks, one token, GQA
extremes, dense layers between MoE layers, YaRN variants and far positions, packed documents and
padding, and gradients in float64."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import rel_err
from hf_fixtures import gpt_oss_model, load_reference, save_qwen3
from safetensors.torch import load_file, save_file

import moelab
from moelab.checkpoints import gpt_oss as gpt_oss_names
from moelab.checkpoints import qwen3_moe as qwen3_names
from moelab.checkpoints.mapping import saved_tensors
from moelab.models import tree
from moelab.models.hf_config import rope_config
from moelab.ops.rope import rope_frequencies

pytest.importorskip("transformers")

SDPA, EAGER = moelab.ForwardOptions(attention="sdpa"), moelab.ForwardOptions(attention="eager")
EXACT = moelab.ForwardOptions(backend="native_torch", attention="eager", accumulate="input")


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _save_gpt_oss(path, post=None, **overrides):
    model = gpt_oss_model(**overrides)
    if post is not None:
        post(model)
    model.save_pretrained(path)
    return path


def _set_sinks(values):
    def post(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("sinks"):
                    p.copy_(torch.tensor(values))

    return post


FULL, SLIDING = "full_attention", "sliding_attention"
GPT_OSS_CASES = {
    # 40 tokens > 2 band blocks of 16: the blockwise sliding-window path
    "window 4 < 40 tokens (banded)": (dict(), (2, 40), None),
    "window 1 (only the token itself)": (dict(sliding_window=1), (2, 40), None),
    "window 64 > 20 tokens": (dict(sliding_window=64), (2, 20), None),
    "window 17, 70 tokens (band block 32)": (dict(sliding_window=17), (1, 70), None),
    "layer types full, sliding, sliding, full": (
        dict(layer_types=[FULL, SLIDING, SLIDING, FULL]),
        (2, 20),
        None,
    ),
    "sinks +-30 and +-8": (dict(), (2, 40), _set_sinks([30.0, -30.0, 8.0, -8.0])),
    "one token, batch 3": (dict(), (3, 1), None),
    "one kv head": (dict(num_key_value_heads=1), (2, 20), None),
    "kv heads == heads": (dict(num_key_value_heads=4), (2, 20), None),
    "head_dim 24 != hidden / heads": (dict(head_dim=24), (2, 20), None),
    "default rope, theta 500": (
        dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
        (2, 20),
        None,
    ),
}


@pytest.mark.parametrize("case", list(GPT_OSS_CASES))
def test_gpt_oss_edges_match_transformers(tmp_path, case):
    overrides, shape, post = GPT_OSS_CASES[case]
    path = _save_gpt_oss(tmp_path / "ckpt", post, **overrides)
    ids = _ids(*shape)
    ref = load_reference(path)(ids).logits
    model = moelab.load_pretrained(path)
    for options in (SDPA, EAGER):
        assert rel_err(model(ids, options=options), ref) <= 1e-5, options.attention


QWEN3_CASES = {
    "kv heads == heads": dict(num_key_value_heads=4),
    "one kv head": dict(num_key_value_heads=1),
    "sparse step 3 + mlp_only [1], 5 layers": dict(
        num_hidden_layers=5, decoder_sparse_step=3, mlp_only_layers=[1]
    ),
    "sparse step 2 + mlp_only [3], 4 layers": dict(
        num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]
    ),
    "attention bias": dict(attention_bias=True),
    "tied embeddings, renormalised": dict(tie_word_embeddings=True),
    "head_dim 12": dict(head_dim=12),
    "top-k = all experts": dict(num_experts_per_tok=8),
    "rope theta 3": dict(rope_theta=3.0),
    "rms eps 0.5": dict(rms_norm_eps=0.5),
    "yarn mscale / mscale_all_dim": dict(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1e4,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 0.7,
            "mscale_all_dim": 1.0,
        }  # fmt: skip
    ),
    "yarn truncate false, betas 8 / 2": dict(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1e4,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "truncate": False,
            "beta_fast": 8.0,
            "beta_slow": 2.0,
        }  # fmt: skip
    ),
    "v4 rope_scaling with 'type'": dict(
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=1e5,
    ),
}


@pytest.mark.parametrize("case", list(QWEN3_CASES))
def test_qwen3_edges_match_transformers(tmp_path, case):
    path = save_qwen3(tmp_path / "ckpt", **QWEN3_CASES[case])
    ids = _ids(2, 20)
    ref = load_reference(path)(ids).logits
    model = moelab.load_pretrained(path)
    for options in (SDPA, EAGER):
        assert rel_err(model(ids, options=options), ref) <= 1e-5, options.attention


@pytest.mark.parametrize("family", ["qwen3", "gpt_oss"])
def test_one_token_and_given_positions_match_transformers(tmp_path, family):
    """Seq len 1, positions starting far from 0, and different positions per batch row."""
    path = save_qwen3(tmp_path / "q") if family == "qwen3" else _save_gpt_oss(tmp_path / "g")
    ref, model = load_reference(path), moelab.load_pretrained(path)
    one = _ids(1, 1)
    assert rel_err(model(one), ref(one).logits) <= 1e-5
    ids = _ids(2, 20)
    positions = torch.stack([torch.arange(1000, 1020), torch.arange(7, 27)])
    expected = ref(ids, position_ids=positions).logits
    assert rel_err(model(ids, position_ids=positions), expected) <= 1e-5


def test_position_ids_of_one_sequence_may_be_1d(tmp_path):
    """``input_ids`` may be ``[S]``; so may its ``position_ids`` (they broadcast over the batch).
    Before the fix [S] cos/sin broadcast over the heads instead of the positions: silently wrong
    logits when S equals the head counts (here 4 query and 4 kv heads, 4 tokens)."""
    path = save_qwen3(tmp_path / "ckpt", num_key_value_heads=4)
    model = moelab.load_pretrained(path)
    ids, positions = _ids(1, 4)[0], torch.arange(3, 7)
    expected = load_reference(path)(ids[None], position_ids=positions[None]).logits
    assert rel_err(model(ids, position_ids=positions), expected) <= 1e-5
    batch = _ids(2, 4)
    assert (
        rel_err(
            model(batch, position_ids=positions),
            model(batch, position_ids=positions[None].expand(2, -1)),
        )
        == 0.0
    )


YARN_GRID = itertools.product(
    [10.0, 1e4, 1e6],  # theta
    [8, 32, 64],  # head dim
    [1.0, 4.0, 40.0],  # factor
    [64, 4096],  # original max positions
    [(32.0, 1.0), (4.0, 2.0)],  # beta fast, slow
    [True, False],  # truncate
)


def test_yarn_frequencies_are_transformers_bits():
    """inv_freq and the attention factor over a grid of YaRN settings, bit for bit. Before the
    fix the ramp weights were ``ramp`` and ``1 - ramp`` where Transformers has
    ``1 - (1 - ramp)``: 1 fp32 ULP apart in about a tenth of the settings (e.g. DeepSeek-V3's
    theta 1e4, head 64, factor 40, original 4096)."""
    from transformers import Qwen3MoeConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    mismatched = []
    for theta, head_dim, factor, original, (fast, slow), truncate in YARN_GRID:
        rope = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "beta_fast": fast,
                "beta_slow": slow, "truncate": truncate,
                "original_max_position_embeddings": original}  # fmt: skip
        hf = Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim,
                            rope_parameters=dict(rope), max_position_embeddings=8192)  # fmt: skip
        ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
        inv, att = rope_frequencies(rope_config(hf.to_dict(), head_dim))
        if not torch.equal(inv, ref_inv) or att != ref_factor:
            mismatched.append((rope, head_dim))
    assert not mismatched, mismatched[:3]


def test_bf16_yarn_bit_exact_at_far_positions(tmp_path):
    """At positions near 1000 a 1-ULP inv_freq difference reaches bf16 cos/sin."""
    path = save_qwen3(tmp_path / "ckpt", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                      "factor": 4.0, "original_max_position_embeddings": 64})  # fmt: skip
    ids = _ids(2, 20)
    positions = torch.arange(1000, 1020)[None].expand(2, -1)
    ref = load_reference(path, torch.bfloat16)(ids, position_ids=positions).logits
    model = moelab.load_pretrained(path, dtype=torch.bfloat16)
    assert torch.equal(model(ids, position_ids=positions, options=EXACT), ref)


def _gradients_match(path, ids, names, layout, options):
    """Logits and every parameter's gradient of ``sum(logits * w)`` against Transformers, both in
    float64; moelab's gradient tree goes through the save mapping to Transformers' names."""
    ref = load_reference(path, torch.float64)
    ref_logits = ref(ids).logits
    w = torch.randn(
        ref_logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    (ref_logits * w).sum().backward()
    model = moelab.load_pretrained(path, dtype=torch.float64)
    for _, t in tree.leaves(model.params):
        t.requires_grad_(True)
    logits = model(ids, options=options)
    assert rel_err(logits, ref_logits) <= 1e-6
    (logits * w).sum().backward()
    grads = tree.map_leaves(lambda p, t: t.grad, model.params)
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, grad in saved_tensors(grads, names.targets(model.config, grads, layout)):
        assert ref_params[name].grad.abs().sum() > 0, name
        assert rel_err(grad, ref_params[name].grad) <= 1e-5, name
        checked += 1
    assert checked == len(ref_params)


@pytest.mark.parametrize("options", [SDPA, EAGER], ids=["sdpa", "eager"])
def test_gpt_oss_float64_gradients_banded_window_and_sinks(tmp_path, options):
    """40 tokens, window 4, one kv head, sinks of both signs: the blockwise path's backward."""
    path = _save_gpt_oss(tmp_path / "ckpt", _set_sinks([3.0, -3.0, 0.5, -0.5]),
                         num_key_value_heads=1)  # fmt: skip
    _gradients_match(path, _ids(2, 40), gpt_oss_names, "bf16", options)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=1, tie_word_embeddings=True, norm_topk_prob=False),
        dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3], attention_bias=True),
    ],
    ids=["one kv head, tied, no renorm", "sparse step 2 + mlp_only, bias"],
)
def test_qwen3_float64_gradients(tmp_path, overrides):
    path = save_qwen3(tmp_path / "ckpt", **overrides)
    _gradients_match(path, _ids(2, 20), qwen3_names, "fused", SDPA)


@pytest.mark.parametrize("window", [4, 5])
def test_gpt_oss_packed_documents_equal_separate_transformers_runs(tmp_path, window):
    """53 packed tokens (the blockwise path) in documents of 13, 1, 30 and 9 tokens."""
    path = _save_gpt_oss(tmp_path / "ckpt", sliding_window=window)
    ref, model = load_reference(path), moelab.load_pretrained(path)
    lengths = [13, 1, 30, 9]
    docs = [_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    for options in (SDPA, EAGER):
        out, start = model(packed, document_ids=doc_ids, options=options)[0], 0
        for doc in docs:
            expected = ref(doc[None]).logits[0]
            assert rel_err(out[start : start + len(doc)], expected) <= 1e-5, options.attention
            start += len(doc)


@pytest.mark.parametrize("family", ["qwen3", "gpt_oss"])
def test_padding_as_a_document_matches_transformers_attention_mask(tmp_path, family):
    """Right padding: the padded tail as a document of its own leaves the real tokens' logits as
    Transformers computes them under an attention mask."""
    path = save_qwen3(tmp_path / "q") if family == "qwen3" else _save_gpt_oss(tmp_path / "g")
    ids = _ids(2, 20)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 12:] = 0
    expected = load_reference(path)(ids, attention_mask=mask).logits
    out = moelab.load_pretrained(path)(ids, document_ids=1 - mask)
    assert rel_err(out[0], expected[0]) <= 1e-5
    assert rel_err(out[1, :12], expected[1, :12]) <= 1e-5


def test_gpt_oss_config_without_head_dim_takes_transformers_defaults(tmp_path):
    """A config.json without head_dim or num_key_value_heads: Transformers takes
    GptOssConfig's class defaults, 64 and 8 (moelab took hidden / heads and heads, and refused
    the checkpoint's shapes)."""
    path = _save_gpt_oss(tmp_path / "ckpt", num_attention_heads=16, num_key_value_heads=8,
                         head_dim=64)  # fmt: skip
    config = json.loads((path / "config.json").read_text())
    del config["head_dim"], config["num_key_value_heads"]
    (path / "config.json").write_text(json.dumps(config))
    ids = _ids(2, 10)
    assert rel_err(moelab.load_pretrained(path)(ids), load_reference(path)(ids).logits) <= 1e-5


# How the stored lm_head.weight relates to the embedding, under tie_word_embeddings: true.
# Transformers 5.24 (PreTrainedModel.tie_weights in from_pretrained) ties only where the two are
# equal once cast to the load dtype; else it warns and keeps the stored head. A file without the
# embedding has it tied to the stored head (the tie is symmetric).
TIED_HEADS = [
    "distinct",  # the fixtures' own lm_head: random, unlike the embedding
    "equal",
    "only the head",
    "equal in bf16 only",  # fp32 values 2^-20 apart, one bf16 value: untied in fp32, tied in bf16
]


def _store_head(tensors: dict, head: str) -> None:
    embed = tensors["model.embed_tokens.weight"]
    if head == "equal":
        tensors["lm_head.weight"] = embed.clone()
    elif head == "only the head":
        del tensors["model.embed_tokens.weight"]
    elif head == "equal in bf16 only":
        tensors["model.embed_tokens.weight"] = embed.bfloat16().float()
        tensors["lm_head.weight"] = embed.bfloat16().float() * (1 + 2**-20)


@pytest.mark.parametrize("head", TIED_HEADS)
@pytest.mark.parametrize("family", ["qwen3", "gpt_oss"])
def test_tied_config_with_a_stored_head_loads_as_transformers_does(tmp_path, family, head):
    """Tied or not, and the head and embedding weights, as Transformers has them, per dtype.
    moelab used to drop the stored head of a Qwen3 (logits 1.40 off Transformers' where it
    differs) and refuse a GPT-OSS's as unexpected (and a head without an embedding, for both)."""
    path = save_qwen3(tmp_path / "ckpt") if family == "qwen3" else _save_gpt_oss(tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")
    _store_head(tensors, head)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ids = _ids(2, 20)
    for dtype in (torch.float32, torch.bfloat16):
        ref = load_reference(path, dtype)
        model = moelab.load_pretrained(path, dtype=dtype)
        ref_head, ref_embed = ref.lm_head.weight, ref.model.embed_tokens.weight
        tied = ref_head.data_ptr() == ref_embed.data_ptr()
        untied_in_fp32 = head == "equal in bf16 only" and dtype == torch.float32
        assert tied == (head != "distinct" and not untied_in_fp32), dtype
        assert model.config.tie_word_embeddings == tied == ("lm_head" not in model.params), dtype
        assert torch.equal(model.params["embed"]["weight"], ref_embed), dtype
        assert torch.equal(model.family.lm_head_weight(model.config, model.params), ref_head)
        if dtype == torch.float32:
            assert rel_err(model(ids), ref(ids).logits) <= 1e-5
    # the bf16 model saves tied or untied as loaded and comes back bit for bit
    moelab.save_pretrained(model, tmp_path / "saved")
    again = moelab.load_pretrained(tmp_path / "saved")
    assert again.config.tie_word_embeddings == tied
    assert torch.equal(again(ids), model(ids))
