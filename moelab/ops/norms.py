"""RMSNorm in the two flavours the reference models use (checkpoint-formats.md §1.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, weight_in_fp32: bool = False
) -> torch.Tensor:
    """``x / rms(x) * weight``, normalised in fp32.

    Llama flavour (default; Qwen3, DeepSeek, GLM): the normalised value is cast to x's dtype
    before the weight multiply. GPT-OSS flavour (``weight_in_fp32``): multiply in fp32, then cast.
    ``F.rms_norm`` normalises half-precision input in fp32 (bit-identical to spelling it out)
    in one fused kernel on CUDA instead of six elementwise passes.
    """
    shape = (x.shape[-1],)
    if weight_in_fp32:
        return F.rms_norm(x.float(), shape, weight.float(), eps).to(x.dtype)
    return weight * F.rms_norm(x, shape, None, eps)
