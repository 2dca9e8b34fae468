"""Packed documents at the model boundary, and expert counts of any integer ids.

``document_ids`` of one sequence may be ``[S]`` (read as ``[1, S]``, as position ids are); a
shape that does not fit ``input_ids`` or a non-integer dtype is refused up front. A document is a
maximal run of equal consecutive ids: positions restart there, and attention must agree, so an id
that comes back later in a row (``[0, 0, 1, 1, 0, 0]``) is a document of its own. Tiny random
models from the bench configs, re-randomised so that norms, biases and sinks are not the init's
ones and zeros (which would hide whole classes of bugs).
"""

from __future__ import annotations

import pytest
import torch

from moelab.bench.train_step import hf_config
from moelab.checkpoints import api
from moelab.models import tree
from moelab.models.decoder import document_runs, positions_from_documents
from moelab.models.options import ForwardOptions
from moelab.ops import expert_counts, load_balancing_loss

FAMILIES = ["tiny-qwen3", "tiny-gpt-oss"]
OPTIONS = {"sdpa": ForwardOptions(attention="sdpa"), "eager": ForwardOptions(attention="eager")}
# float32 logits of a document packed with others against the document alone: the attention
# sums run over other key counts and masks, so they round differently (worst seen 1.2e-6 on
# logits up to 2.7)
ATOL = RTOL = 1e-5


def _rerandomized(path: tree.Path, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
    name = str(path[-1])
    if "norm" in tree.dotted(path):
        return 1 + 0.3 * noise
    if name.endswith(("bias", "sinks")):
        return 0.5 * noise
    return 0.08 * noise


def _model(name: str, **overrides):
    """``(family, config, params)``. GPT-OSS: a sliding layer (window 4, so 40+ tokens take the
    blockwise path) then a full one."""
    hf = {**hf_config(name, 2), **overrides}
    if hf["model_type"] == "gpt_oss":
        hf.setdefault("sliding_window", 4)
    family, _ = api.FAMILIES[hf["model_type"]]
    cfg = family.Config.from_hf(hf)
    params = family.init_params(cfg, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    params = tree.map_leaves(lambda p, t: _rerandomized(p, t, g), params)
    if hf["model_type"] == "gpt_oss":
        assert cfg.layer_types == ("sliding_attention", "full_attention")
    return family, cfg, params


def _ids(cfg, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _runs(lengths: list[int], ids: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for n, i in zip(lengths, ids)])


def test_document_runs_and_positions_share_boundaries():
    docs = torch.tensor([[0, 0, 1, 1, 0, 0], [5, 5, 5, -2, -2, 5]])
    assert document_runs(docs).tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2]]
    assert positions_from_documents(docs).tolist() == [[0, 1, 0, 1, 0, 1], [0, 1, 2, 0, 1, 0]]


@pytest.mark.parametrize("name", FAMILIES)
def test_1d_document_ids_are_one_row(name):
    """Before the fix ``[S]`` raised IndexError (tuple index out of range) in the positions."""
    family, cfg, params = _model(name)
    ids = _ids(cfg, 40)
    docs = _runs([13, 1, 26], [0, 1, 2])
    expected = family.forward(cfg, params, ids[None], document_ids=docs[None])
    assert torch.equal(family.forward(cfg, params, ids[None], document_ids=docs), expected)
    assert torch.equal(family.forward(cfg, params, ids, document_ids=docs), expected)
    # [S] serves every row of a batch, as [S] position ids do
    batch = _ids(cfg, 2, 40, seed=1)
    assert torch.equal(
        family.forward(cfg, params, batch, document_ids=docs),
        family.forward(cfg, params, batch, document_ids=docs[None].expand(2, -1)),
    )


BAD_DOCUMENTS = {
    "one token short": lambda docs: docs[:, :-1],
    "one token short, [S]": lambda docs: docs[0, :-1],
    "three rows for two": lambda docs: docs[:1].expand(3, -1),
    "3-D": lambda docs: docs[None],
    "0-D": lambda docs: docs[0, 0],
    "float ids": lambda docs: docs.float(),
    "bool ids": lambda docs: docs > 0,
}


@pytest.mark.parametrize("case", list(BAD_DOCUMENTS))
def test_document_ids_that_do_not_fit_are_refused(case):
    """Before the fix: IndexError or RuntimeError deep in the positions or the attention mask,
    or (float, bool) no error at all."""
    family, cfg, params = _model("tiny-qwen3")
    ids = _ids(cfg, 2, 12)
    docs = torch.tensor([[0] * 6 + [1] * 6, [0] * 12])
    with pytest.raises(ValueError, match="document_ids"):
        family.forward(cfg, params, ids, document_ids=BAD_DOCUMENTS[case](docs))


BAD_POSITIONS = {
    "one token short": lambda pos: pos[:, :-1],
    "one token short, [S]": lambda pos: pos[0, :-1],
    "three rows for two": lambda pos: pos[:1].expand(3, -1),
    "3-D": lambda pos: pos[None],
    "float positions": lambda pos: pos.float(),
}


@pytest.mark.parametrize("case", list(BAD_POSITIONS))
def test_position_ids_that_do_not_fit_are_refused(case):
    """Before: a broadcast error inside RoPE or the attention, or (float) no error at all."""
    family, cfg, params = _model("tiny-qwen3")
    ids = _ids(cfg, 2, 12)
    positions = torch.arange(12).expand(2, -1)
    with pytest.raises(ValueError, match="position_ids"):
        family.forward(cfg, params, ids, position_ids=BAD_POSITIONS[case](positions))
    # the shapes that fit: [S], [1, S] and [B, S] give the same logits
    expected = family.forward(cfg, params, ids)
    for fits in (positions[0], positions[:1], positions):
        assert torch.equal(family.forward(cfg, params, ids, position_ids=fits), expected)


@pytest.mark.parametrize("attention", list(OPTIONS))
@pytest.mark.parametrize("name", FAMILIES)
def test_a_reused_id_is_a_new_document(name, attention):
    """Before the fix attention masked by id equality while positions restarted at every run:
    the third document of ``[0, 0, 1, 1, 0, 0]`` attended the first one (logits up to 2.1
    apart on Qwen3, 1.1 on GPT-OSS, against ``[0, 0, 1, 1, 2, 2]``; logits of size 2)."""
    family, cfg, params = _model(name)
    options = OPTIONS[attention]
    ids = _ids(cfg, 2, 6)
    reused = torch.tensor([[0, 0, 1, 1, 0, 0]] * 2)
    distinct = torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
    expected = family.forward(cfg, params, ids, document_ids=distinct, options=options)
    got = family.forward(cfg, params, ids, document_ids=reused, options=options)
    assert torch.equal(got, expected)
    # 53 tokens: GPT-OSS's sliding layer takes the blockwise path
    lengths = [13, 1, 30, 9]
    ids = _ids(cfg, 53)
    reused = _runs(lengths, [3, 7, 3, 7])
    expected = family.forward(cfg, params, ids, document_ids=_runs(lengths, [0, 1, 2, 3]))
    assert torch.equal(family.forward(cfg, params, ids, document_ids=reused), expected)


# document lengths per row, and the ids that mark them (reused ones included)
PACKINGS = {
    "reused ids, blockwise window": ([[13, 1, 30, 9]], [[0, 1, 0, 1]]),
    "two rows, ids shared across rows": ([[5, 20, 15], [40]], [[2, 9, 2], [2]]),
    "documents of one token": ([[1, 1, 1, 3]], [[0, 1, 0, 1]]),
}


@pytest.mark.parametrize("packing", list(PACKINGS))
@pytest.mark.parametrize("attention", list(OPTIONS))
@pytest.mark.parametrize("name", FAMILIES)
def test_each_packed_document_equals_its_own_run(name, attention, packing):
    family, cfg, params = _model(name)
    options = OPTIONS[attention]
    lengths_rows, ids_rows = PACKINGS[packing]
    seq = sum(lengths_rows[0])
    tokens = _ids(cfg, len(lengths_rows), seq)
    docs = torch.stack([_runs(n, i) for n, i in zip(lengths_rows, ids_rows)])
    out = family.forward(cfg, params, tokens, document_ids=docs, options=options)
    for row, lengths in enumerate(lengths_rows):
        start = 0
        for n in lengths:
            alone = family.forward(cfg, params, tokens[row, start : start + n], options=options)
            torch.testing.assert_close(out[row, start : start + n], alone[0], atol=ATOL, rtol=RTOL)
            start += n


EXPERTS = [[0, 3, 3], [5, 0, 3], [3, 1, 0]]  # bincount: 3, 1, 0, 4, 0, 1 over 6 experts


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_expert_counts_of_any_integer_ids(dtype):
    """Before the fix int32 and uint8 ids raised RuntimeError in ``scatter_add_``."""
    experts = torch.tensor(EXPERTS, dtype=dtype)
    counts = expert_counts(experts, 6)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [3, 1, 0, 4, 0, 1]
    probs = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)).softmax(-1)
    expected = load_balancing_loss(probs, torch.tensor(EXPERTS))
    assert torch.equal(load_balancing_loss(probs, experts), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_expert_counts_refuse_non_integer_ids(dtype):
    with pytest.raises(ValueError, match="integer"):
        expert_counts(torch.tensor(EXPERTS).to(dtype), 6)
