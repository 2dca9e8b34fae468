"""The routers, the router statistics and the grouped_mm / native_torch expert backends on odd
but valid inputs the other files do not vary: DeepSeek-V3's group-limited router against
Transformers' own router bit for bit (the renormalisation's sum order included), at k = E, one
token and no tokens; every router's weights and logits gradient in fp32 and bf16 against the
documented math in float64; the statistics at one token with experts that get nothing; and the
two torch backends at expert counts that are not powers of two with empty experts at the start,
middle and end, k = E, fp16, no tokens, one trainable leaf at a time, one bias alone, separate
gate and up adapters (of equal and of different ranks), operands passed as views, and
``accumulate="input"`` against Transformers' eager experts bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LOGITS_GRAD_TOLERANCE, TOLERANCE, rel_err
from reference import reference_experts
from test_experts import Case, make_problem, routing_of, run_backend, run_reference, trainables
from test_moe_block import _reference_picks, _reference_stats
from test_triton_edges import FP16_TOLERANCE, _relayout

from moelab.ops import (
    ExpertLoRA,
    expert_counts,
    load_balancing_loss,
    moe_experts,
    route,
    router_entropy,
    router_z_loss,
)
from moelab.ops.lora import expert_lora_from_params
from moelab.ops.routing import Routing

TORCH_BACKENDS = ["native_torch", "grouped_mm"]

# ---- routers ---------------------------------------------------------------------------------


def _deepseek_router(num_experts, top_k, n_group, topk_group, scale, renormalize, g):
    """Transformers' DeepSeek-V3 router (GLM-4.x's is a copy) with random weight and bias."""
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=scale,
        norm_topk_prob=renormalize,
        hidden_size=16,
    )
    router = modeling.DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(num_experts, 16, generator=g) * 0.5)
        router.e_score_correction_bias.copy_(torch.randn(num_experts, generator=g) * 0.1)
    return router


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(
    "num_experts, top_k, n_group, topk_group",
    [(16, 8, 4, 2), (12, 5, 3, 2), (8, 8, 4, 4), (8, 6, 1, 1)],
    ids=["E=16 k=8", "E=12 k=5 G=3", "k=E, all groups", "G=1 k=6"],
)
def test_group_limited_router_matches_transformers_bit_for_bit(
    num_experts, top_k, n_group, topk_group, renormalize
):
    """``route`` (torch's ops on the CPU) gives Transformers' picks in its order and its weights
    bit for bit, as ``route``'s docstring promises. Transformers picks with ``topk(sorted=False)``:
    the renormalising sum runs over the k weights in that order, and at k >= 5 a sum in
    descending-score order rounded differently (1 ulp off in about half such calls; 6 in 60
    bf16 blocks of 512 tokens then differed from Transformers' eager MoE output)."""
    g = torch.Generator().manual_seed(top_k * num_experts)
    for _ in range(3):
        router = _deepseek_router(num_experts, top_k, n_group, topk_group, 2.5, renormalize, g)
        x = torch.randn(17, 16, generator=g)
        with torch.no_grad():
            logits, hf_weights, hf_ids = router(x)
        r = route(
            logits,
            "sigmoid_group_topk",
            top_k,
            n_group=n_group,
            topk_group=topk_group,
            correction_bias=router.e_score_correction_bias,
            routed_scaling_factor=2.5,
            renormalize=renormalize,
        )
        assert torch.equal(r.experts, hf_ids)
        assert torch.equal(r.weights, hf_weights)


def _weights64(logits64, kind, picks, renormalize, scale):
    """The documented weights of ``picks`` (a [T, K] id tensor), float64, differentiable:
    softmax_topk p[picks] (/ sum), topk_softmax softmax over the picked logits, DeepSeek-V3
    sigmoid[picks] / (sum + 1e-20) * scale."""
    if kind == "softmax_topk":
        w = (logits64.exp() / logits64.exp().sum(-1, keepdim=True)).gather(1, picks)
        return w / w.sum(-1, keepdim=True) if renormalize else w
    if kind == "topk_softmax":
        top = logits64.gather(1, picks).exp()
        return top / top.sum(-1, keepdim=True)
    w = (1 / (1 + (-logits64).exp())).gather(1, picks)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale


ROUTER_CASES = [
    # kind, E, k, options
    ("softmax_topk", 5, 5, {"renormalize": False}),
    ("softmax_topk", 7, 3, {"renormalize": False}),
    ("topk_softmax", 5, 5, {}),
    ("topk_softmax", 7, 1, {}),
    ("sigmoid_group_topk", 8, 8, dict(n_group=4, topk_group=4, routed_scaling_factor=2.5)),
    ("sigmoid_group_topk", 6, 3, dict(n_group=3, topk_group=2, routed_scaling_factor=2.5)),
    ("sigmoid_group_topk", 6, 3, dict(n_group=3, topk_group=2, renormalize=False)),
    ("sigmoid_group_topk", 5, 2, dict(routed_scaling_factor=1.8, renormalize=False)),
]


@pytest.mark.parametrize("tokens", [1, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind, num_experts, top_k, options", ROUTER_CASES)
def test_router_weights_and_logits_gradient_match_float64(
    kind, num_experts, top_k, options, dtype, tokens
):
    """Picks, weights and the gradient to the logits against the documented math in float64
    (picks from test_moe_block's reference); a loss weighing each (token, expert) pair by its
    own coefficient, so slot order does not matter. The correction bias, a trainable-looking
    leaf here, steers the picks but gets no gradient and does not enter the weights."""
    g = torch.Generator().manual_seed(num_experts * 10 + top_k)
    base = (torch.randn(tokens, num_experts, generator=g) * 2).to(dtype)
    options = dict(options)
    bias = None
    if kind == "sigmoid_group_topk":
        # large enough to change some picks against the plain scores
        bias = (torch.randn(num_experts, generator=g) * 0.3).requires_grad_(True)
        options["correction_bias"] = bias
    coeff_TE = torch.randn(tokens, num_experts, generator=g, dtype=torch.float64)

    logits = base.clone().requires_grad_(True)
    r = route(logits, kind, top_k, **options)
    assert r.weights.dtype == torch.float32 and r.experts.dtype == torch.int64
    pick_options = {k: options[k] for k in ("n_group", "topk_group") if k in options}
    if bias is not None:
        pick_options["correction_bias"] = bias.detach().double()
    picks = _reference_picks(base.double(), kind, top_k, **pick_options)
    assert [sorted(p) for p in r.experts.tolist()] == [sorted(p) for p in picks]

    logits64 = base.double().requires_grad_(True)
    w64 = _weights64(
        logits64,
        kind,
        r.experts,
        options.get("renormalize", True),
        options.get("routed_scaling_factor", 1.0),
    )
    torch.testing.assert_close(r.weights.double(), w64.detach(), rtol=3e-7, atol=1e-7)
    (r.weights.double() * coeff_TE.gather(1, r.experts)).sum().backward()
    (w64 * coeff_TE.gather(1, r.experts)).sum().backward()
    assert logits.grad.dtype == dtype
    if kind != "topk_softmax" or top_k > 1:  # one softmax weight is 1 whatever the logits
        assert logits64.grad.abs().max() > 1e-3
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradient is rounded to bf16
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=tol, atol=tol * 1e-2)
    if bias is not None:
        assert bias.grad is None


@pytest.mark.parametrize("kind, num_experts, top_k, options", ROUTER_CASES)
def test_routers_of_no_tokens(kind, num_experts, top_k, options):
    """No tokens: empty [0, k] weights (fp32) and ids (int64), and an empty gradient."""
    logits = torch.zeros(0, num_experts, requires_grad=True)
    r = route(logits, kind, top_k, **options)
    assert r.weights.shape == r.experts.shape == (0, top_k)
    assert r.weights.dtype == torch.float32 and r.experts.dtype == torch.int64
    r.weights.sum().backward()
    assert logits.grad.shape == (0, num_experts)


def test_one_expert_per_group_is_refused_and_one_group_of_one_is_not():
    """Group scores sum each group's best two experts, so n_group = E (E >= 2) is refused as
    documented (E/G >= 2); n_group = 1 is no group limit and runs even at E = 1, where the one
    expert's weight is the scaling factor."""
    with pytest.raises(ValueError, match="at least 2 experts per group"):
        route(torch.randn(3, 4), "sigmoid_group_topk", 2, n_group=4, topk_group=2)
    r = route(torch.randn(3, 1), "sigmoid_group_topk", 1, routed_scaling_factor=2.5)
    assert r.experts.tolist() == [[0]] * 3
    torch.testing.assert_close(r.weights, torch.full((3, 1), 2.5))


def test_tied_groups_and_bias_that_moves_the_pick_to_a_worse_score():
    """Every group tied: the picks are 2 experts of one group (never a mix of groups); then a
    correction bias that selects experts whose unbiased scores are the lowest: the weights are
    those low scores, renormalised and scaled."""
    logits = torch.zeros(2, 8)
    r = route(logits, "sigmoid_group_topk", 2, n_group=4, topk_group=1)
    for ids in r.experts.tolist():
        assert len({e // 2 for e in ids}) == 1
    logits = torch.tensor([[2.0, 2.0, 1.0, 1.0, -1.0, -1.5, 0.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    r = route(
        logits,
        "sigmoid_group_topk",
        2,
        n_group=4,
        topk_group=1,
        correction_bias=bias,
        routed_scaling_factor=3.0,
    )
    assert sorted(r.experts[0].tolist()) == [4, 5]
    s4, s5 = 1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(1.5))
    expected = {4: 3 * s4 / (s4 + s5), 5: 3 * s5 / (s4 + s5)}
    for e, w in zip(r.experts[0].tolist(), r.weights[0].tolist()):
        assert w == pytest.approx(expected[e], rel=1e-6)


# ---- router statistics -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax_topk", "sigmoid_group_topk"])
def test_router_stats_of_one_token_with_unrouted_experts(kind):
    """One token, experts that get no row (one of them with a probability that underflows to 0
    in fp32): counts, balance loss, z-loss and entropy against test_moe_block's float64
    definitions, with the balance and z losses' gradients to the logits."""
    base = torch.tensor([[1.5, -200.0, 0.25, 3.0, -1.0]])
    logits = base.clone().requires_grad_(True)
    r = route(logits, kind, 2)
    if kind == "sigmoid_group_topk":
        probs = logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
    else:
        probs = logits.softmax(-1)
    picks = _reference_picks(base.double(), kind, 2)
    assert sorted(r.experts[0].tolist()) == sorted(picks[0]) == [0, 3]
    logits64 = base.double().requires_grad_(True)
    aux64, z64, entropy64, counts64 = _reference_stats(logits64, kind, picks, 5)
    counts = expert_counts(r.experts, 5)
    assert torch.equal(counts, counts64.long()) and counts.tolist() == [1, 0, 0, 1, 0]
    aux = load_balancing_loss(probs, r.experts, counts)
    z = router_z_loss(logits)
    entropy = router_entropy(probs.detach())
    for actual, expected in ((aux, aux64), (z, z64), (entropy, entropy64)):
        assert actual.dtype == torch.float32 and actual.dim() == 0
        torch.testing.assert_close(actual.double(), expected.detach(), rtol=1e-6, atol=1e-7)
    for actual, expected in ((aux, aux64), (z, z64)):
        (grad,) = torch.autograd.grad(actual, logits, retain_graph=True)
        (grad64,) = torch.autograd.grad(expected, logits64, retain_graph=True)
        assert torch.isfinite(grad).all() and grad64.abs().max() > 1e-2
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-7)


# ---- the grouped_mm and native_torch expert backends -----------------------------------------


def _check(p: dict, backend: str, tol: float | None = None) -> dict:
    """Output and every gradient asked for (the routing weights' too, where the logits train)
    against test_experts' float64 reference; returns the backend's output and gradients."""
    weights_grad = p["logits"].requires_grad
    out, grads = run_backend(p, backend, weights_grad=weights_grad)
    ref_out, ref_grads = run_reference(p, routing_of(p).experts, weights_grad=weights_grad)
    dtype = p["x"].dtype
    tol = tol or TOLERANCE[dtype]
    assert out.dtype == dtype and rel_err(out, ref_out) <= tol
    assert set(grads) == set(ref_grads)
    inputs = trainables(p)
    for name, grad in grads.items():
        # the routing weights are fp32 whether a leaf or computed by route()
        assert grad.dtype == (inputs[name].dtype if name in inputs else torch.float32), name
        limit = max(LOGITS_GRAD_TOLERANCE.get(dtype, tol), tol) if name == "logits" else tol
        assert rel_err(grad, ref_grads[name]) <= limit, name
    return dict(grads, out=out)


EDGE_SHAPES = [
    # empty experts at the start, middle and end of an expert count that is not a power of two
    Case("E=7, empty 0 3 6", tokens=12, hidden=16, inter=8, experts=7, top_k=2, cold=(0, 3, 6)),
    Case("E=3, k=E", tokens=9, hidden=16, inter=8, experts=3, top_k=3),
    Case("E=5, T=1, k=E", tokens=1, hidden=16, inter=8, experts=5, top_k=5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", EDGE_SHAPES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_odd_shapes_and_fp16_match_reference(backend, case, dtype):
    """GPT-OSS's activation, both biases and LoRA, everything trainable; routing weights as a
    leaf where one token makes the router's own gradient rounding noise in low precision; an
    expert without rows gets exact zeros in every per-expert gradient."""
    leaf = case.tokens < 8
    p = make_problem(case, "all_trainable", dtype, seed=3, leaf_weights=leaf)
    grads = _check(p, backend, FP16_TOLERANCE if dtype == torch.float16 else None)
    for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
        for e in case.cold:
            assert not grads[name][e].any(), (name, e)


@pytest.mark.parametrize("variant", ["lora", "all_trainable"])
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_no_tokens_give_an_empty_output_and_zero_gradients(backend, variant):
    """T = 0 (an empty micro-batch): an empty output still in the graph, and a zero gradient of
    its full shape for every trainable tensor, as the triton backend gives (test_triton.py)."""
    p = make_problem(Case("T=0", tokens=0), variant, torch.float32)
    out, grads = run_backend(p, backend)
    assert out.shape == (0, p["x"].shape[1])
    named = trainables(p)
    assert set(grads) == set(named)
    for name, grad in grads.items():
        assert grad.shape == named[name].shape and not grad.any(), name


LEAVES = ["x", "logits", "weights", "gate_up", "down", "gate_up_bias", "down_bias"]
LEAVES += ["lora_a1", "lora_b1", "lora_a2", "lora_b2"]


@pytest.mark.parametrize("trained", LEAVES)
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_one_trainable_leaf_at_a_time(backend, trained):
    """Only one tensor requires grad (grouped_mm's backward picks its products by
    ``needs_input_grad``): it alone gets a gradient, and the right one."""
    case = Case("one", tokens=10, hidden=16, inter=8, experts=5, top_k=2, cold=(0, 4))
    p = make_problem(
        case, "all_trainable", torch.float32, seed=5, leaf_weights=trained == "weights"
    )
    for name, leaf in trainables(p).items():
        leaf.requires_grad_(name == trained)
    grads = _check(p, backend)
    # the logits train through the routing weights, whose gradient _check compares too
    assert set(grads) - {"out"} == ({trained, "weights"} if trained == "logits" else {trained})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", ["gate_up_bias", "down_bias"])
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_one_bias_without_the_other(backend, bias, dtype):
    """A gate_up bias alone or a down bias alone (GPT-OSS activation); the empty experts 0 and 4
    get exact zeros for their bias."""
    case = Case("bias", tokens=10, hidden=16, inter=8, experts=5, top_k=2, cold=(0, 4))
    p = make_problem(case, "all_trainable", dtype, seed=11)
    p["down_bias" if bias == "gate_up_bias" else "gate_up_bias"] = None
    grads = _check(p, backend)
    for e in case.cold:
        assert not grads[bias][e].any()


@pytest.mark.parametrize("ranks", [(4, 4, 8), (4, 8, 4)], ids=["equal", "gate 4 up 8"])
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_separate_gate_and_up_adapters(backend, ranks):
    """Separate gate and up adapters (``expert_lora_from_params``), ranks r_gate and r_up, and
    down's of its own rank, against merged float64 weights built here from each adapter's own
    ``B A`` (not through the block-diagonal combination): output and every gradient, the
    adapters' included. Different gate and up ranks used to fail building the combined B."""
    r_gate, r_up, r_down = ranks
    e, h, i, t, k, scale = 5, 16, 8, 10, 2, 0.5
    g = torch.Generator().manual_seed(sum(ranks))

    def leaf(*shape, std=0.3):
        return (torch.randn(*shape, generator=g) * std).requires_grad_(True)

    adapters = {
        "gate_a": leaf(e, r_gate, h),
        "gate_b": leaf(e, i, r_gate),
        "up_a": leaf(e, r_up, h),
        "up_b": leaf(e, i, r_up),
        "down_a": leaf(e, r_down, i),
        "down_b": leaf(e, h, r_down),
    }
    x, gate_up, down = leaf(t, h, std=1.0), leaf(e, 2 * i, h, std=1.0), leaf(e, h, i, std=0.25)
    logits = torch.randn(t, e, generator=g)
    logits[:, 2] = -30.0  # expert 2 gets no rows
    routing = route(logits, "softmax_topk", k)
    dout = torch.randn(t, h, generator=g)
    lora = expert_lora_from_params(adapters, scale)
    assert lora.gate_up_a.shape[1] == r_gate + r_up and lora.rank_max == max(r_gate + r_up, r_down)
    out = moe_experts(x, routing, gate_up, down, lora=lora, backend=backend)
    leaves = {"x": x, "gate_up": gate_up, "down": down, **adapters}
    grads = torch.autograd.grad(out, list(leaves.values()), dout)

    ref_leaves = {n: v.detach().double().requires_grad_(True) for n, v in leaves.items()}
    r = ref_leaves
    delta_gate_up = torch.cat([r["gate_b"] @ r["gate_a"], r["up_b"] @ r["up_a"]], dim=1)
    ref_out = reference_experts(
        r["x"],
        routing.weights.detach().double(),
        routing.experts,
        r["gate_up"] + scale * delta_gate_up,
        r["down"] + scale * r["down_b"] @ r["down_a"],
    )
    ref_grads = torch.autograd.grad(ref_out, list(ref_leaves.values()), dout.double())
    assert rel_err(out, ref_out) <= TOLERANCE[torch.float32]
    for name, grad, ref in zip(leaves, grads, ref_grads):
        assert ref.abs().max() > 0
        assert rel_err(grad, ref) <= TOLERANCE[torch.float32], name
        if name != "x":
            assert not grad[2].any(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["misaligned", "strided", "transposed"])
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_operands_as_views(backend, kind, dtype):
    """x, weights, biases, LoRA factors and leaf routing weights passed as views of another
    layout (test_triton_edges' relayout): the same bits as contiguous operands, except fp32
    weights transposed in memory, where the GEMMs may sum in another order: there the float64
    bound holds."""
    case = Case("views", tokens=10, hidden=16, inter=8, experts=3, top_k=2, cold=(1,))
    p = make_problem(case, "all_trainable", dtype, seed=7, leaf_weights=True)
    ref = _check(p, backend)
    for name in ("x", "weights", "gate_up", "down", "gate_up_bias", "down_bias"):
        p[name] = _relayout(p[name], kind)
    lora = p["lora"]
    p["lora"] = ExpertLoRA(*(_relayout(t, kind) for t in lora.tensors()), lora.scale)
    if kind == "transposed" and dtype == torch.float32:
        _check(p, backend)
        return
    out, grads = run_backend(p, backend)
    assert torch.equal(out, ref["out"])
    for name, grad in grads.items():
        assert torch.equal(grad, ref[name]), name


@pytest.mark.parametrize("weights_dtype", ["fp32", "x"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("top_k, cold", [(2, (0, 2, 4)), (5, ())], ids=["cold 0 2 4", "k=E"])
def test_native_input_accumulation_is_transformers_eager_bit_for_bit(
    top_k, cold, dtype, weights_dtype
):
    """``accumulate="input"`` (native_torch) against Transformers' eager experts (DeepSeek-V3's,
    a copy of Qwen3-MoE's loop): the same bits, with fp32 routing weights (DeepSeek, GLM) and
    with weights in x's dtype (Qwen), at E = 5 with empty experts and at k = E."""
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    e, h, i, t = 5, 16, 8, 33
    cfg = DeepseekV3Config(
        n_routed_experts=e, hidden_size=h, moe_intermediate_size=i, hidden_act="silu"
    )
    cfg._experts_implementation = "eager"
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        experts = modeling.DeepseekV3Experts(cfg).to(dtype)
        with torch.no_grad():
            experts.gate_up_proj.copy_(torch.randn(e, 2 * i, h, generator=g))
            experts.down_proj.copy_(torch.randn(e, h, i, generator=g) * 0.3)
        x = torch.randn(t, h, generator=g).to(dtype)
        logits = torch.randn(t, e, generator=g)
        logits[:, list(cold)] = -30.0
        r = route(logits, "softmax_topk", top_k)
        weights = r.weights if weights_dtype == "fp32" else r.weights.to(dtype)
        with torch.no_grad():
            expected = experts(x, r.experts, weights)
            out = moe_experts(
                x,
                Routing(weights, r.experts),
                experts.gate_up_proj,
                experts.down_proj,
                backend="native_torch",
                accumulate="input",
            )
        assert out.dtype == dtype
        assert torch.equal(out, expected), seed
