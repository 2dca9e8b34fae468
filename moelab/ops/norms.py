"""RMSNorm in the two flavours the reference models use (checkpoint-formats.md §1.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.kernels.rms_norm import rms_norm as fused_rms_norm


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, weight_in_fp32: bool = False
) -> torch.Tensor:
    """``x / rms(x) * weight``, normalised in fp32.

    Llama flavour (default; Qwen3, DeepSeek, GLM): the normalised value is cast to x's dtype
    before the weight multiply. GPT-OSS flavour (``weight_in_fp32``): multiply in fp32, then cast.
    On CUDA one Triton pass each way (:mod:`moelab.kernels.rms_norm`, same roundings); on CPU
    ``F.rms_norm``, which normalises half-precision input in fp32 (bit-identical to spelling it
    out as the reference models do).
    """
    if x.is_cuda:
        return fused_rms_norm(x, weight, eps, weight_in_fp32)
    shape = (x.shape[-1],)
    if weight_in_fp32:
        return F.rms_norm(x.float(), shape, weight.float(), eps).to(x.dtype)
    return weight * F.rms_norm(x, shape, None, eps)
