"""RMSNorm flavours against their reference spelling and float64."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from conftest import rel_err

from moelab.ops.norms import rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _normalised(x, eps, rstd_scale=1.0):
    h = x.float()
    return h * (torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps) * rstd_scale)


def _spelled_out(x, weight, eps, weight_in_fp32, cast=None, rstd_scale=1.0):
    """The reference models' eager formula (checkpoint-formats.md §1.3). ``cast`` rounds fp32 to
    x's dtype (torch's round-to-nearest-even unless given); ``rstd_scale`` moves 1 / rms by a
    relative hair, to bracket a kernel that sums the squares in another order."""
    cast = cast or (lambda t: t.to(x.dtype))
    h = _normalised(x, eps, rstd_scale)
    if weight_in_fp32:
        return cast(weight.float() * h)
    # weight * h.to(x.dtype): the product of two half-precision values is exact in fp32
    return cast(weight.float() * cast(h).float())


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)


def _backend_cast(t, dtype):
    """fp32 -> dtype as a Triton kernel's ``.to`` rounds it. Compiled kernels round to nearest
    even, as torch does; Triton 3.9's CPU interpreter truncates (runtime/interpreter.py casts
    fp32 -> bf16 through _convert_float with no rounding mode). The kernel is held to the
    reference's roundings, each done the way its platform rounds."""
    t = t.contiguous()
    out = torch.empty(t.shape, device=t.device, dtype=dtype)
    _cast_kernel[(triton.cdiv(t.numel(), 1024),)](t, out, t.numel(), BLOCK=1024)
    if t.is_cuda:  # there the kernel's rounding is the reference models' own
        assert torch.equal(out, t.to(dtype))
    return out


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


# Relative slack on the kernel's 1 / rms against the reference's: it sums the squares in another
# order (a tree on the GPU) and on CUDA takes the root and the reciprocal with other
# instructions. 64 fp32 ulps covers both; in bf16 it moves under 1% of the outputs' roundings.
_RSTD_SLACK = 2.0**-18


def _within(lo, got, hi):
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    return bool(((lo <= got) & (got <= hi)).all()), (lo == hi).double().mean().item()


@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight trains", "weight frozen"])
@pytest.mark.parametrize("weight_in_fp32", [False, True], ids=["llama", "gpt-oss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(5, 7, 45), (3, 70, 16)], ids=["odd width", "narrow rows"])
def test_fused_rms_norm_kernel(shape, dtype, weight_in_fp32, weight_grad):
    """The Triton kernel (CUDA; the CPU interpreter here): the flavour's formula with its
    roundings (bit for bit up to the last bits of 1 / rms), the weight's gradient from the same
    rounded normalised value, and gradients to x and the weight against float64."""
    from moelab.kernels.rms_norm import rms_norm as fused

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_(True)
    w = (1 + torch.randn(shape[-1], generator=g)).to(DEVICE, dtype).requires_grad_(weight_grad)
    out = fused(x, w, 1e-6, weight_in_fp32)
    assert out.shape == x.shape and out.dtype == dtype
    xd, wd = x.detach(), w.detach()
    if dtype == torch.float32:
        assert rel_err(out, _spelled_out(xd, wd, 1e-6, weight_in_fp32)) <= 1e-6

    def cast(t):
        return _backend_cast(t, dtype)

    # The output lies between the reference evaluated with 1 / rms a hair low and a hair high;
    # in bf16 those agree on nearly every element, so this is equality with the reference's
    # roundings (a missing or extra rounding moves about half the elements by an ulp).
    lo, hi = (
        _spelled_out(xd, wd, 1e-6, weight_in_fp32, cast, 1 + s * _RSTD_SLACK) for s in (-1, 1)
    )
    inside, tight = _within(lo, out, hi)
    assert inside
    assert dtype == torch.float32 or tight >= 0.99

    dout = torch.randn(shape, generator=g).to(DEVICE, dtype)
    inputs = [x, w] if weight_grad else [x]
    grads = torch.autograd.grad(out, inputs, dout)
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    ref = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w64
    ref_grads = torch.autograd.grad(ref, [x64, w64][: len(inputs)], dout.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= tol
    if weight_grad:
        # dw = sum over rows of dout * n, with n rounded to x's dtype first in the Llama flavour
        # (it is what the weight multiplied). The kernel sums fp32 products in its own order:
        # bracket the exact sums by the fp32 summation error bound, then round like its cast.
        rows, dim = x.numel() // shape[-1], shape[-1]
        dy = dout.reshape(rows, dim).double()
        terms = []
        for s in (-1, 1):
            n = _normalised(xd, 1e-6, 1 + s * _RSTD_SLACK)
            n = n if weight_in_fp32 else cast(n)
            terms.append(dy * n.reshape(rows, dim).double())
        t_lo, t_hi = torch.minimum(*terms), torch.maximum(*terms)
        err = (rows + 1) * 2.0**-24 * torch.maximum(t_lo.abs(), t_hi.abs()).sum(0)
        dw_lo, dw_hi = ((t.sum(0) + e).float().to(dtype) for t, e in ((t_lo, -err), (t_hi, err)))
        inside, tight = _within(dw_lo, grads[1], dw_hi)
        assert inside
        # not vacuous: most bounds round to one value (0.75 to 1 seen); dropping the rounding
        # of n moves about half the columns out
        assert dtype == torch.float32 or tight >= 0.5


@pytest.mark.parametrize("weight_in_fp32", [False, True], ids=["llama", "gpt-oss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_rms_norm_epsilon_inside_the_root(dtype, weight_in_fp32):
    """Rows whose mean square is far below eps, and an all-zero row: there eps sets the scale
    (1 / sqrt(ms + eps), not 1 / (sqrt(ms) + eps)), and the zero row's gradient is w dy /
    sqrt(eps), finite. Values and gradients against float64, row by row."""
    from moelab.kernels.rms_norm import rms_norm as fused

    eps = 1e-2
    g = torch.Generator().manual_seed(2)
    scale = torch.tensor([1e-3, 3e-3, 0.0, 1.0])[:, None]  # ms 1e-6, 9e-6, 0 and 1 against eps
    x = (torch.randn(4, 24, generator=g) * scale).to(DEVICE, dtype).requires_grad_(True)
    w = (1 + torch.randn(24, generator=g)).to(DEVICE, dtype).requires_grad_(True)
    dout = torch.randn(4, 24, generator=g).to(DEVICE, dtype)
    out = fused(x, w, eps, weight_in_fp32)
    dx, dw = torch.autograd.grad(out, [x, w], dout)
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    ref = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps) * w64
    dx_ref, dw_ref = torch.autograd.grad(ref, [x64, w64], dout.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    for row in (0, 1, 3):
        assert rel_err(out[row], ref[row]) <= tol
    for row in range(4):
        assert rel_err(dx[row], dx_ref[row]) <= tol
    assert rel_err(dw, dw_ref) <= tol


def test_fused_rms_norm_refuses_a_mismatched_weight():
    from moelab.kernels.rms_norm import rms_norm as fused

    with pytest.raises(ValueError, match="does not match width"):
        fused(torch.zeros(2, 8, device=DEVICE), torch.ones(4, device=DEVICE), 1e-6)
