"""Rotary embedding (rotate-half pairing) as one Triton pass each way, with its autograd.

The torch spelling (:func:`moelab.ops.rope.apply_rope` on CPU) makes five passes over q and k
in forward (negate, concatenate, two products, a sum) and as many in backward, most over
strided views. Here one program per position reads the position's heads once and writes the
rotated heads once, in fp32 with one rounding; backward is the same pass with the transposed
rotation. Used by :mod:`moelab.ops.rope` on CUDA; on CPU under ``TRITON_INTERPRET`` for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels import launch as kl
from moelab.kernels.first_order import first_order_backward


@triton.jit
def _rope_kernel(
    x_ptr,
    stride_xb,
    stride_xs,
    stride_xn,
    stride_xd,
    cos_ptr,
    sin_ptr,
    stride_cb,
    stride_cs,
    out_ptr,
    stride_ob,
    stride_os,
    stride_on,
    seq,
    heads,
    head_dim,
    rot,
    TRANSPOSED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[d] = x[d] cos[d] + sign(d) x[p(d)] sin[d] on the first ``rot`` channels (p pairs the
    halves, sign is -1 on the first half); the rest pass. ``TRANSPOSED`` applies the rotation's
    transpose (backward): out[d] = x[d] cos[d] - sign(d) x[p(d)] sin[p(d)]."""
    pid = tl.program_id(0)
    b = pid // seq
    s = pid % seq
    half = rot // 2
    n = tl.arange(0, BLOCK_N)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    rotating = d < rot
    partner = tl.where(d < half, d + half, d - half)
    mask = (n < heads) & (d < head_dim)
    x_row = x_ptr + b.to(tl.int64) * stride_xb + s.to(tl.int64) * stride_xs + n * stride_xn
    x = tl.load(x_row + d * stride_xd, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(x_row + partner * stride_xd, mask=mask & rotating, other=0.0).to(tl.float32)
    c_row = b.to(tl.int64) * stride_cb + s.to(tl.int64) * stride_cs
    cos = tl.load(cos_ptr + c_row + d, mask=rotating, other=1.0).to(tl.float32)
    sign = tl.where(d < half, -1.0, 1.0)
    if TRANSPOSED:
        sin = tl.load(sin_ptr + c_row + partner, mask=rotating, other=0.0).to(tl.float32)
        sign = -sign
    else:
        sin = tl.load(sin_ptr + c_row + d, mask=rotating, other=0.0).to(tl.float32)
    out = x * cos + sign * xp * sin
    o_row = out_ptr + b.to(tl.int64) * stride_ob + s.to(tl.int64) * stride_os + n * stride_on
    tl.store(o_row + d, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(x_BNSD: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor, transposed: bool):
    """The rotated heads as a ``[B, N, S, D]`` view of a ``[B, S, N, D]`` tensor (the layout the
    projections produce and the attention kernels read without a copy)."""
    b, n, s, d = x_BNSD.shape
    out = x_BNSD.new_empty(b, s, n, d)
    if out.numel():
        cos, sin = cos_BSR.expand(b, s, -1), sin_BSR.expand(b, s, -1)
        sizes = dict(TRANSPOSED=transposed, BLOCK_N=kl.next_power_of_2(n),
                     BLOCK_D=kl.next_power_of_2(d), num_warps=4)  # fmt: skip
        kl.launch(
            _rope_kernel, (b * s,),
            (x_BNSD, x_BNSD.stride(0), x_BNSD.stride(2), x_BNSD.stride(1), x_BNSD.stride(3),
             cos, sin, cos.stride(0), cos.stride(1),
             out, out.stride(0), out.stride(1), out.stride(2),
             s, n, d, cos_BSR.shape[-1]),
            sizes, ("rope", *sizes.values()),
        )  # fmt: skip
    return out.transpose(1, 2)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BNSD, cos_BSR, sin_BSR):
        ctx.save_for_backward(cos_BSR, sin_BSR)
        return _rotate(x_BNSD, cos_BSR, sin_BSR, transposed=False)

    @staticmethod
    @first_order_backward("the RoPE kernel")
    def backward(ctx, dout_BNSD):
        cos_BSR, sin_BSR = ctx.saved_tensors
        return _rotate(dout_BNSD, cos_BSR, sin_BSR, transposed=True), None, None


def rope(x_BNSD: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding on the first ``R`` channels of each head (no gradient to
    cos and sin: they are functions of the positions)."""
    if cos_BSR.stride(-1) != 1 or sin_BSR.stride(-1) != 1 or cos_BSR.stride() != sin_BSR.stride():
        cos_BSR, sin_BSR = cos_BSR.contiguous(), sin_BSR.contiguous()
    return _Rope.apply(x_BNSD, cos_BSR, sin_BSR)
