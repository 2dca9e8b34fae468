"""Next-token loss without materialising full [tokens, vocab] logits.

The LM head and cross-entropy run fused, chunk by chunk: each chunk's log-probabilities give its
loss and, while they are still in memory, the gradients to the hidden states and (when it
trains) to the head weight. Backward only scales those by the incoming scalar gradient, so no
logits are kept or recomputed. On CUDA a Triton kernel turns each chunk's logits into their
gradient in place (:mod:`moelab.kernels.cross_entropy`), so the peak is one chunk of logits in
the compute dtype; elsewhere the chunk goes through fp32 log-probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.kernels.cross_entropy import softmax_xent_grad_

# Target bytes of logits per chunk: 2^28 (256 MiB), i.e. 441 tokens of fp32 log-probabilities
# at a 152k vocabulary, or 882 of bf16 logits on the in-place kernel.
_CHUNK_BYTES = 2**28
# the label of a token no loss is taken on (the next token starts another document)
IGNORE_LABEL = -100


def _chunk_rows(vocab: int, bytes_per_logit: int) -> int:
    return max(64, _CHUNK_BYTES // (bytes_per_logit * vocab))


def _in_place_kernel(hidden_NH: torch.Tensor) -> bool:
    return hidden_NH.is_cuda


def _loss_and_grads(hidden_NH, weight_VH, labels_N, chunk: int, need_h: bool, need_w: bool):
    """(summed loss, d/d hidden, d/d weight in fp32); the gradients are None unless needed."""
    total = torch.zeros((), device=hidden_NH.device, dtype=torch.float32)
    grad_h = torch.empty_like(hidden_NH) if need_h else None
    grad_w = torch.zeros(weight_VH.shape, device=weight_VH.device) if need_w else None
    for start in range(0, hidden_NH.shape[0], chunk):
        h, y = hidden_NH[start : start + chunk], labels_N[start : start + chunk]
        valid = y != IGNORE_LABEL
        logits = F.linear(h, weight_VH)
        # d(sum of losses)/d logits = softmax - one_hot; the ignored rows are masked on the
        # [chunk, H] side instead of the [chunk, V] one
        if _in_place_kernel(hidden_NH):
            total += softmax_xent_grad_(logits, y).sum()
            grad_logits = logits
        else:
            # fp32 log-probabilities straight from the logits: three passes over [chunk, V]
            # (this, exp in place, the cast of the gradient)
            logp = F.log_softmax(logits, dim=-1, dtype=torch.float32)
            del logits
            y_safe = torch.where(valid, y, 0)
            total -= (logp.gather(1, y_safe[:, None])[:, 0] * valid).sum()
            if not (need_h or need_w):
                continue
            probs = logp.exp_()
            probs.scatter_add_(1, y_safe[:, None], torch.full_like(probs[:, :1], -1.0))
            grad_logits = probs.to(hidden_NH.dtype)
            del logp, probs
        if not (need_h or need_w):
            continue
        keep = valid[:, None].to(hidden_NH.dtype)
        if need_h:
            rows_h = grad_h[start : start + chunk]
            torch.mm(grad_logits, weight_VH, out=rows_h)
            rows_h.mul_(keep)
        if need_w:
            grad_w.addmm_(grad_logits.t().float(), (h * keep).float())
    return total, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, labels_N, chunk):
        need_h, need_w = ctx.needs_input_grad[:2]
        total, grad_h, grad_w = _loss_and_grads(
            hidden_NH, weight_VH, labels_N, chunk, need_h, need_w
        )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight_VH.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None


def chunked_cross_entropy(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_N: torch.Tensor,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses in fp32, number of counted tokens); labels of -100 are ignored.

    ``chunk`` rows of logits exist at a time (default: about 256 MiB of them).
    """
    if hidden_NH.shape[0] != labels_N.shape[0]:
        raise ValueError(
            f"hidden states have {hidden_NH.shape[0]} rows but labels {labels_N.shape[0]}"
        )
    bytes_per_logit = hidden_NH.element_size() if _in_place_kernel(hidden_NH) else 4
    rows = chunk or _chunk_rows(weight_VH.shape[0], bytes_per_logit)
    count = (labels_N != IGNORE_LABEL).sum()
    if torch.is_grad_enabled() and (hidden_NH.requires_grad or weight_VH.requires_grad):
        return _LinearCrossEntropy.apply(hidden_NH, weight_VH, labels_N, rows), count
    return _loss_and_grads(hidden_NH, weight_VH, labels_N, rows, False, False)[0], count
