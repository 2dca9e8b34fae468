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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_rope_positions_per_batch_row(dtype):
    """Packed documents: each batch row restarts its positions at its own offsets, so cos and sin
    are [B, S, R] and row b must turn by its own angles (every position differs between the two
    rows). Against rotate-half spelled out here in float64 on the same cos and sin."""
    batch, seq, heads, head_dim, rot = 2, 6, 3, 16, 12
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [3, 4, 5, 6, 0, 1]], dtype=torch.float64)
    inv_freq = 10_000.0 ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angles = positions[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # [B, S, R]: channel i pairs with i + R / 2
    cos, sin = (f(angles).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, seq, heads, head_dim, generator=g).to(DEVICE, dtype).transpose(1, 2)
    x.requires_grad_(True)
    dout = torch.randn(x.shape, generator=g).to(DEVICE, dtype)
    out = rope(x, cos, sin)
    (dx,) = torch.autograd.grad(out, x, dout)

    x64 = x.detach().double().requires_grad_(True)
    c, s = cos.double()[:, None], sin.double()[:, None]  # [B, 1, S, R] over the heads
    h = rot // 2
    x1, x2, rest = x64[..., :h], x64[..., h:rot], x64[..., rot:]
    first = x1 * c[..., :h] - x2 * s[..., :h]
    ref = torch.cat([first, x2 * c[..., h:] + x1 * s[..., h:], rest], dim=-1)
    (dx_ref,) = torch.autograd.grad(ref, x64, dout.double())
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    for b in range(batch):
        assert rel_err(out[b], ref[b]) <= tol
        assert rel_err(dx[b], dx_ref[b]) <= tol


def test_fused_rope_output_is_a_view_of_the_projection_layout():
    """The result is [B, N, S, D] over [B, S, N, D] memory, which the attention kernels read
    without a copy."""
    x, cos, sin = _inputs(1, 6, 4, 16, 16, torch.float32)
    out = rope(x, cos, sin)
    assert out.transpose(1, 2).is_contiguous()
