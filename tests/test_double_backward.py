"""Backward passes built from kernels have no backward of their own: a second derivative
through them (a gradient penalty: ``create_graph=True`` and a loss not linear in the output)
must raise, not return a gradient that silently lacks the kernels' second-order terms; the first
derivative under ``create_graph=True`` stays the plain one. (The triton experts' case is in
test_triton_edges.py; the fused router differentiates its backward with torch's ops.) Sink
attention's fused paths raise on every route to the second derivative, ``autograd.grad`` too;
its eager path has the second derivative, checked against the float64 formula."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE, TOLERANCE, rel_err
from test_experts import Case, make_problem, routing_of

from moelab.kernels.rms_norm import rms_norm
from moelab.kernels.rope import rope
from moelab.ops import attention as att
from moelab.ops import moe_experts
from moelab.ops.rope import RopeConfig, rope_cos_sin

NO_SECOND_KERNEL = "has no second derivative: its backward is built from kernels"


def _grouped_mm_block():
    p = make_problem(Case("penalty", tokens=6, hidden=16, inter=8, experts=3, top_k=2),
                     "full_oai_bias", torch.float32, seed=2)  # fmt: skip

    def block(x: torch.Tensor) -> torch.Tensor:
        return moe_experts(x, routing_of(p), p["gate_up"], p["down"],
                           gate_up_bias=p["gate_up_bias"], down_bias=p["down_bias"],
                           activation=p["activation"], backend="grouped_mm")  # fmt: skip

    return block, p["x"].detach(), [p["gate_up"], p["down_bias"]]


def _rms_norm():
    g = torch.Generator().manual_seed(3)
    weight = (torch.rand(32, generator=g) + 0.5).to(TEST_DEVICE).requires_grad_(True)
    x = torch.randn(5, 32, generator=g).to(TEST_DEVICE)
    return (lambda t: rms_norm(t, weight, 1e-6)), x, [weight]


def _rope():
    g = torch.Generator().manual_seed(4)
    positions = torch.arange(6, device=TEST_DEVICE)[None]
    cos, sin = rope_cos_sin(RopeConfig(theta=10000.0, rotary_dim=16), positions, torch.float32)
    x = torch.randn(1, 2, 6, 16, generator=g).to(TEST_DEVICE)
    return (lambda t: rope(t, cos, sin)), x, []


KERNELS = pytest.mark.parametrize(
    "build", [_grouped_mm_block, _rms_norm, _rope],
    ids=["grouped_mm experts", "rms_norm kernel", "rope kernel"],
)  # fmt: skip


@KERNELS
def test_a_second_derivative_through_a_kernel_backward_raises(build):
    fn, x0, _ = build()
    x = x0.clone().requires_grad_(True)
    loss = fn(x).square().sum() / 2
    (dx,) = torch.autograd.grad(loss, [x], create_graph=True)
    x_plain = x0.clone().requires_grad_(True)
    (fn(x_plain).square().sum() / 2).backward()
    torch.testing.assert_close(dx.detach(), x_plain.grad, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=NO_SECOND_KERNEL):
        dx.square().sum().backward()


@KERNELS
@pytest.mark.parametrize("route", ["penalty", "penalty + loss", "loss linear in the output"])
def test_every_route_to_a_second_derivative_raises(build, route):
    """``autograd.grad(penalty, [weight])`` too. Before (``once_differentiable``), its error node
    hung off the gradients' detached copies and dout only: with a loss linear in the output the
    call said the weight "appears to not have been used in the graph", with ``allow_unused`` it
    returned None, and for ``penalty + loss`` it silently returned the loss's gradient alone."""
    fn, x0, params = build()
    x = x0.clone().requires_grad_(True)
    out = fn(x)
    if route == "loss linear in the output":  # dout carries no graph
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out).to(out)).sum()
    else:
        loss = out.square().sum() / 2
    wrt = params or [x]
    (dx,) = torch.autograd.grad(loss, [x], create_graph=True, retain_graph=True)
    if not params and route == "loss linear in the output":
        # RoPE is linear and has no parameters: dx is a constant here, rightly without a graph
        assert not dx.requires_grad
        return
    penalty = dx.square().sum()
    target = penalty + loss if route == "penalty + loss" else penalty
    with pytest.raises(RuntimeError, match=NO_SECOND_KERNEL):
        torch.autograd.grad(target, wrt, allow_unused=True)


NO_SECOND = r"sink attention \(impl='sdpa'\) has no second derivative"
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Each routes the sinks into a fused kernel (_SinkAttention on the CPU).
SINK_CASES = {
    "causal": dict(seq=9),  # the kernel's own causal flag, no mask
    "sliding window 3": dict(seq=9, sliding_window=3),  # an additive mask
    "window past two band blocks": dict(seq=40, sliding_window=3),  # query blocks, C + W keys
    "packed documents": dict(seq=9, documents=True),
}
SINK_PATHS = [
    pytest.param("cpu", torch.float64, id="cpu float64"),
    pytest.param("cuda", torch.float32, id="cuda float32", marks=CUDA_ONLY),  # memory-efficient
    pytest.param("cuda", torch.bfloat16, id="cuda bfloat16", marks=CUDA_ONLY),  # flash
]


def _sink_attention_reference(q_BNSD, k_BMSD, v_BMSD, sinks_N, scale, window, docs_BS):
    """GPT-OSS sink attention in plain ops: each head's sink logit joins the softmax over the
    keys a query may see (exp(sink) in the denominator) and carries no value."""
    rep = q_BNSD.shape[1] // k_BMSD.shape[1]
    k_BNSD, v_BNSD = k_BMSD.repeat_interleave(rep, 1), v_BMSD.repeat_interleave(rep, 1)
    i = torch.arange(q_BNSD.shape[2])
    allowed_SS = i[None, :] <= i[:, None]
    if window is not None:
        allowed_SS = allowed_SS & (i[None, :] > i[:, None] - window)
    allowed = allowed_SS[None, None]
    if docs_BS is not None:
        allowed = allowed & (docs_BS[:, None, :, None] == docs_BS[:, None, None, :])
    scores = (q_BNSD @ k_BNSD.transpose(2, 3) * scale).masked_fill(~allowed, float("-inf"))
    sinks = sinks_N[:, None, None].expand(*scores.shape[:3], 1)
    probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
    return probs @ v_BNSD


def _sink_problem(case, device, dtype, seed=5):
    """Leaves q, k, v (GQA: 4 query heads on 2 kv heads) and sinks, and the keyword arguments."""
    seq = SINK_CASES[case]["seq"]
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, seq, 16), (2, 2, seq, 16), (2, 2, seq, 16), (4,)]
    leaves = [torch.randn(s, generator=g).to(device, dtype).requires_grad_(True) for s in shapes]
    docs = torch.cumsum(torch.rand(2, seq, generator=g) < 0.2, dim=1)
    opts = dict(scale=0.25, sliding_window=SINK_CASES[case].get("sliding_window"))
    opts["document_ids_BS"] = docs.to(device) if SINK_CASES[case].get("documents") else None
    return leaves, opts


def _half_square(out: torch.Tensor) -> torch.Tensor:
    return out.square().sum() / 2


def _reference_grads(leaves, opts, create_graph=False):
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    docs = opts["document_ids_BS"]
    out = _sink_attention_reference(*leaves, opts["scale"], opts["sliding_window"],
                                    None if docs is None else docs.cpu())  # fmt: skip
    return leaves, torch.autograd.grad(_half_square(out), leaves, create_graph=create_graph)


@pytest.mark.parametrize("penalised", ["every gradient", "the sinks' gradient"])
@pytest.mark.parametrize("device, dtype", SINK_PATHS)
@pytest.mark.parametrize("case", list(SINK_CASES))
def test_a_second_derivative_through_sink_attention_raises(case, device, dtype, penalised,
                                                           monkeypatch):  # fmt: skip
    """Before, a penalty on the sinks' gradient came back silently wrong (it lacked the terms
    through the kernel's log-sum-exp: 0.9-1.1 relative error on q and k, 2.4-4.9 on the sinks),
    and one on every gradient raised an error naming an aten op. ``once_differentiable`` is not
    enough: ``autograd.grad(penalty, inputs)`` never reaches its error node."""
    used = []
    for fn in (att._SinkAttention, att._FlashSinkAttention):
        monkeypatch.setattr(fn, "apply", lambda *a, fn=fn, f=fn.apply: used.append(fn) or f(*a))
    leaves, opts = _sink_problem(case, device, dtype)
    out = att.attention(*leaves[:3], sinks_N=leaves[3], **opts)
    grads = torch.autograd.grad(_half_square(out), leaves, create_graph=True)
    flash = dtype == torch.bfloat16 and opts["document_ids_BS"] is None
    assert used == [att._FlashSinkAttention if flash else att._SinkAttention]

    plain = [t.detach().clone().requires_grad_(True) for t in leaves]
    plain_out = att.attention(*plain[:3], sinks_N=plain[3], **opts)
    plain_grads = torch.autograd.grad(_half_square(plain_out), plain)
    _, ref_grads = _reference_grads(leaves, opts)
    # the kernels' row weights sigmoid(L - sink) are float32 even for float64 inputs
    tol = TOLERANCE[torch.bfloat16 if dtype == torch.bfloat16 else torch.float32]
    for name, g, p, r in zip("q k v sinks".split(), grads, plain_grads, ref_grads):
        if device == "cpu":  # CUDA's memory-efficient backward sums dq in a varying order
            torch.testing.assert_close(g.detach(), p, rtol=0, atol=0, msg=name)
        assert rel_err(g.cpu(), r) <= tol, name

    penalised_grads = grads if penalised == "every gradient" else grads[3:]
    penalty = sum(g.square().sum() for g in penalised_grads)
    with pytest.raises(RuntimeError, match=NO_SECOND):
        torch.autograd.grad(penalty, leaves, retain_graph=True)
    with pytest.raises(RuntimeError, match=NO_SECOND):
        penalty.backward()


@pytest.mark.parametrize("case", list(SINK_CASES))
def test_eager_sink_attention_has_the_second_derivative(case):
    """The way out the error names: the eager path's penalty gradient is the float64 formula's."""
    leaves, opts = _sink_problem(case, "cpu", torch.float64)
    out = att.attention(*leaves[:3], sinks_N=leaves[3], impl="eager", **opts)
    grads = torch.autograd.grad(_half_square(out), leaves, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)
    ref_leaves, ref_grads = _reference_grads(leaves, opts, create_graph=True)
    ref_second = torch.autograd.grad(sum(g.square().sum() for g in ref_grads), ref_leaves)
    for name, g, r in zip("q k v sinks".split(), second, ref_second):
        assert rel_err(g, r) <= TOLERANCE[torch.float64], name
