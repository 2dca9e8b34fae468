"""Softmax cross-entropy gradient in place over a chunk of logits (the fused LM-head loss).

One program per row streams the row twice: an online max / sum-of-exponentials for the row's
log-sum-exp, then ``softmax - one_hot`` written over the logits in their own dtype. Three passes
of the logits' width in all, where the torch spelling makes about seven passes, most of them
over an fp32 copy. Used by :mod:`moelab.train.loss` on CUDA; on CPU under ``TRITON_INTERPRET``
for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels import launch as kl

_BLOCK_V = 4096


@triton.jit
def _softmax_xent_grad_kernel(
    logits_ptr, stride_row, labels_ptr, loss_ptr, vocab, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    valid = (label >= 0) & (label < vocab)
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(x - new_max), axis=0
        )
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < vocab, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(valid & (cols == label), 1.0, 0.0)
        tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < vocab)


def softmax_xent_grad_(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    """Per-row losses ``logsumexp - logit[label]`` (fp32, 0 where the label is out of range,
    e.g. -100); ``logits_NV`` is overwritten with ``softmax - one_hot``."""
    rows, vocab = logits_NV.shape
    if logits_NV.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    loss_N = torch.empty(rows, device=logits_NV.device, dtype=torch.float32)
    if rows:
        block_v = min(_BLOCK_V, kl.next_power_of_2(vocab))
        kl.launch(
            _softmax_xent_grad_kernel, (rows,),
            (logits_NV, logits_NV.stride(0), labels_N, loss_N, vocab),
            dict(BLOCK_V=block_v, num_warps=8), ("xent", block_v),
        )  # fmt: skip
    return loss_N
