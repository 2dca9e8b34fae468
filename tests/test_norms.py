"""RMSNorm flavours against their reference spelling and float64."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from moelab.ops.norms import rms_norm


def _spelled_out(x, weight, eps, weight_in_fp32):
    """The reference models' eager formula (checkpoint-formats.md §1.3)."""
    h = x.float()
    h = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps)
    if weight_in_fp32:
        return (weight.float() * h).to(x.dtype)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("weight_in_fp32", [False, True], ids=["llama", "gpt-oss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rms_norm_is_the_reference_formula(dtype, weight_in_fp32):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 17, 96, generator=g) * 4).to(dtype).requires_grad_(True)
    w = (1 + torch.randn(96, generator=g)).to(dtype).requires_grad_(True)
    out = rms_norm(x, w, 1e-6, weight_in_fp32=weight_in_fp32)
    assert out.dtype == dtype
    assert torch.equal(out, _spelled_out(x, w, 1e-6, weight_in_fp32))  # bit-identical on CPU
    dout = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, [x, w], dout)
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    ref = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w64
    ref_grads = torch.autograd.grad(ref, [x64, w64], dout.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref) <= tol
    for g_, r in zip(grads, ref_grads):
        assert rel_err(g_, r) <= tol
