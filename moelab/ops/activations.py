"""Gated activations of the expert MLP, forward and hand-written backward.

The fused projection ``h_NG`` holds the gate in columns ``[0, I)`` and the up branch in
``[I, 2I)`` (see design.md). Math runs in fp32 (fp64 for fp64 inputs) and the result is cast back to ``h``'s dtype.
Backends with their own autograd call :func:`activation_backward`; ``native_torch`` lets
autograd differentiate :func:`activation_forward`.
"""

from __future__ import annotations

import torch

ACTIVATIONS = ("swiglu", "swiglu_oai")

# GPT-OSS clamped SwiGLU constants.
OAI_LIMIT = 7.0
OAI_ALPHA = 1.702


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def activation_forward(h_NG: torch.Tensor, activation: str) -> torch.Tensor:
    """``[N, 2I] -> [N, I]``: swiglu ``silu(gate) * up`` or GPT-OSS ``swiglu_oai``."""
    gate, up = h_NG.to(_math_dtype(h_NG)).chunk(2, dim=-1)
    if activation == "swiglu":
        act = torch.nn.functional.silu(gate) * up
    elif activation == "swiglu_oai":
        gate = gate.clamp(max=OAI_LIMIT)
        up = up.clamp(-OAI_LIMIT, OAI_LIMIT)
        act = (up + 1.0) * gate * torch.sigmoid(OAI_ALPHA * gate)
    else:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return act.to(h_NG.dtype)


def activation_backward(h_NG: torch.Tensor, dact_NI: torch.Tensor, activation: str) -> torch.Tensor:
    """Gradient of :func:`activation_forward` w.r.t. ``h_NG``, given upstream ``dact_NI``."""
    gate, up = h_NG.to(_math_dtype(h_NG)).chunk(2, dim=-1)
    dact = dact_NI.to(gate.dtype)
    if activation == "swiglu":
        sig = torch.sigmoid(gate)
        silu = gate * sig
        dgate = dact * up * (sig + silu * (1.0 - sig))
        dup = dact * silu
    elif activation == "swiglu_oai":
        # Clamped branches pass no gradient outside the clamp range (torch.clamp semantics).
        g = gate.clamp(max=OAI_LIMIT)
        u = up.clamp(-OAI_LIMIT, OAI_LIMIT)
        sig = torch.sigmoid(OAI_ALPHA * g)
        glu = g * sig
        dgate = dact * (u + 1.0) * (sig + OAI_ALPHA * glu * (1.0 - sig))
        dgate = dgate.masked_fill(gate > OAI_LIMIT, 0.0)
        dup = (dact * glu).masked_fill(up.abs() > OAI_LIMIT, 0.0)
    else:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return torch.cat([dgate, dup], dim=-1).to(h_NG.dtype)
