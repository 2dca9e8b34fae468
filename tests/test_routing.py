"""The three routers against hand-computed cases, their gradients, losses and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.ops import (
    Routing,
    expert_counts,
    load_balancing_loss,
    route,
    router_entropy,
    router_z_loss,
)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_softmax_topk_hand_case():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    r = route(logits, "softmax_topk", 2)
    assert r.experts.tolist() == [[2, 1]]
    top = 1 / (1 + math.exp(-1))  # e^3 / (e^3 + e^2)
    torch.testing.assert_close(r.weights, torch.tensor([[top, 1 - top]]))
    assert r.weights.dtype == torch.float32 and r.experts.dtype == torch.int64

    raw = route(logits, "softmax_topk", 2, renormalize=False)
    z = sum(math.exp(v) for v in (1.0, 2.0, 3.0, 0.0))
    torch.testing.assert_close(raw.weights, torch.tensor([[math.exp(3) / z, math.exp(2) / z]]))


def test_topk_softmax_hand_case():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]], dtype=torch.bfloat16)
    r = route(logits, "topk_softmax", 2)
    assert r.experts.tolist() == [[1, 3]]
    top = 1 / (1 + math.exp(-1))  # softmax over the selected logits [4, 3] only
    torch.testing.assert_close(r.weights, torch.tensor([[top, 1 - top]]))
    assert r.weights.dtype == torch.float32


SCORES = [0.9, 0.1, 0.6, 0.6, 0.5, 0.5, 0.2, 0.2]  # groups of 2: top-2 sums 1.0 1.2 1.0 0.4


def test_sigmoid_group_topk_limits_groups():
    logits = torch.tensor([[_logit(p) for p in SCORES]])
    r = route(logits, "sigmoid_group_topk", 2, n_group=4, topk_group=1, routed_scaling_factor=2.5)
    # expert 0 scores highest but its group loses to group 1 (0.6 + 0.6)
    assert sorted(r.experts[0].tolist()) == [2, 3]
    torch.testing.assert_close(r.weights, torch.tensor([[1.25, 1.25]]))  # 0.6/1.2 * 2.5


def test_sigmoid_group_topk_correction_bias_selects_but_does_not_weigh():
    logits = torch.tensor([[_logit(p) for p in SCORES]])
    bias = torch.tensor([0, 0, 0, 0, 0.3, 0, 0, 0])
    r = route(logits, "sigmoid_group_topk", 2, n_group=4, topk_group=1, correction_bias=bias)
    # group 2 now scores 0.8 + 0.5 = 1.3; the weights are the unbiased 0.5 and 0.5
    assert sorted(r.experts[0].tolist()) == [4, 5]
    torch.testing.assert_close(r.weights, torch.tensor([[0.5, 0.5]]))


def test_dropped_groups_lose_to_any_kept_expert_even_below_zero():
    """Dropped groups are masked with -inf (DeepSeek-V3), not 0: with a negative correction
    bias every kept expert's selection score is below zero, and must still win."""
    logits = torch.zeros(1, 4)  # scores 0.5 everywhere
    bias = torch.tensor([-2.0, -2.0, -1.0, -1.0])  # selection scores -1.5, -1.5, -0.5, -0.5
    r = route(logits, "sigmoid_group_topk", 2, n_group=2, topk_group=1, correction_bias=bias)
    assert sorted(r.experts[0].tolist()) == [2, 3]


def test_group_limited_routing_of_no_tokens():
    r = route(torch.zeros(0, 8), "sigmoid_group_topk", 2, n_group=4, topk_group=2)
    assert r.weights.shape == r.experts.shape == (0, 2)


def test_router_losses_of_no_tokens_are_zero_and_keep_the_graph():
    """An empty micro-batch adds nothing to the loss (not 0/0 = NaN) and still backpropagates."""
    logits = torch.zeros(0, 4, requires_grad=True)
    probs = logits.softmax(-1)
    experts = torch.zeros(0, 2, dtype=torch.int64)
    losses = [load_balancing_loss(probs, experts), router_z_loss(logits), router_entropy(probs)]
    for loss in losses:
        assert loss.item() == 0.0
    sum(losses[:2]).backward()
    assert logits.grad.shape == (0, 4)


def test_sigmoid_without_renormalisation_still_scales():
    logits = torch.tensor([[_logit(p) for p in SCORES]])
    r = route(logits, "sigmoid_group_topk", 1, renormalize=False, routed_scaling_factor=2.0)
    assert r.experts.tolist() == [[0]]
    torch.testing.assert_close(r.weights, torch.tensor([[1.8]]))


@pytest.mark.parametrize(
    "kind, options",
    [
        ("softmax_topk", {}),
        ("softmax_topk", {"renormalize": False}),
        ("topk_softmax", {}),
        ("sigmoid_group_topk", {"n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5}),
    ],
)
def test_gradients_reach_the_logits(kind, options):
    """Finite differences in float64 agree with autograd through the routing weights."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    coeff = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def f(lg):
        return (route(lg, kind, 3, **options).weights * coeff).sum()

    assert torch.autograd.gradcheck(f, (logits,))
    (grad,) = torch.autograd.grad(f(logits), logits)
    assert grad.abs().sum() > 0


def test_routing_is_a_positional_pair():
    w, e = torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64)
    r = Routing(w, e)
    assert r.weights is w and r.experts is e
    assert tuple(r) == (w, e)


def test_expert_counts_and_losses_hand_case():
    experts = torch.tensor([[0], [0], [2]])
    torch.testing.assert_close(expert_counts(experts, 4), torch.tensor([2, 0, 1, 0]))
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    # f = [1, 0], P = [0.5, 0.5] -> E * sum f P = 2 * 0.5
    assert load_balancing_loss(probs, torch.tensor([[0], [0]])).item() == pytest.approx(1.0)
    # balanced k = 2 of 2 experts: every expert gets every token, f = [1, 1], P = 0.5 -> k
    assert load_balancing_loss(probs, torch.tensor([[0, 1], [1, 0]])).item() == pytest.approx(2.0)
    assert router_z_loss(torch.zeros(3, 2)).item() == pytest.approx(math.log(2) ** 2)
    assert router_entropy(torch.full((2, 4), 0.25)).item() == pytest.approx(math.log(4))


def test_balance_loss_takes_precomputed_counts():
    """The block passes the counts it reports, so they are computed once: same loss."""
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(9, 5, generator=g).softmax(-1)
    experts = torch.randint(0, 5, (9, 2), generator=g)
    own = load_balancing_loss(probs, experts)
    given = load_balancing_loss(probs, experts, expert_counts(experts, 5))
    assert torch.equal(own, given)
    wrong = load_balancing_loss(probs, experts, torch.zeros(5, dtype=torch.int64))
    assert wrong.item() == 0.0  # the given counts are the ones used


def test_balance_loss_gradient_reaches_probs():
    logits = torch.randn(6, 4, requires_grad=True)
    r = route(logits, "softmax_topk", 2)
    loss = load_balancing_loss(logits.softmax(-1), r.experts)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize(
    "logits, kind, k, options, message",
    [
        (torch.randn(4), "softmax_topk", 1, {}, r"\[T, E\]"),
        (torch.ones(2, 3, dtype=torch.int64), "softmax_topk", 1, {}, "floating point"),
        (torch.randn(2, 3), "softmax_topk", 4, {}, "top_k"),
        (torch.randn(2, 3), "softmax_topk", 0, {}, "top_k"),
        (torch.tensor([[0.0, float("nan"), 1.0]]), "softmax_topk", 1, {}, "NaN or Inf"),
        (torch.tensor([[0.0, float("inf"), 1.0]]), "topk_softmax", 1, {}, "NaN or Inf"),
        (torch.randn(2, 3), "softmax", 1, {}, "unknown router kind"),
        (torch.randn(2, 3), "softmax_topk", True, {}, "top_k"),
        (torch.randn(2, 3), "topk_softmax", 1, {"renormalize": False}, "unknown option"),
        (torch.randn(2, 4), "softmax_topk", 1, {"n_group": 2}, "unknown option"),
        (torch.randn(2, 6), "sigmoid_group_topk", 1, {"n_group": 4}, "must divide"),
        (torch.randn(2, 6), "sigmoid_group_topk", 1, {"n_group": 2, "topk_group": 3}, "topk_group"),
        (torch.randn(2, 8), "sigmoid_group_topk", 5, {"n_group": 4, "topk_group": 2}, "exceeds"),
        (
            torch.randn(2, 4),
            "sigmoid_group_topk",
            1,
            {"correction_bias": torch.zeros(3)},
            r"\[E=4\]",
        ),
    ],
)
def test_bad_input_raises(logits, kind, k, options, message):
    with pytest.raises(ValueError, match=message):
        route(logits, kind, k, **options)


def test_non_finite_check_can_be_skipped():
    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    route(logits, "softmax_topk", 1, validate=False)  # the accelerator default: no host sync


# ---- the fused top-k softmax router (moelab.kernels.router), under the CPU interpreter --------

FUSED_KINDS = [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", True)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (conftest)


def _distinct_logits(tokens: int, experts: int, dtype, seed: int) -> torch.Tensor:
    """Logits without ties within a token (a tie's pick is the lowest id; tested apart)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)])
    # exact in bf16 up to 128 experts
    return (ranks.double() / 8 - experts / 16).to(DEVICE, dtype)


def _reference_route(logits: torch.Tensor, kind: str, k: int, renormalize: bool) -> Routing:
    """The torch path's math in float64."""
    options = {"renormalize": renormalize} if kind == "softmax_topk" else {}
    return route(logits.double(), kind, k, fused=False, **options)


@pytest.mark.parametrize("kind, renormalize", FUSED_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, experts, k", [(1, 6, 1), (37, 6, 3), (70, 128, 8)])
def test_fused_router_matches_float64(kind, renormalize, dtype, tokens, experts, k):
    """Same picks in the same order as the torch path; weights and the logits' gradient as
    float64 evaluates the same math (the gradient zero off the picks when renormalised)."""
    pytest.importorskip("triton")
    from moelab.kernels.router import topk_route

    base = _distinct_logits(tokens, experts, dtype, seed=tokens + k)
    logits = base.clone().requires_grad_(True)
    weights, ids = topk_route(logits, k, renormalize)
    ref_logits = base.double().requires_grad_(True)
    ref = _reference_route(ref_logits, kind, k, renormalize)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, ref.experts)
    torch.testing.assert_close(weights.double(), ref.weights, rtol=2e-6, atol=1e-7)

    coeff = torch.randn(tokens, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    coeff = coeff.to(DEVICE)
    (weights.double() * coeff).sum().backward()
    (ref.weights * coeff).sum().backward()
    assert logits.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=tol, atol=tol * 1e-2)
    if renormalize:
        off = torch.ones_like(logits, dtype=torch.bool).scatter_(1, ids, False)
        assert (logits.grad[off] == 0).all()


def test_fused_router_ties_pick_the_lowest_id():
    pytest.importorskip("triton")
    from moelab.kernels.router import topk_route

    logits = torch.tensor([[1.0, 3.0, 0.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], device=DEVICE)
    weights, ids = topk_route(logits, 2)
    assert ids.tolist() == [[1, 3], [0, 1]]
    torch.testing.assert_close(weights.cpu(), torch.full((2, 2), 0.5))


def test_fused_router_reads_strided_rows_and_empty_input():
    """Rows of a wider buffer (stride over tokens > E) give the same routing as a copy; no
    tokens give empty outputs and gradients."""
    pytest.importorskip("triton")
    from moelab.kernels.router import topk_route

    wide = _distinct_logits(9, 16, torch.float32, seed=3)
    view = wide[:, :8]
    w_view, ids_view = topk_route(view, 2)
    w_copy, ids_copy = topk_route(view.contiguous(), 2)
    assert torch.equal(ids_view, ids_copy) and torch.equal(w_view, w_copy)
    empty = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    weights, ids = topk_route(empty, 2)
    assert weights.shape == ids.shape == (0, 2)
    weights.sum().backward()
    assert empty.grad.shape == (0, 8)


def test_route_on_cpu_runs_torch_ops_whatever_fused_says():
    """On CPU tensors ``route`` runs torch's ops whatever ``fused`` says (the kernel is for
    CUDA tensors), so the reference models' roundings hold there bit for bit."""
    from moelab.kernels.router import runs

    logits = _distinct_logits(4, 8, torch.bfloat16, seed=5).cpu()
    assert not runs(logits, 2)
    a, b = route(logits, "softmax_topk", 2), route(logits, "softmax_topk", 2, fused=False)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.experts, b.experts)


@pytest.mark.parametrize("kind, renormalize", FUSED_KINDS)
def test_fused_router_double_backward_matches_float64(kind, renormalize):
    """A gradient penalty through the fused router (``create_graph=True``) gets the router's
    second-order term: gradient of the logits' gradient norm as the torch path in float64."""
    pytest.importorskip("triton")
    from moelab.kernels.router import topk_route

    base = _distinct_logits(5, 6, torch.float32, seed=7)
    coeff = torch.randn(5, 2, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = []
    for logits in (base.clone().requires_grad_(True), base.double().requires_grad_(True)):
        if logits.dtype == torch.float32:
            weights, _ = topk_route(logits, 2, renormalize)
        else:
            weights = _reference_route(logits, kind, 2, renormalize).weights
        (g,) = torch.autograd.grad((weights * coeff).sum(), logits, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), logits)
        grads.append(gg.double())
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind, renormalize", FUSED_KINDS)
def test_route_dispatches_to_the_fused_router_as_on_cuda(monkeypatch, kind, renormalize):
    """``route``'s fused branches (CUDA only in use) under the interpreter: each router kind
    and option reaches the kernel as the torch path's math has it."""
    pytest.importorskip("triton")
    from moelab.kernels import router as fused_router

    monkeypatch.setattr(fused_router, "runs", lambda logits, k: True)
    base = _distinct_logits(9, 8, torch.float32, seed=11)
    options = {"renormalize": renormalize} if kind == "softmax_topk" else {}
    logits, ref_logits = base.clone().requires_grad_(True), base.double().requires_grad_(True)
    fused = route(logits, kind, 3, **options)
    ref = route(ref_logits, kind, 3, fused=False, **options)
    assert torch.equal(fused.experts, ref.experts)
    torch.testing.assert_close(fused.weights.double(), ref.weights, rtol=2e-6, atol=1e-7)
    fused.weights.sum().backward()
    ref.weights.sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-7)
