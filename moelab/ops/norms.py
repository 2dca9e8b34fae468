"""RMSNorm in the two flavours the reference models use (checkpoint-formats.md §1.3)."""

from __future__ import annotations

import torch


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, weight_in_fp32: bool = False
) -> torch.Tensor:
    """``x / rms(x) * weight``, normalised in fp32.

    Llama flavour (default; Qwen3, DeepSeek, GLM): the normalised value is cast to x's dtype
    before the weight multiply. GPT-OSS flavour (``weight_in_fp32``): multiply in fp32, then cast.
    """
    h = x.float()
    h = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps)
    if weight_in_fp32:
        return (weight.float() * h).to(x.dtype)
    return weight * h.to(x.dtype)
