"""The SDPA attention paths against the eager formula evaluated in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from moelab.ops.attention import attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(dtype, seq=37, heads=4, kv_heads=2, dim=16, batch=2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g)
    v = torch.randn(batch, kv_heads, seq, dim, generator=g)
    sinks = torch.randn(heads, generator=g) * 2
    docs = torch.cumsum(torch.rand(batch, seq, generator=g) < 0.1, dim=1)
    leaves = [t.to(device, dtype).requires_grad_(True) for t in (q, k, v, sinks)]
    return leaves + [docs.to(device)]


CASES = {
    "causal": {},
    "sliding window 5": {"sliding_window": 5},
    "packed documents": {"documents": True},
    "window + documents": {"sliding_window": 8, "documents": True},
    "window wider than the band blocks": {"sliding_window": 20},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_with_sinks_matches_float64_eager(case, dtype, device):
    """Sinks on the fused path (CPU flash kernel; CUDA: flash in bf16, memory-efficient in fp32
    or with documents): output and the gradients to q, k, v and the sinks."""
    q, k, v, sinks, docs = _inputs(dtype, device=device)
    opts = dict(scale=0.25, sliding_window=CASES[case].get("sliding_window"))
    if CASES[case].get("documents"):
        opts["document_ids_BS"] = docs
    out = attention(q, k, v, sinks_N=sinks, impl="sdpa", **opts)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v, sinks], dout)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, sinks)]
    ref = attention(*leaves[:3], sinks_N=leaves[3], impl="eager", **opts)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and rel_err(out, ref) <= tol
    for name, g, r in zip("q k v sinks".split(), grads, ref_grads):
        assert g.dtype == dtype, name
        assert rel_err(g, r) <= tol, name


def test_long_sliding_window_runs_in_query_blocks(monkeypatch):
    """Past two band blocks the sliding window goes blockwise (S (C + W) scores, not S^2)."""
    from moelab.ops import attention as att

    calls = []
    original = att._SinkAttention.apply

    def recording(q, k, *rest):
        calls.append((q.shape[2], k.shape[2]))
        return original(q, k, *rest)

    monkeypatch.setattr(att._SinkAttention, "apply", recording)
    q, k, v, sinks, _ = _inputs(torch.float32, seq=100)
    attention(q, k, v, scale=0.25, sinks_N=sinks, sliding_window=7)
    assert calls == [(16, 23)]


def test_sinks_lower_the_attention_mass():
    """A very large sink takes all the mass (output -> 0); a very small one changes nothing."""
    q, k, v, sinks, _ = _inputs(torch.float32)
    plain = attention(q, k, v, scale=0.25)
    with torch.no_grad():
        low = attention(q, k, v, scale=0.25, sinks_N=torch.full_like(sinks, -1e4))
        high = attention(q, k, v, scale=0.25, sinks_N=torch.full_like(sinks, 1e4))
    assert rel_err(low, plain) <= 1e-6
    assert high.abs().max() < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash kernel is CUDA-only")
@pytest.mark.parametrize(
    "seq, window",
    [
        (700, None),  # full causal
        (700, 128),  # GPT-OSS's window, several band blocks
        (100, 128),  # a window wider than the sequence
        (1, 128),  # one token
    ],
)
def test_flash_sinks_at_gpt_oss_head_shape(seq, window, monkeypatch):
    """bf16 on CUDA takes the flash path (GQA and window in the kernel) at GPT-OSS's head shape
    (64 query / 8 kv heads of 64, window 128) and matches the float64 eager formula."""
    from moelab.ops import attention as att

    used = []
    original = att._FlashSinkAttention.apply
    monkeypatch.setattr(att._FlashSinkAttention, "apply", lambda *a: used.append(1) or original(*a))
    q, k, v, sinks, _ = _inputs(
        torch.bfloat16, seq=seq, heads=64, kv_heads=8, dim=64, batch=2, device="cuda"
    )
    out = attention(q, k, v, scale=0.125, sinks_N=sinks, sliding_window=window)
    assert used
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v, sinks], dout)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, sinks)]
    ref = attention(*leaves[:3], scale=0.125, sinks_N=leaves[3], sliding_window=window,
                    impl="eager")  # fmt: skip
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    assert rel_err(out, ref) <= 2e-2
    for name, g, r in zip("q k v sinks".split(), grads, ref_grads):
        assert rel_err(g, r) <= 2e-2, name
