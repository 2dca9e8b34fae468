"""Dense projections with optional bias and LoRA, and the gated MLP built from them.

A linear layer's params are a dict ``{"weight": [out, in], "bias": [out]?, "lora_a": [r, in]?,
"lora_b": [out, r]?}`` (the hub's ``nn.Linear`` orientation); LoRA is applied unmerged,
``x W^T + b + scale * (dropout(x) A^T) B^T`` (dropout only when ``dropout > 0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(
    x: torch.Tensor, params: dict, lora_scale: float = 1.0, dropout: float = 0.0
) -> torch.Tensor:
    y = F.linear(x, params["weight"], params.get("bias"))
    if params.get("lora_a") is not None:
        x_in = F.dropout(x, dropout) if dropout > 0 else x
        z = F.linear(x_in, params["lora_a"])
        # y + s z B^T as one GEMM that accumulates into y: no full-width product, scaling and
        # sum as separate passes (nor the scaled gradient in backward)
        y_2d = torch.addmm(
            y.reshape(-1, y.shape[-1]),
            z.reshape(-1, z.shape[-1]),
            params["lora_b"].t(),
            alpha=lora_scale,
        )
        y = y_2d.view(y.shape)
    return y


def swiglu_mlp(
    x: torch.Tensor, params: dict, lora_scale: float = 1.0, dropout: float = 0.0
) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with params ``gate_proj``, ``up_proj``, ``down_proj``."""
    gate = linear(x, params["gate_proj"], lora_scale, dropout)
    up = linear(x, params["up_proj"], lora_scale, dropout)
    return linear(F.silu(gate) * up, params["down_proj"], lora_scale, dropout)
