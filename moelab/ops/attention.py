"""Causal grouped-query attention over formed q, k, v.

Shape suffixes: see :mod:`moelab.ops`, plus N query heads, M key/value heads, D head width.
``impl="sdpa"`` runs ``scaled_dot_product_attention``; ``impl="eager"`` spells the math out
the way the reference implementations' eager path does (scores in the compute dtype, softmax in
fp32), for bit-level parity checks. Packed sequences: ``document_ids`` restricts attention to
the query's own document; a sliding window of W keeps keys ``j > i - W``.
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
    impl: str = "sdpa",
) -> torch.Tensor:
    """Causal attention, ``[B, N, S, D]``; N must be a multiple of M (GQA)."""
    n_heads, m_heads = q_BNSD.shape[1], k_BMSD.shape[1]
    if n_heads % m_heads:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of kv heads ({m_heads})")
    seq_len = q_BNSD.shape[2]
    plain_causal = document_ids_BS is None and sliding_window is None
    mask = (
        None
        if plain_causal
        else attention_mask(seq_len, q_BNSD.device, document_ids_BS, sliding_window)
    )
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
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_BNSD.dtype)
    return torch.matmul(probs, v_BNSD)
