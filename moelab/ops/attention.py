"""Causal grouped-query attention over formed q, k, v.

Shape suffixes: see :mod:`moelab.ops`, plus N query heads, M key/value heads, D head width.
``impl="sdpa"`` runs ``scaled_dot_product_attention``; ``impl="eager"`` spells the math out
the way the reference implementations' eager path does (scores in the compute dtype, softmax in
fp32), for bit-level parity checks. Packed sequences: ``document_ids`` restricts attention to
the query's own document; a sliding window of W keeps keys ``j > i - W``.

Sinks (GPT-OSS): one learned logit per query head joins the softmax denominator and carries no
value, so a row's weights sum to less than 1. The SDPA path runs a fused kernel that returns the
row log-sum-exp and rescales its output: on CUDA in half precision the flash kernel (GQA and
sliding window native; ``_FlashSinkAttention``), elsewhere or with packed documents the
memory-efficient / CPU flash kernel over an additive mask (``_SinkAttention``). Neither has a
second derivative (a gradient penalty through them raises); the eager path does. The eager path
follows the reference (scores, sink column, max subtraction and softmax all in the compute
dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.kernels.first_order import first_order_backward

ATTENTION_IMPLS = ("sdpa", "eager")


def _allowed(q_pos, k_pos, sliding_window, q_docs=None, k_docs=None) -> torch.Tensor:
    """``[..., Q, K]``: True where a query at ``q_pos [..., Q]`` may attend a key at
    ``k_pos [..., K]`` (causal, inside the window, same document)."""
    allowed = k_pos[..., None, :] <= q_pos[..., :, None]
    if sliding_window is not None:
        allowed = allowed & (k_pos[..., None, :] > q_pos[..., :, None] - sliding_window)
    if q_docs is not None:
        allowed = allowed & (q_docs[..., :, None] == k_docs[..., None, :])
    return allowed


def attention_mask(
    seq_len: int,
    device: torch.device,
    document_ids_BS: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean ``[B or 1, 1, S, S]`` mask, True where query i may attend key j."""
    i = torch.arange(seq_len, device=device)
    if document_ids_BS is None:
        return _allowed(i, i, sliding_window)[None, None]
    return _allowed(i, i, sliding_window, document_ids_BS, document_ids_BS)[:, None]


def attention(
    q_BNSD: torch.Tensor,
    k_BMSD: torch.Tensor,
    v_BMSD: torch.Tensor,
    *,
    scale: float,
    document_ids_BS: torch.Tensor | None = None,
    sliding_window: int | None = None,
    sinks_N: torch.Tensor | None = None,
    impl: str = "sdpa",
) -> torch.Tensor:
    """Causal attention, ``[B, N, S, D]``; N must be a multiple of M (GQA)."""
    n_heads, m_heads = q_BNSD.shape[1], k_BMSD.shape[1]
    if n_heads % m_heads:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of kv heads ({m_heads})")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    seq_len = q_BNSD.shape[2]
    causal_only = document_ids_BS is None and sliding_window is None
    if impl == "sdpa" and sinks_N is None:
        return F.scaled_dot_product_attention(
            q_BNSD,
            k_BMSD,
            v_BMSD,
            attn_mask=None
            if causal_only
            else attention_mask(seq_len, q_BNSD.device, document_ids_BS, sliding_window),
            is_causal=causal_only,
            scale=scale,
            enable_gqa=n_heads != m_heads,
        )
    if impl == "sdpa" and document_ids_BS is None and _flash_supported(q_BNSD):
        return _flash_with_sinks(q_BNSD, k_BMSD, v_BMSD, sinks_N, scale, sliding_window)
    rep = n_heads // m_heads
    k_BNSD = k_BMSD.repeat_interleave(rep, dim=1) if rep > 1 else k_BMSD
    v_BNSD = v_BMSD.repeat_interleave(rep, dim=1) if rep > 1 else v_BMSD
    if impl == "sdpa":  # with sinks
        if sliding_window is not None and seq_len > 2 * _band_block(sliding_window):
            return _banded_with_sinks(
                q_BNSD, k_BNSD, v_BNSD, sinks_N, scale, sliding_window, document_ids_BS
            )
        mask = (
            None
            if causal_only
            else attention_mask(seq_len, q_BNSD.device, document_ids_BS, sliding_window)
        )
        return _sdpa_with_sinks(q_BNSD, k_BNSD, v_BNSD, mask, sinks_N, scale)
    mask = attention_mask(seq_len, q_BNSD.device, document_ids_BS, sliding_window)
    scores = torch.matmul(q_BNSD, k_BNSD.transpose(2, 3)) * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks_N is None:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_BNSD.dtype)
    else:
        sinks = sinks_N.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        logits = torch.cat([scores, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    return torch.matmul(probs, v_BNSD)


def _flash_supported(q_BNSD: torch.Tensor) -> bool:
    """The CUDA flash kernel: half precision, head width a multiple of 8 up to 256."""
    head_dim = q_BNSD.shape[-1]
    return (
        q_BNSD.is_cuda
        and q_BNSD.dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
    )


def _flash_with_sinks(q_BNSD, k_BMSD, v_BMSD, sinks_N, scale, window) -> torch.Tensor:
    """Sinks on the flash kernel, which takes GQA heads and the sliding window natively (no
    repeated k/v, no mask). It runs on tokens x heads rows: batches are equal-length varlen
    segments."""
    b, n, seq, d = q_BNSD.shape

    def rows(t):  # [B, H, S, D] -> [B * S, H, D] (no copy when t is a transposed [B, S, H, D])
        return t.transpose(1, 2).reshape(b * seq, t.shape[1], d)

    bounds = torch.arange(0, (b + 1) * seq, seq, device=q_BNSD.device, dtype=torch.int32)
    out = _FlashSinkAttention.apply(
        rows(q_BNSD), rows(k_BMSD), rows(v_BMSD), sinks_N, bounds, seq, window, scale
    )
    return out.reshape(b, seq, n, d).transpose(1, 2)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 / -inf bias from a boolean mask, its rows padded to a multiple of 16 elements (the
    alignment the fused kernels want)."""
    cols = mask.shape[-1]
    padded = torch.zeros((*mask.shape[:-1], -(-cols // 16) * 16), dtype=dtype, device=mask.device)
    return padded[..., :cols].masked_fill_(~mask, float("-inf"))


def _sdpa_with_sinks(q_BNSD, k_BNSD, v_BNSD, mask, sinks_N, scale) -> torch.Tensor:
    bias = None
    if mask is not None:  # [B or 1, 1, S, S], broadcast over heads without a copy
        bias = _additive(mask, q_BNSD.dtype).expand(*q_BNSD.shape[:3], k_BNSD.shape[2])
    return _SinkAttention.apply(q_BNSD, k_BNSD, v_BNSD, sinks_N, bias, mask is None, scale)


def _band_block(window: int) -> int:
    return -(-max(window, 16) // 16) * 16


def _banded_with_sinks(q_BNSD, k_BNSD, v_BNSD, sinks_N, scale, window, document_ids_BS):
    """Sliding-window attention as independent query blocks of C rows, each against the C + W
    keys it can see, so the work is S (C + W) scores instead of S^2."""
    b, n, seq, d = q_BNSD.shape
    c = _band_block(window)
    blocks = -(-seq // c)
    pad_end = blocks * c - seq

    def rows(t, front):  # [B, N, S, D] -> [B * blocks, N, rows per block, D]
        t = F.pad(t, (0, 0, front, pad_end))
        if front:
            t = t.unfold(2, c + window, c).permute(0, 2, 1, 4, 3)
        else:
            t = t.reshape(b, n, blocks, c, d).transpose(1, 2)
        return t.reshape(b * blocks, n, -1, d)

    q_blocks = rows(q_BNSD, 0)
    k_blocks, v_blocks = rows(k_BNSD, window), rows(v_BNSD, window)
    # absolute positions of each block's queries and keys (keys start W before the block)
    start = torch.arange(blocks, device=q_BNSD.device)[:, None] * c
    q_pos = start + torch.arange(c, device=q_BNSD.device)
    k_pos = start - window + torch.arange(c + window, device=q_BNSD.device)
    q_docs = k_docs = None
    if document_ids_BS is not None:
        docs = F.pad(document_ids_BS, (window, pad_end), value=-1)
        q_docs = docs[:, window:].reshape(b, blocks, c)
        k_docs = docs.unfold(1, c + window, c)
    # [(B,) blocks, C, C + W]; keys before position 0 are the front padding
    allowed = _allowed(q_pos, k_pos, window, q_docs, k_docs) & (k_pos >= 0)[:, None, :]
    allowed = allowed.expand(b, blocks, c, c + window).reshape(b * blocks, 1, c, c + window)
    bias = _additive(allowed, q_BNSD.dtype).expand(b * blocks, n, c, c + window)
    out = _SinkAttention.apply(q_blocks, k_blocks, v_blocks, sinks_N, bias, False, scale)
    out = out.reshape(b, blocks, n, c, d).transpose(1, 2).reshape(b, n, blocks * c, d)
    return out[:, :, :seq]


def _scaled_by_sinks(out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The fused kernel's output times ``w = sigmoid(L - sink)`` per row, in its dtype."""
    return (out.float() * w[..., None]).to(out.dtype)


def _through_sinks(dout, out, w, head_dims, sink_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dO, d_sinks)``: the kernel backward's upstream gradient ``w * dout``, and the sinks'
    gradient ``-sum (1 - w) <dout, out>`` over all but the head dimension (``head_dims``)."""
    d_o = (dout.float() * w[..., None]).to(out.dtype)
    row_dot = (dout.float() * out.float()).sum(-1)
    return d_o, -((1.0 - w) * row_dot).sum(dim=head_dims).to(sink_dtype)


# the fused paths' second-derivative error: their backwards are aten kernels' (sinks_N is saved
# only so that the error reaches a gradient penalty on the sinks)
_FUSED, _USE_EAGER = "sink attention (impl='sdpa')", "use impl='eager' for a gradient penalty"


class _SinkAttention(torch.autograd.Function):
    """Attention with sinks on a fused kernel that also returns the row log-sum-exp.

    With L = logsumexp of a row's scores, the sink only rescales the plain attention output:
    ``out = O * w``, ``w = sigmoid(L - sink)``. Backward reuses the fused kernel's backward: fed
    ``dO = w * dout`` and the rescaled ``out``, its ``rowsum(dO * out)`` term is exactly the
    sink-extended softmax's, so dq, dk and dv come out right; the sink's own gradient is
    ``-sum (1 - w) <dout, out>`` over the head's rows. No [S, S] scores exist on either pass.
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks_N, bias, is_causal, scale):
        if q.is_cuda:
            out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, bias, True, 0.0, is_causal, scale=scale
            )
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale
            )
            seed = offset = None
        seq = q.shape[2]
        w = torch.sigmoid(lse[..., :seq].float() - sinks_N.float()[None, :, None])
        out = _scaled_by_sinks(out, w)
        ctx.save_for_backward(q, k, v, sinks_N, bias, out, lse, w, seed, offset)
        ctx.is_causal, ctx.scale, ctx.sink_dtype = is_causal, scale, sinks_N.dtype
        return out

    @staticmethod
    @first_order_backward(_FUSED, _USE_EAGER)
    def backward(ctx, dout):
        q, k, v, _, bias, out, lse, w, seed, offset = ctx.saved_tensors
        d_o, d_sinks = _through_sinks(dout, out, w, (0, 2), ctx.sink_dtype)
        if q.is_cuda:
            dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                d_o, q, k, v, bias, out, lse, seed, offset, 0.0, [True, True, True, False],
                ctx.is_causal, scale=ctx.scale,
            )  # fmt: skip
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                d_o, q, k, v, out, lse, 0.0, ctx.is_causal, attn_mask=bias, scale=ctx.scale
            )
        return dq, dk, dv, d_sinks, None, None, None


class _FlashSinkAttention(torch.autograd.Function):
    """``_SinkAttention``'s rescaling on the flash kernel (CUDA, half precision): tokens x heads
    rows, segments given by ``bounds``, causal, optionally a window of the last W keys."""

    @staticmethod
    def forward(ctx, q_TND, k_TMD, v_TMD, sinks_N, bounds, max_seq, window, scale):
        # the kernel's window is inclusive: key j is seen by query i when i - left <= j <= i
        sides = dict(window_size_left=window - 1, window_size_right=0) if window else {}
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q_TND, k_TMD, v_TMD, bounds, bounds, max_seq, max_seq, 0.0, True, False,
            scale=scale, **sides,
        )  # fmt: skip
        # flash-attn versions differ: [N, T] or [segments, N, max_seq] (our segments are full)
        lse_TN = lse.t() if lse.dim() == 2 else lse.transpose(1, 2).reshape(-1, lse.shape[1])
        w_TN = torch.sigmoid(lse_TN.float() - sinks_N.float())
        out = _scaled_by_sinks(out, w_TN)
        ctx.save_for_backward(q_TND, k_TMD, v_TMD, sinks_N, out, lse, w_TN, bounds, rng, unused)
        ctx.max_seq, ctx.scale, ctx.sides, ctx.sink_dtype = max_seq, scale, sides, sinks_N.dtype
        return out

    @staticmethod
    @first_order_backward(_FUSED, _USE_EAGER)
    def backward(ctx, dout):
        q, k, v, _, out, lse, w_TN, bounds, rng, unused = ctx.saved_tensors
        d_o, d_sinks = _through_sinks(dout, out, w_TN, 0, ctx.sink_dtype)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            d_o, q, k, v, out, lse, bounds, bounds, ctx.max_seq, ctx.max_seq, 0.0, True,
            rng, unused, scale=ctx.scale, **ctx.sides,
        )  # fmt: skip
        return dq, dk, dv, d_sinks, None, None, None, None
