"""The triton backend on odd but valid inputs the backend matrix does not vary: expert counts
and sizes that are not powers of two, fp16, operands passed as strided or misaligned views,
LoRA adapters of two ranks, one bias without the other, one trainable leaf at a time on every
backward main loop, a block called twice before backward, a backward run twice, a backward that
builds a graph, and the fused router's smallest and full top-k. Every output and gradient is
checked against the float64 reference of test_experts.py (or bit for bit against a run already
so checked)."""

from __future__ import annotations

import pytest
import torch
from conftest import LOGITS_GRAD_TOLERANCE, TEST_DEVICE, TOLERANCE, rel_err
from test_experts import (
    Case,
    make_problem,
    routing_of,
    run_backend,
    run_reference,
    trainables,
)

from moelab.kernels import triton as tr
from moelab.kernels import triton_kernels as tk
from moelab.ops import ExpertLoRA, moe_experts

# fp16 keeps 10 bits of mantissa to bf16's 7: its worst tensor here was 6e-4 (bf16's bound,
# 2e-2, would hide a wrong rounding); no fp16 tolerance exists in conftest
FP16_TOLERANCE = 5e-3


def _check(p: dict, recompute: bool = False, tol: float | None = None) -> dict:
    """Output and every gradient asked for (the routing weights' too, where the logits train)
    against float64; returns the backend's output and gradients."""
    weights_grad = p["logits"].requires_grad
    out, grads = run_backend(p, "triton", recompute, weights_grad=weights_grad)
    ref_out, ref_grads = run_reference(p, routing_of(p).experts, weights_grad=weights_grad)
    dtype = p["x"].dtype
    tol = tol or TOLERANCE[dtype]
    assert out.dtype == dtype and rel_err(out, ref_out) <= tol
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        limit = LOGITS_GRAD_TOLERANCE.get(dtype, tol) if name == "logits" else tol
        assert rel_err(grad, ref_grads[name]) <= limit, name
    return dict(grads, out=out)


def _call(p: dict, recompute: bool = False) -> torch.Tensor:
    return moe_experts(
        p["x"], routing_of(p), p["gate_up"], p["down"], gate_up_bias=p["gate_up_bias"],
        down_bias=p["down_bias"], activation=p["activation"], lora=p["lora"], backend="triton",
        recompute=recompute,
    )  # fmt: skip


SHAPES = [
    Case("E=3, H=40, I=24", tokens=10, hidden=40, inter=24, experts=3, top_k=2),
    Case("E=6, T=2, k=E", tokens=2, hidden=40, inter=24, experts=6, top_k=6),
    Case("E=12, T=1, k=E", tokens=1, hidden=24, inter=8, experts=12, top_k=12),
    Case("every token on expert E-1", tokens=7, hidden=40, inter=24, experts=6, top_k=1, hot=5),
    Case("H=200 over two column blocks, I=72", tokens=5, hidden=200, inter=72, experts=3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SHAPES, ids=lambda c: c.name)
def test_odd_expert_counts_and_sizes_match_reference(case, dtype):
    """Expert counts that are not powers of two (the dispatch's bins and the tile table's
    padding), k = E, every row on the last expert, sizes that leave partial K and column blocks;
    GPT-OSS's activation and biases with LoRA, routing weights as a leaf (k = 1 and one token
    make the router's own ones trivial, and the logits' gradient in bf16 is checked from 8
    tokens)."""
    leaf_weights = case.top_k == 1 or case.tokens < 8
    _check(make_problem(case, "all_trainable", dtype, seed=3, leaf_weights=leaf_weights))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("variant", ["lora", "all_trainable"])
def test_fp16_matches_reference(variant, recompute):
    case = Case("fp16", tokens=10, hidden=40, inter=24, experts=3, top_k=2)
    _check(make_problem(case, variant, torch.float16, seed=3), recompute, tol=FP16_TOLERANCE)


@pytest.mark.parametrize(
    "dtype, hidden, inter, rank, reason",
    [
        (torch.float64, 16, 8, 8, "grouped_mm takes bf16, fp16 or fp32, not torch.float64"),
        (torch.float32, 18, 8, 8, "H=18 is not a multiple of 4 in torch.float32"),
        (torch.bfloat16, 40, 12, 8, "I=12 is not a multiple of 8 in torch.bfloat16"),
        (torch.float32, 16, 8, 3, "r=3 is not a multiple of 4 in torch.float32"),
        (torch.float32, 16, 8, 1, "r=1 is not a multiple of 4 in torch.float32"),
        (torch.float32, 16, 8, 132, "LoRA rank 132 exceeds 128"),
    ],
)
def test_sizes_it_cannot_run_are_refused_with_the_reason(dtype, hidden, inter, rank, reason):
    case = Case("refused", tokens=4, hidden=hidden, inter=inter, experts=3, rank=rank)
    p = make_problem(case, "lora", dtype, seed=1)
    with pytest.raises(ValueError, match="expert backend 'triton' cannot run this call: .*") as e:
        run_backend(p, "triton")
    assert reason in str(e.value)


def _relayout(t: torch.Tensor | None, kind: str) -> torch.Tensor | None:
    """The same values as a leaf of another layout: ``transposed`` (last two dims swapped in
    memory), ``misaligned`` (one element into its storage, so no 16-byte alignment and no TMA),
    ``strided`` (every other index of the first dim)."""
    if t is None:
        return None
    src = t.detach().cpu()
    if kind == "transposed" and src.dim() >= 2:
        view = src.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif kind == "misaligned":
        view = torch.zeros(src.numel() + 1, dtype=src.dtype)[1:].view(src.shape)
        view.copy_(src)
    else:
        big = torch.zeros(2 * src.shape[0], *src.shape[1:], dtype=src.dtype)
        big[::2] = src
        view = big[::2]
    assert torch.equal(view, src) and view.is_contiguous() == (kind == "misaligned")
    return view.detach().requires_grad_(t.requires_grad)


@pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="views built on the CPU, kept as they are")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["transposed", "misaligned", "strided"])
def test_operands_as_views_give_the_same_bits(monkeypatch, kind, dtype):
    """x, the weights, the biases, the LoRA factors and leaf routing weights all passed as
    views of another layout: W and the LoRA factors read through their strides (W by pointer
    where TMA cannot read it: misaligned, or the SwiGLU product's W transposed), x and the
    routing weights made contiguous: the same bits as contiguous operands (checked against
    float64 first)."""
    case = Case("views", tokens=10, hidden=40, inter=24, experts=3, top_k=2, cold=(1,))
    p = make_problem(case, "all_trainable", dtype, seed=7, leaf_weights=True)
    ref = _check(p)
    for name in ("x", "weights", "gate_up", "down", "gate_up_bias", "down_bias"):
        p[name] = _relayout(p[name], kind)
    lora = p["lora"]
    p["lora"] = ExpertLoRA(*(_relayout(t, kind) for t in lora.tensors()), lora.scale)
    modes = []
    real = tr._w_descriptor
    monkeypatch.setattr(tr, "_w_descriptor", lambda *a: modes.append(real(*a)[0]) or real(*a))
    out, grads = run_backend(p, "triton")
    # how W was read: by pointer (0) where TMA cannot, else through the views' own strides
    assert set(modes) == {"transposed": {0, 1, 2}, "misaligned": {0}, "strided": {1, 2}}[kind]
    assert torch.equal(out, ref["out"])
    for name, grad in grads.items():
        assert torch.equal(grad, ref[name]), name


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize(
    "dtype, ranks", [(torch.float32, (4, 12)), (torch.bfloat16, (32, 8))], ids=str
)
def test_up_and_down_adapters_of_different_ranks_match_reference(dtype, ranks, recompute):
    """gate_up's adapter of rank r1 and down's of r2 (separate gate and up adapters double
    gate_up's): each product's z, BLOCK_R and saved z of its own rank."""
    case = Case("ranks", tokens=10, hidden=40, inter=24, experts=3, top_k=2)
    p = make_problem(case, "all_trainable", dtype, seed=5)
    g = torch.Generator().manual_seed(9)
    experts, hidden, inter = case.experts, case.hidden, case.inter

    def leaf(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(TEST_DEVICE, dtype).requires_grad_()

    r1, r2 = ranks
    p["lora"] = ExpertLoRA(leaf(experts, r1, hidden), leaf(experts, 2 * inter, r1),
                           leaf(experts, r2, inter), leaf(experts, hidden, r2), 0.5)  # fmt: skip
    _check(p, recompute)


@pytest.mark.parametrize("activation", ["swiglu", "swiglu_oai"])
@pytest.mark.parametrize("bias", ["gate_up_bias", "down_bias"])
def test_one_bias_without_the_other_matches_reference(bias, activation):
    """A gate_up bias alone or a down bias alone, under either activation; an expert without
    rows gets exact zeros for its bias."""
    case = Case("bias", tokens=10, hidden=40, inter=24, experts=4, top_k=2, cold=(2,))
    p = make_problem(case, "all_trainable", torch.float32, seed=11)
    p["activation"] = activation
    p["down_bias" if bias == "gate_up_bias" else "gate_up_bias"] = None
    grads = _check(p, recompute=activation == "swiglu_oai")
    assert torch.equal(grads[bias][2], torch.zeros_like(grads[bias][2]))


@pytest.mark.parametrize(
    "trained", [{"lora_b2"}, {"lora_a2"}, {"lora_b1"}, {"weights"}, {"down"}, {"gate_up_bias"}]
)
@pytest.mark.parametrize("main", ["gathered", "torch"])
def test_one_leaf_on_the_other_main_loops_with_z_given(monkeypatch, main, trained):
    """One trainable leaf at a time with the down backward's g from its own product (ours or
    torch's) and every LoRA z from a rank-r launch, h recomputed: what that leaf needs is still
    computed (u2 for dA2, w act for dW2, the partials for the routing weights)."""
    monkeypatch.setattr(tr, "DOWN_BACKWARD_MAIN", main)
    monkeypatch.setattr(tr, "LORA_PLACEMENT", dict.fromkeys(tr.LORA_PLACEMENT, tk.LORA_GIVEN))
    case = Case("one", tokens=10, hidden=40, inter=24, experts=4, top_k=2, cold=(1,))
    p = make_problem(
        case, "all_trainable", torch.float32, seed=5, leaf_weights="weights" in trained
    )
    for name, leaf in trainables(p).items():
        leaf.requires_grad_(name in trained)
    grads = _check(p, recompute=True)
    assert set(grads) - {"out"} == trained


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_calls_before_backward_and_a_backward_run_twice(dtype, recompute):
    """The block called twice before one backward through both (each call's saved tensors its
    own: 1x and 2x dout give 3x the gradients), then one call's backward run twice with
    retain_graph (the saved tensors are not overwritten: the same bits both times)."""
    case = Case("twice", tokens=10, hidden=40, inter=24, experts=3, top_k=2)
    p = make_problem(case, "all_trainable", dtype, seed=3)
    named = trainables(p)
    _, ref = run_reference(p, routing_of(p).experts)
    tol = TOLERANCE[dtype]
    first, second = _call(p, recompute), _call(p, recompute)
    grads = torch.autograd.grad([first, second], list(named.values()), [p["dout"], 2 * p["dout"]])
    for name, grad in zip(named, grads):
        limit = LOGITS_GRAD_TOLERANCE[dtype] if name == "logits" else tol
        assert rel_err(grad, 3 * ref[name]) <= limit, name
    out = _call(p, recompute)
    once = torch.autograd.grad(out, list(named.values()), p["dout"], retain_graph=True)
    again = torch.autograd.grad(out, list(named.values()), p["dout"])
    for name, a, b in zip(named, once, again):
        assert torch.equal(a, b), name
        limit = LOGITS_GRAD_TOLERANCE[dtype] if name == "logits" else tol
        assert rel_err(b, ref[name]) <= limit, name


def test_a_backward_that_builds_a_graph_cannot_be_differentiated_again():
    """The kernels' backward has no backward of its own: a gradient penalty through it
    (``create_graph=True``, the loss not linear in the output, so dout carries a graph) must
    raise when differentiated. Before, the penalty's gradient took the second-order terms of
    the few torch ops the backward ran (the down bias's gradient, through the routing weights
    and dout) and silently dropped the rest (x's gradient came back without a graph)."""
    case = Case("penalty", tokens=6, hidden=16, inter=8, experts=3, top_k=2)
    p = make_problem(case, "full_oai_bias", torch.float32, seed=1)
    loss = _call(p).square().sum() / 2
    grads = torch.autograd.grad(loss, [p["x"], p["down_bias"]], create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    # a route the error node of torch's once_differentiable never reached: the penalty (plus
    # the loss) differentiated for a weight alone; it returned the loss's gradient
    with pytest.raises(RuntimeError, match="the triton expert MLP has no second derivative"):
        torch.autograd.grad(penalty + loss, [p["gate_up"]], allow_unused=True, retain_graph=True)
    with pytest.raises(RuntimeError, match="the triton expert MLP has no second derivative"):
        penalty.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens, experts, k", [(3, 1, 1), (5, 3, 3), (2, 12, 12), (3, 33, 5)])
def test_fused_router_small_and_full_top_k(tokens, experts, k, renormalize, dtype):
    """The fused router (``moelab.kernels.router``) at E = 1 (one-wide blocks), k = E and E
    just past a power of two: the torch path's picks, weights and logits gradient in float64."""
    from moelab.kernels.router import topk_route
    from moelab.ops import route

    g = torch.Generator().manual_seed(tokens * experts + k)
    ranks = torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)])
    base = (ranks.double() / 8).to(TEST_DEVICE, dtype)  # distinct, exact in fp16
    logits = base.clone().requires_grad_(True)
    weights, ids = topk_route(logits, k, renormalize)
    ref_logits = base.double().requires_grad_(True)
    ref = route(ref_logits, "softmax_topk", k, fused=False, renormalize=renormalize)
    assert torch.equal(ids, ref.experts)
    torch.testing.assert_close(weights.double(), ref.weights, rtol=2e-6, atol=1e-7)
    coeff = torch.randn(tokens, k, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    (weights.double() * coeff).sum().backward()
    (ref.weights * coeff).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=tol, atol=tol * 1e-2)
