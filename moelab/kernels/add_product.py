"""``c + a b`` over a short inner dimension in one pass, rounded once, into a new tensor: the
router's gradient of x (``dlogits W``, inner dimension E) added to the experts' (``c``).

torch makes this either a product and an addition (autograd's sum of the two gradients) or, as
``addmm``, a copy of c and a GEMM that accumulates into the copy: both pass over c's size twice
besides the product (0.037 ms at Qwen3-30B-A3B, 8192 tokens; BENCHMARKS.md, runs 154-155).
With E <= 256 the product is a few FLOPs per element, so one program per output tile reads c
and the product's operands once and writes the sum once: the pass is bound by memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels import launch as kl
from moelab.kernels.triton_kernels import _cast, _dot

MAX_INNER = 256  # beyond this the product is no longer small beside c: torch's path runs
_BLOCK_M, _BLOCK_N, _WARPS = 64, 128, 4


@triton.jit
def _add_product_kernel(
    c_ptr, a_ptr, b_ptr, out_ptr, rows, cols, inner,
    stride_cm, stride_cn, stride_am, stride_ak, stride_bk, stride_bn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m64, n64 = m.to(tl.int64), n.to(tl.int64)  # offsets past 2**31 elements (c transposed)
    mask = (m < rows)[:, None] & (n < cols)[None, :]
    acc = tl.load(c_ptr + m64[:, None] * stride_cm + n64[None, :] * stride_cn, mask=mask, other=0.0)
    acc = acc.to(tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a_mask = (m < rows)[:, None] & (k < inner)[None, :]
        a = tl.load(
            a_ptr + m64[:, None] * stride_am + k[None, :] * stride_ak, mask=a_mask, other=0.0
        )
        b_mask = (k < inner)[:, None] & (n < cols)[None, :]
        b = tl.load(b_ptr + k[:, None] * stride_bk + n[None, :] * stride_bn, mask=b_mask, other=0.0)
        acc = _dot(a, b, acc, UPCAST, None)
    out = out_ptr + m64[:, None] * stride_om + n[None, :]
    tl.store(out, _cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=mask)


def runs(c_MN: torch.Tensor, a_MK: torch.Tensor, b_KN: torch.Tensor) -> bool:
    """Whether :func:`add_product` runs here: CUDA tensors of one half-precision dtype (bf16,
    fp16: fp32 would need the products in fp32, not the tensor cores' TF32) and an inner
    dimension up to ``MAX_INNER``. On CPU, tests call it under ``TRITON_INTERPRET=1``."""
    dtype = c_MN.dtype
    return (
        c_MN.is_cuda
        and dtype in (torch.bfloat16, torch.float16)
        and a_MK.dtype == dtype
        and b_KN.dtype == dtype
        and a_MK.shape[1] <= MAX_INNER
    )


def add_product(c_MN: torch.Tensor, a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """``c + a b`` (fp32 accumulation, one rounding to c's dtype) as a new contiguous tensor;
    c is only read. Any strides; callers check :func:`runs`."""
    rows, cols = c_MN.shape
    inner = a_MK.shape[1]
    out = torch.empty(rows, cols, dtype=c_MN.dtype, device=c_MN.device)
    if out.numel() == 0:
        return out
    block_k = min(64, max(16, kl.next_power_of_2(inner)))
    grid = (kl.cdiv(rows, _BLOCK_M), kl.cdiv(cols, _BLOCK_N))
    # fmt: off
    args = (c_MN, a_MK, b_KN, out, rows, cols, inner, *c_MN.stride(), *a_MK.stride(),
            *b_KN.stride(), out.stride(0))
    # fmt: on
    sizes = dict(BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=block_k, UPCAST=kl.interpreting())
    kl.launch(
        _add_product_kernel,
        grid,
        args,
        dict(sizes, num_warps=_WARPS),
        ("add_product", *sizes.values()),
    )
    return out
