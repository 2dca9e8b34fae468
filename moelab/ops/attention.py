"""Causal grouped-query attention over formed q, k, v.

Shape suffixes: see :mod:`moelab.ops`, plus N query heads, M key/value heads, D head width.
``impl="sdpa"`` runs ``scaled_dot_product_attention``; ``impl="eager"`` spells the math out
the way the reference implementations' eager path does (scores in the compute dtype, softmax in
fp32), for bit-level parity checks. Packed sequences: ``document_ids`` restricts attention to
the query's own document; a sliding window of W keeps keys ``j > i - W``.

Sinks (GPT-OSS): one learned logit per query head joins the softmax denominator and carries no
value, so a row's weights sum to less than 1. The SDPA path adds them as an extra key of zeros
whose score is the sink, through an additive mask; the eager path follows the reference (scores,
sink column, max subtraction and softmax all in the compute dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_IMPLS = ("sdpa", "eager")


def attention_mask(
    seq_len: int,
    device: torch.device,
    document_ids_BS: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean ``[B or 1, 1, S, S]`` mask, True where query i may attend key j."""
    i = torch.arange(seq_len, device=device)
    allowed = i[None, :] <= i[:, None]
    if sliding_window is not None:
        allowed = allowed & (i[None, :] > i[:, None] - sliding_window)
    allowed = allowed[None, None]
    if document_ids_BS is not None:
        same_doc = document_ids_BS[:, None, :, None] == document_ids_BS[:, None, None, :]
        allowed = allowed & same_doc
    return allowed


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
    seq_len = q_BNSD.shape[2]
    plain_causal = document_ids_BS is None and sliding_window is None and sinks_N is None
    mask = (
        None
        if plain_causal
        else attention_mask(seq_len, q_BNSD.device, document_ids_BS, sliding_window)
    )
    if impl == "sdpa" and sinks_N is not None:
        return _sdpa_with_sinks(q_BNSD, k_BMSD, v_BMSD, mask, sinks_N, scale)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(
            q_BNSD,
            k_BMSD,
            v_BMSD,
            attn_mask=mask,
            is_causal=plain_causal,
            scale=scale,
            enable_gqa=n_heads != m_heads,
        )
    if impl != "eager":
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    if mask is None:
        mask = attention_mask(seq_len, q_BNSD.device)
    rep = n_heads // m_heads
    k_BNSD = k_BMSD.repeat_interleave(rep, dim=1)
    v_BNSD = v_BMSD.repeat_interleave(rep, dim=1)
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


def _sdpa_with_sinks(q_BNSD, k_BMSD, v_BMSD, mask, sinks_N, scale) -> torch.Tensor:
    b, m_heads, _, d = k_BMSD.shape
    zeros = k_BMSD.new_zeros(b, m_heads, 1, d)
    k_ext, v_ext = torch.cat([k_BMSD, zeros], dim=2), torch.cat([v_BMSD, zeros], dim=2)
    bias = torch.zeros(mask.shape, dtype=q_BNSD.dtype, device=q_BNSD.device)
    bias = bias.masked_fill(~mask, float("-inf"))
    shape = (*torch.broadcast_shapes(bias.shape[:2], (1, q_BNSD.shape[1])), *bias.shape[2:])
    sink_col = sinks_N.to(q_BNSD.dtype).reshape(1, -1, 1, 1).expand(*shape[:3], 1)
    bias = torch.cat([bias.expand(shape), sink_col], dim=-1)
    return F.scaled_dot_product_attention(
        q_BNSD,
        k_ext,
        v_ext,
        attn_mask=bias,
        scale=scale,
        enable_gqa=q_BNSD.shape[1] != m_heads,
    )
