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


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight trains", "weight frozen"])
@pytest.mark.parametrize("weight_in_fp32", [False, True], ids=["llama", "gpt-oss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(5, 7, 45), (3, 70, 16)], ids=["odd width", "narrow rows"])
def test_fused_rms_norm_kernel(shape, dtype, weight_in_fp32, weight_grad):
    """The Triton kernel (CUDA; the CPU interpreter here): the flavour's formula (to within one
    rounding of the output), and gradients to x and the weight against float64."""
    from moelab.kernels.rms_norm import rms_norm as fused

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_(True)
    w = (1 + torch.randn(shape[-1], generator=g)).to(DEVICE, dtype).requires_grad_(weight_grad)
    out = fused(x, w, 1e-6, weight_in_fp32)
    spelled = _spelled_out(x.detach(), w.detach(), 1e-6, weight_in_fp32)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, spelled) <= (1e-6 if dtype == torch.float32 else 8e-3)
    dout = torch.randn(shape, generator=g).to(DEVICE, dtype)
    inputs = [x, w] if weight_grad else [x]
    grads = torch.autograd.grad(out, inputs, dout)
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    ref = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w64
    ref_grads = torch.autograd.grad(ref, [x64, w64][: len(inputs)], dout.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= tol


def test_fused_rms_norm_refuses_a_mismatched_weight():
    from moelab.kernels.rms_norm import rms_norm as fused

    with pytest.raises(ValueError, match="does not match width"):
        fused(torch.zeros(2, 8, device=DEVICE), torch.ones(4, device=DEVICE), 1e-6)
