"""Next-token loss without materialising full [tokens, vocab] fp32 logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(h_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor):
    logits = F.linear(h_NH, weight_VH).float()
    return F.cross_entropy(logits, labels_N, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(
    hidden_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of counted tokens); labels of -100 are ignored.

    Each chunk's logits are recomputed in backward (activation checkpointing), so only one
    chunk of ``[chunk, V]`` logits exists at a time.
    """
    total = hidden_NH.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_NH.shape[0], chunk):
        h, y = hidden_NH[start : start + chunk], labels_N[start : start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, weight_VH, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight_VH, y)
    return total, (labels_N != -100).sum()
