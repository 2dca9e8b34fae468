"""Independent float64 reference of the expert MLP, written without moelab.ops.

Merged-weight math on purpose: per (token, slot) the expert's weights are ``W + s B A``, so a
backend's Split-LoRA is checked against the formula it avoids computing. Vectorised over tokens
per slot with gathered weights; autograd of this function is the gradient reference.
"""

from __future__ import annotations

import torch

LIMIT, ALPHA = 7.0, 1.702


def _glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        return gate / (1 + torch.exp(-gate)) * up
    gate = torch.minimum(gate, torch.full_like(gate, LIMIT))
    up = torch.maximum(torch.minimum(up, torch.full_like(up, LIMIT)), torch.full_like(up, -LIMIT))
    return (up + 1) * gate / (1 + torch.exp(-ALPHA * gate))


def reference_experts(
    x,
    weights,
    experts,
    gate_up,
    down,
    gate_up_bias=None,
    down_bias=None,
    activation="swiglu",
    lora=None,
):
    """All tensor arguments are used in float64; returns the float64 [T, H] output."""
    d = torch.float64
    x, weights = x.to(d), weights.to(d)
    w1, w2 = gate_up.to(d), down.to(d)
    if lora is not None:
        a1, b1, a2, b2 = (t.to(d) for t in lora[:4])
        w1 = w1 + lora.scale * torch.einsum("eor,eri->eoi", b1, a1)
        w2 = w2 + lora.scale * torch.einsum("eor,eri->eoi", b2, a2)
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for j in range(experts.shape[1]):
        e = experts[:, j]
        h = torch.einsum("toh,th->to", w1[e], x)
        if gate_up_bias is not None:
            h = h + gate_up_bias.to(d)[e]
        act = _glu(h[:, :inter], h[:, inter:], activation)
        y = torch.einsum("thi,ti->th", w2[e], act)
        if down_bias is not None:
            y = y + down_bias.to(d)[e]
        out = out + weights[:, j : j + 1] * y
    return out
