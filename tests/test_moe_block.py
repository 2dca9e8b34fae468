"""The MoE block: router + experts + shared expert, against a float64 composition."""

from __future__ import annotations

import pytest
import torch
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
    return tree.detach().double()


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
