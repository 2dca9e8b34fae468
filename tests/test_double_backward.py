"""Backward passes built from kernels have no backward of their own: a second derivative
through them (a gradient penalty: ``create_graph=True`` and a loss not linear in the output)
must raise, not return a gradient that silently lacks the kernels' second-order terms; the first
derivative under ``create_graph=True`` stays the plain one. (The triton experts' case is in
test_triton_edges.py; the fused router differentiates its backward with torch's ops.)"""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE
from test_experts import Case, make_problem, routing_of

from moelab.kernels.rms_norm import rms_norm
from moelab.kernels.rope import rope
from moelab.ops import moe_experts
from moelab.ops.rope import RopeConfig, rope_cos_sin

ONCE = "once_differentiable"


def _grouped_mm_block():
    p = make_problem(Case("penalty", tokens=6, hidden=16, inter=8, experts=3, top_k=2),
                     "full_oai_bias", torch.float32, seed=2)  # fmt: skip

    def block(x: torch.Tensor) -> torch.Tensor:
        return moe_experts(x, routing_of(p), p["gate_up"], p["down"],
                           gate_up_bias=p["gate_up_bias"], down_bias=p["down_bias"],
                           activation=p["activation"], backend="grouped_mm")  # fmt: skip

    return block, p["x"].detach()


def _rms_norm():
    g = torch.Generator().manual_seed(3)
    weight = (torch.rand(32, generator=g) + 0.5).to(TEST_DEVICE).requires_grad_(True)
    x = torch.randn(5, 32, generator=g).to(TEST_DEVICE)
    return (lambda t: rms_norm(t, weight, 1e-6)), x


def _rope():
    g = torch.Generator().manual_seed(4)
    positions = torch.arange(6, device=TEST_DEVICE)[None]
    cos, sin = rope_cos_sin(RopeConfig(theta=10000.0, rotary_dim=16), positions, torch.float32)
    x = torch.randn(1, 2, 6, 16, generator=g).to(TEST_DEVICE)
    return (lambda t: rope(t, cos, sin)), x


@pytest.mark.parametrize("build", [_grouped_mm_block, _rms_norm, _rope],
                         ids=["grouped_mm experts", "rms_norm kernel", "rope kernel"])  # fmt: skip
def test_a_second_derivative_through_a_kernel_backward_raises(build):
    fn, x0 = build()
    x = x0.clone().requires_grad_(True)
    loss = fn(x).square().sum() / 2
    (dx,) = torch.autograd.grad(loss, [x], create_graph=True)
    x_plain = x0.clone().requires_grad_(True)
    (fn(x_plain).square().sum() / 2).backward()
    torch.testing.assert_close(dx.detach(), x_plain.grad, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=ONCE):
        dx.square().sum().backward()
