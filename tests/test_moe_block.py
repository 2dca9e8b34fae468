"""The MoE block: router + experts + shared expert, against a float64 composition."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TEST_DEVICE
from reference import reference_experts

from moelab.ops import MoEConfig, moe_block, route


def _params(g, e=6, h=16, i=8, s=12, shared_gate=True, dtype=torch.float64):
    def rand(*shape, std=0.5):
        return (torch.randn(*shape, generator=g) * std).to(dtype).requires_grad_(True)

    params = {
        "router": {"weight": rand(e, h), "correction_bias": torch.rand(e, generator=g).to(dtype)},
        "experts": {"gate_up": rand(e, 2 * i, h), "down": rand(e, h, i)},
        "shared": {
            "gate_proj": {"weight": rand(s, h)},
            "up_proj": {"weight": rand(s, h)},
            "down_proj": {"weight": rand(h, s)},
        },
    }
    if shared_gate:
        params["shared_gate"] = {"weight": rand(1, h)}
    return params


def _detached_double(tree):
    if isinstance(tree, dict):
        return {k: _detached_double(v) for k, v in tree.items()}
    return tree.detach().cpu().double()


@pytest.mark.parametrize("backend", ["native_torch", "grouped_mm"])
def test_block_matches_composition(backend):
    g = torch.Generator().manual_seed(0)
    params = _params(g, dtype=torch.float32)
    cfg = MoEConfig(
        num_experts=6,
        top_k=2,
        router="sigmoid_group_topk",
        router_options=dict(n_group=2, topk_group=1, routed_scaling_factor=2.5),
        backend=backend,
    )
    x = torch.randn(2, 5, 16, generator=g, requires_grad=True)  # [B, S, H] in, same shape out
    out, stats = moe_block(x, params, cfg)
    assert out.shape == x.shape

    x64 = x.detach().double().reshape(-1, 16)
    p64 = _detached_double(params)
    logits = x64 @ p64["router"]["weight"].T
    routing = route(
        logits,
        "sigmoid_group_topk",
        2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        correction_bias=p64["router"]["correction_bias"],
    )
    sh = {k: v["weight"] for k, v in p64["shared"].items()}
    shared = (torch.nn.functional.silu(x64 @ sh["gate_proj"].T) * (x64 @ sh["up_proj"].T)) @ sh[
        "down_proj"
    ].T
    shared = shared * torch.sigmoid(x64 @ p64["shared_gate"]["weight"].T)
    expected = (
        reference_experts(
            x64, routing.weights, routing.experts, p64["experts"]["gate_up"], p64["experts"]["down"]
        )
        + shared
    )
    torch.testing.assert_close(out.reshape(-1, 16).double(), expected, rtol=1e-5, atol=1e-5)

    assert stats.counts.sum() == 10 * 2 and stats.counts.shape == (6,)
    assert torch.equal(stats.counts, torch.bincount(routing.experts.reshape(-1), minlength=6))
    for loss in (stats.aux_loss, stats.z_loss, stats.entropy):
        assert loss.dim() == 0 and torch.isfinite(loss)

    total = out.square().sum() + stats.aux_loss + stats.z_loss
    trainable = [x, params["router"]["weight"], *params["experts"].values()]
    trainable += [p["weight"] for p in params["shared"].values()]
    trainable.append(params["shared_gate"]["weight"])
    for grad in torch.autograd.grad(total, trainable):
        assert grad.abs().sum() > 0


def test_block_with_expert_lora_and_bias_free_router():
    g = torch.Generator().manual_seed(1)
    params = _params(g, dtype=torch.float32)
    del params["shared"], params["router"]["correction_bias"]
    lora = {
        "gate_up_a": torch.randn(6, 8, 16, generator=g),
        "gate_up_b": torch.zeros(6, 16, 8),
        "down_a": torch.randn(6, 8, 8, generator=g),
        "down_b": torch.zeros(6, 16, 8),
    }
    x = torch.randn(7, 16, generator=g)
    cfg = MoEConfig(num_experts=6, top_k=3, lora_scale=2.0)
    base, _ = moe_block(x, params, cfg)
    params["experts"]["lora"] = lora
    with_lora, _ = moe_block(x, params, cfg)
    torch.testing.assert_close(base, with_lora)  # B = 0 starts at the base model


def test_block_without_router_stats_computes_the_same_output():
    """``router_stats=False`` (the block benchmark's setting) returns None for the stats and the
    same output bits and gradients."""
    g = torch.Generator().manual_seed(2)
    params = _params(g, dtype=torch.float32)
    del params["router"]["correction_bias"]
    x = torch.randn(9, 16, generator=g)
    with_stats = MoEConfig(num_experts=6, top_k=2, backend="grouped_mm")
    without = MoEConfig(num_experts=6, top_k=2, backend="grouped_mm", router_stats=False)
    outs, grads = [], []
    for cfg in (with_stats, without):
        out, stats = moe_block(x, params, cfg)
        assert (stats is None) == (cfg is without)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), params["router"]["weight"])[0])
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize(
    "backend, one_pass", [("grouped_mm", False), ("triton", False), ("triton", True)]
)
def test_block_x_gradient_through_router_and_experts_matches_float64(
    monkeypatch, backend, one_pass
):
    """x reaches the loss through the router and through the experts; the router's backward sums
    both gradients (``add_product``, forced here on, under the interpreter on the CPU, or
    ``addmm``). In bf16 on the test device, against float64 autograd of the same composition on
    the same picks."""
    from moelab.kernels import add_product as ap

    monkeypatch.setattr(ap, "runs", lambda *tensors: one_pass)
    g = torch.Generator().manual_seed(3)
    experts, hidden, inter, top_k, tokens = 6, 16, 8, 2, 11

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(TEST_DEVICE, torch.bfloat16)

    params = {
        "router": {"weight": rand(experts, hidden)},
        "experts": {
            "gate_up": rand(experts, 2 * inter, hidden),
            "down": rand(experts, hidden, inter),
        },
    }
    cfg = MoEConfig(num_experts=experts, top_k=top_k, backend=backend, router_stats=False)
    x = rand(tokens, hidden).requires_grad_(True)
    dout = rand(tokens, hidden)
    out, _ = moe_block(x, params, cfg)
    out.backward(dout)

    x64 = x.detach().cpu().double().requires_grad_(True)
    p64 = _detached_double(params)
    picks = route(x.detach() @ params["router"]["weight"].t(), "softmax_topk", top_k).experts.cpu()
    probs = (x64 @ p64["router"]["weight"].T).softmax(dim=-1).gather(1, picks)
    weights = probs / probs.sum(dim=-1, keepdim=True)
    expected = reference_experts(
        x64, weights, picks, p64["experts"]["gate_up"], p64["experts"]["down"]
    )
    expected.backward(dout.cpu().double())
    scale = x64.grad.abs().max().item()
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=3e-2, atol=2e-2 * scale)


def _reference_picks(logits_TE, kind, top_k, n_group=1, topk_group=1, correction_bias=None):
    """The experts each token is routed to, token by token in plain Python: top-k of the logits
    (softmax routers: the softmax is monotone), or DeepSeek-V3's group-limited pick on the
    bias-corrected sigmoid scores (a group scores the sum of its best two experts)."""
    picks = []
    for row in logits_TE.tolist():
        if kind == "sigmoid_group_topk":
            bias = [0.0] * len(row) if correction_bias is None else correction_bias.tolist()
            choice = [1 / (1 + math.exp(-v)) + b for v, b in zip(row, bias)]
            size = len(row) // n_group
            group = [choice[g * size : (g + 1) * size] for g in range(n_group)]
            group_score = [sum(sorted(scores)[-2:]) for scores in group]
            groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
            candidates = [e for g in groups for e in range(g * size, (g + 1) * size)]
        else:
            choice, candidates = row, range(len(row))
        picks.append(sorted(candidates, key=lambda e: -choice[e])[:top_k])
    return picks


def _reference_stats(logits_TE, kind, picks, num_experts):
    """Float64 router stats from their definitions (Switch balance loss in the Qwen/Mixtral form,
    ST-MoE z-loss, mean token entropy), differentiable through ``logits_TE``."""
    if kind == "sigmoid_group_topk":
        scores = 1 / (1 + torch.exp(-logits_TE))
        probs = scores / scores.sum(dim=-1, keepdim=True)  # sigmoid scores made a distribution
    else:
        probs = torch.exp(logits_TE) / torch.exp(logits_TE).sum(dim=-1, keepdim=True)
    num_tokens = logits_TE.shape[0]
    # f_e: routed rows of expert e per token, summed over the k slots (balanced scores k)
    f_E = torch.tensor([sum(e in p for p in picks) for e in range(num_experts)]) / num_tokens
    aux = num_experts * (f_E.double() * probs.mean(dim=0)).sum()
    z = torch.log(torch.exp(logits_TE).sum(dim=-1)).square().mean()
    entropy = -(probs * torch.log(probs)).sum(dim=-1).mean()
    return aux, z, entropy, f_E * num_tokens


ROUTERS = {
    "softmax_topk": dict(),  # Qwen3-MoE
    "topk_softmax": dict(),  # GPT-OSS (its router has a bias)
    "sigmoid_group_topk": dict(n_group=4, topk_group=2, routed_scaling_factor=2.5),  # DeepSeek-V3
}


@pytest.mark.parametrize("kind", list(ROUTERS))
def test_router_stats_match_float64_definitions(kind):
    """Balance loss, z-loss, entropy and counts of the block against float64 formulas written
    here, in value and in gradient with respect to the router weight (and bias)."""
    e, h, top_k = 8, 16, 2
    g = torch.Generator().manual_seed(3)
    params = _params(g, e=e, h=h, dtype=torch.float32)
    router = params["router"]
    if kind != "sigmoid_group_topk":
        del router["correction_bias"]
    if kind == "topk_softmax":
        router["bias"] = (torch.randn(e, generator=g) * 0.5).requires_grad_(True)
    x = torch.randn(2, 7, h, generator=g)
    cfg = MoEConfig(
        num_experts=e,
        top_k=top_k,
        router=kind,
        router_options=ROUTERS[kind],
        backend="native_torch",
    )
    _, stats = moe_block(x, params, cfg)
    # the correction bias only steers the pick: no gradient, checked through the counts
    router_leaves = [router[name] for name in ("weight", "bias") if name in router]

    router64 = [t.detach().double().requires_grad_(True) for t in router_leaves]
    logits64 = x.reshape(-1, h).double() @ router64[0].T
    if kind == "topk_softmax":
        logits64 = logits64 + router64[1]
    pick_options = {}
    if kind == "sigmoid_group_topk":
        pick_options = dict(
            n_group=4, topk_group=2, correction_bias=router["correction_bias"].double()
        )
    picks = _reference_picks(logits64.detach(), kind, top_k, **pick_options)
    aux, z, entropy, counts = _reference_stats(logits64, kind, picks, e)
    if kind != "sigmoid_group_topk":
        # the reference formula is Transformers' balance loss (Qwen3-MoE's; GPT-OSS's is a copy)
        from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

        hf_aux = load_balancing_loss_func((logits64.detach(),), e, top_k)
        torch.testing.assert_close(hf_aux.double(), aux.detach(), rtol=1e-6, atol=0)

    assert torch.equal(stats.counts, counts.long())
    for actual, expected in ((stats.aux_loss, aux), (stats.z_loss, z), (stats.entropy, entropy)):
        assert actual.dtype == torch.float32 and actual.dim() == 0
        torch.testing.assert_close(actual.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    for actual, expected in ((stats.aux_loss, aux), (stats.z_loss, z)):
        # the stats share the router graph: keep it for the next one
        grads = torch.autograd.grad(actual, router_leaves, retain_graph=True)
        grads64 = torch.autograd.grad(expected, router64, retain_graph=True)
        for grad, grad64 in zip(grads, grads64):
            assert grad64.abs().max() > 1e-3  # a gradient worth comparing
            torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-6)
    # the entropy is a metric: a loss built from it must not steer the router
    assert not stats.entropy.requires_grad
