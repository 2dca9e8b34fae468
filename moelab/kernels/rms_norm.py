"""RMSNorm in both reference flavours as one Triton pass each way, with its autograd.

``F.rms_norm`` runs one kernel but the Llama flavour's weight multiply is a second pass (and a
third in backward), the GPT-OSS flavour adds fp32 copies on both sides, and torch's kernel is
slow on the 128-wide rows of the per-head q/k norms. Here a program normalises a block of rows
in fp32, applies the weight with the flavour's rounding (Llama: the normalised value is rounded
to x's dtype before the multiply; GPT-OSS: multiplied in fp32) and stores once; backward reads
x, the output gradient and the saved 1 / rms once and writes dx, with the weight's gradient as
per-program partial sums (fixed order, no atomics) when the weight trains. Used by
:mod:`moelab.ops.norms` on CUDA; on CPU under ``TRITON_INTERPRET`` for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels import launch as kl
from moelab.kernels.first_order import first_order_backward

_BLOCK_ELEMENTS = 4096  # elements per program: many rows per program for narrow (per-head) rows


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, rows, dim, eps,
    WEIGHT_IN_FP32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row_ids = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r = row_ids[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (r < rows) & (d < dim)
    offs = r.to(tl.int64) * dim + d
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / dim + eps)
    tl.store(rstd_ptr + row_ids, rstd, mask=row_ids < rows)
    n = x * rstd[:, None]
    w = tl.load(w_ptr + d, mask=d < dim, other=0.0).to(tl.float32)
    if not WEIGHT_IN_FP32:  # Llama flavour: round the normalised value first
        n = n.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs, (w * n).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_ptr, rows, dim,
    WEIGHT_IN_FP32: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dx = rstd (g - n mean(g n)) with g = w dy and n = x rstd; dw partial = sum dy n."""
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (r < rows) & (d < dim)
    offs = r.to(tl.int64) * dim + d
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + r, mask=r < rows, other=0.0)
    w = tl.load(w_ptr + d, mask=d < dim, other=0.0).to(tl.float32)
    n = x * rstd
    g = dy * w
    dx = rstd * (g - n * (tl.sum(g * n, axis=1)[:, None] / dim))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WEIGHT_GRAD:
        if not WEIGHT_IN_FP32:  # the weight multiplied the rounded normalised value
            n = n.to(dx_ptr.dtype.element_ty).to(tl.float32)
        tl.store(dw_ptr + pid.to(tl.int64) * dim + d, tl.sum(dy * n, axis=0)[None, :],
                 mask=d < dim)  # fmt: skip


def _blocks(dim: int) -> tuple[int, int]:
    block_d = kl.next_power_of_2(dim)
    return max(1, _BLOCK_ELEMENTS // block_d), block_d


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, weight_in_fp32):
        x_2d = x.reshape(-1, x.shape[-1]).contiguous()
        rows, dim = x_2d.shape
        y = torch.empty_like(x_2d)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        block_r, block_d = _blocks(dim)
        if rows:
            kl.launch(
                _rms_norm_fwd_kernel, (kl.cdiv(rows, block_r),),
                (x_2d, weight, y, rstd, rows, dim, eps),
                dict(WEIGHT_IN_FP32=weight_in_fp32, BLOCK_R=block_r, BLOCK_D=block_d),
                ("rms_norm", weight_in_fp32, block_r, block_d),
            )  # fmt: skip
        ctx.save_for_backward(x_2d, weight, rstd)
        ctx.weight_in_fp32 = weight_in_fp32
        return y.view(x.shape)

    @staticmethod
    @first_order_backward("the RMSNorm kernel")
    def backward(ctx, dy):
        x_2d, weight, rstd = ctx.saved_tensors
        rows, dim = x_2d.shape
        dy_2d = dy.reshape(rows, dim).contiguous()
        dx = torch.empty_like(x_2d)
        block_r, block_d = _blocks(dim)
        programs = kl.cdiv(rows, block_r)
        weight_grad = ctx.needs_input_grad[1]
        dw_parts = torch.empty(programs if weight_grad else 0, dim, device=dy.device,
                               dtype=torch.float32)  # fmt: skip
        if rows:
            sizes = dict(WEIGHT_IN_FP32=ctx.weight_in_fp32, WEIGHT_GRAD=weight_grad,
                         BLOCK_R=block_r, BLOCK_D=block_d)  # fmt: skip
            kl.launch(
                _rms_norm_bwd_kernel, (programs,),
                (x_2d, weight, rstd, dy_2d, dx, dw_parts, rows, dim),
                sizes, ("rms_norm_bwd", *sizes.values()),
            )  # fmt: skip
        dw = dw_parts.sum(0).to(weight.dtype) if weight_grad else None
        return dx.view(dy.shape), dw, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_in_fp32: bool = False
) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last axis (see :func:`moelab.ops.norms.rms_norm`)."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight {tuple(weight.shape)} does not match width {x.shape[-1]}")
    return _RMSNorm.apply(x, weight, float(eps), weight_in_fp32)
