"""Gated activations of the expert MLP, forward and hand-written backward.

The fused projection ``h_NG`` holds the gate in columns ``[0, I)`` and the up branch in
``[I, 2I)`` (see design.md). Math runs in ``h``'s dtype with torch's elementwise kernels (each
computes in fp32 internally and rounds once), as the reference models do; every pass moves
bf16 bytes, which is what the unfused backends are bound by. Backends with their own autograd
call :func:`activation_backward`; ``native_torch`` lets autograd differentiate
:func:`activation_forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("swiglu", "swiglu_oai")

# GPT-OSS clamped SwiGLU constants.
OAI_LIMIT = 7.0
OAI_ALPHA = 1.702


def activation_forward(h_NG: torch.Tensor, activation: str) -> torch.Tensor:
    """``[N, 2I] -> [N, I]``: swiglu ``silu(gate) * up`` or GPT-OSS ``swiglu_oai``."""
    gate, up = h_NG.chunk(2, dim=-1)
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "swiglu_oai":
        gate = gate.clamp(max=OAI_LIMIT)
        glu = gate * torch.sigmoid(gate * OAI_ALPHA)
        return (up.clamp(-OAI_LIMIT, OAI_LIMIT) + 1.0) * glu
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def activation_backward(h_NG: torch.Tensor, dact_NI: torch.Tensor, activation: str) -> torch.Tensor:
    """Gradient of :func:`activation_forward` w.r.t. ``h_NG``, given upstream ``dact_NI``."""
    gate, up = h_NG.chunk(2, dim=-1)
    dh_NG = torch.empty_like(h_NG)
    dgate, dup = dh_NG.chunk(2, dim=-1)
    if activation == "swiglu":
        torch.mul(dact_NI, F.silu(gate), out=dup)
        dgate.copy_(torch.ops.aten.silu_backward(dact_NI * up, gate))
    elif activation == "swiglu_oai":
        # Clamped branches pass no gradient outside the clamp range (torch.clamp semantics).
        g = gate.clamp(max=OAI_LIMIT)
        sig = torch.sigmoid(g * OAI_ALPHA)
        glu = g * sig
        torch.mul(dact_NI, glu, out=dup)
        dup.masked_fill_(up.abs() > OAI_LIMIT, 0.0)
        # d glu / d g = sig + alpha * glu * (1 - sig)
        dglu = glu.mul_(1.0 - sig).mul_(OAI_ALPHA).add_(sig)
        torch.mul(dact_NI * (up.clamp(-OAI_LIMIT, OAI_LIMIT) + 1.0), dglu, out=dgate)
        dgate.masked_fill_(gate > OAI_LIMIT, 0.0)
    else:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return dh_NG
