"""The fused rotary kernel (used on CUDA; here under the CPU interpreter, or on the GPU when there
is one) against the reference spelling evaluated in float64: values and the gradient to x."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from moelab.kernels.rope import rope
from moelab.ops.rope import RopeConfig, rope_cos_sin, rope_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch, seq, heads, head_dim, rotary_dim, dtype, kind="default"):
    g = torch.Generator().manual_seed(3)
    # the projections' [B, S, N, D] layout seen as [B, N, S, D], as the attention blocks do
    x = torch.randn(batch, seq, heads, head_dim, generator=g).to(DEVICE, dtype).transpose(1, 2)
    cfg = RopeConfig(theta=10_000.0, rotary_dim=rotary_dim, kind=kind, factor=4.0,
                     original_max_position=8)  # fmt: skip
    positions = torch.arange(seq, device=DEVICE)[None] + 5
    cos, sin = rope_cos_sin(cfg, positions, dtype)  # [1, S, R]: broadcast over the batch
    return x.requires_grad_(True), cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "batch, seq, heads, head_dim, rotary_dim, kind",
    [
        (1, 7, 4, 16, 16, "default"),
        (2, 5, 3, 16, 8, "default"),  # partial rotary, heads not a power of two, batch of two
        (1, 1, 2, 8, 8, "yarn"),  # one position
    ],
)
def test_fused_rope_matches_float64_reference(batch, seq, heads, head_dim, rotary_dim, kind, dtype):
    x, cos, sin = _inputs(batch, seq, heads, head_dim, rotary_dim, dtype, kind)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    out = rope(x, cos, sin)
    (dx,) = torch.autograd.grad(out, x, dout)

    x64 = x.detach().double().requires_grad_(True)
    ref = rope_reference(x64, cos.double(), sin.double())
    (dx_ref,) = torch.autograd.grad(ref, x64, dout.double())
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, ref) <= tol
    assert rel_err(dx, dx_ref) <= tol
    # the untouched channels pass bit for bit
    assert torch.equal(out[..., rotary_dim:], x.detach()[..., rotary_dim:])


def test_fused_rope_output_is_a_view_of_the_projection_layout():
    """The result is [B, N, S, D] over [B, S, N, D] memory, which the attention kernels read
    without a copy."""
    x, cos, sin = _inputs(1, 6, 4, 16, 16, torch.float32)
    out = rope(x, cos, sin)
    assert out.transpose(1, 2).is_contiguous()
