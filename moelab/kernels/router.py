"""Top-k softmax routing as one Triton pass each way, with its autograd.

torch spells the softmax router as a cast, a softmax, a top-k (two kernels), a sum and a
division, and its backward as twice as many; each is a launch the host issues while the GPU
waits for the experts' first product (BENCHMARKS.md, run 26). Here one program takes a block
of tokens' logits: it picks the k largest logits per token (the lowest expert id among equal
logits, as torch's top-k on CUDA), then the weights in fp32 from ``e_j = exp(l_j - max l)``:

- ``renormalize``: ``w_j = e_j / sum over the k picked e``, the softmax over the picked
  logits: Qwen3-MoE's softmax, top-k and renormalisation, and GPT-OSS's top-k then softmax;
- else ``w_j = e_j / sum over all E``, the full softmax's probability of each pick.

Backward writes the logits' gradient in their dtype: ``w_j (g_j - sum_i w_i g_i)`` at the picks
and zero elsewhere when renormalised; ``p (g - sum_i w_i g_i)`` over all E (g zero off the
picks) with the probabilities p recomputed from the logits otherwise; a backward that builds a
graph (``create_graph=True``, e.g. a gradient penalty) takes torch's ops instead. Used by
:func:`moelab.ops.routing.route` on CUDA; on CPU under ``TRITON_INTERPRET`` for tests.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moelab.kernels import launch as kl

_BLOCK_ELEMENTS = 4096  # logits per program
MAX_EXPERTS, MAX_TOP_K = 1024, 32  # beyond these the torch path runs


@triton.jit
def _row_logits(logits_ptr, t, e, rows, num_experts, stride_t):
    """A block of tokens' logits in fp32; -inf past the last expert, 0 past the last token."""
    mask = (t < rows)[:, None] & (e < num_experts)[None, :]
    l = tl.load(logits_ptr + t.to(tl.int64)[:, None] * stride_t + e[None, :], mask=mask, other=0.0)
    return tl.where((e < num_experts)[None, :], l.to(tl.float32), float("-inf"))


@triton.jit
def _topk_route_fwd_kernel(
    logits_ptr, weights_ptr, experts_ptr, rows, num_experts, stride_t,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    ks = tl.arange(0, BLOCK_K)
    l = _row_logits(logits_ptr, t, e, rows, num_experts, stride_t)
    free = (e[None, :] < num_experts) & (t[:, None] >= 0)  # [BLOCK_T, BLOCK_E]
    picked_l = tl.full((BLOCK_T, BLOCK_K), float("-inf"), tl.float32)
    picked_e = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(free, l, float("-inf")), axis=1)
        # the lowest free id holding the maximum (NaN logits: clamped to a valid id)
        tie = free & (l == best[:, None])
        pick = tl.minimum(tl.min(tl.where(tie, e[None, :], BLOCK_E), axis=1), num_experts - 1)
        free = free & (e[None, :] != pick[:, None])
        picked_l = tl.where(ks[None, :] == j, best[:, None], picked_l)
        picked_e = tl.where(ks[None, :] == j, pick[:, None], picked_e)
    top = tl.max(l, axis=1)  # the first pick
    picked = tl.exp(picked_l - top[:, None])  # 0 past TOP_K
    if RENORMALIZE:
        total = tl.sum(picked, axis=1)
    else:
        total = tl.sum(tl.exp(l - top[:, None]), axis=1)
    w = picked / total[:, None]
    offs = t.to(tl.int64)[:, None] * TOP_K + ks[None, :]
    mask = (t < rows)[:, None] & (ks < TOP_K)[None, :]
    tl.store(weights_ptr + offs, w, mask=mask)
    tl.store(experts_ptr + offs, picked_e.to(tl.int64), mask=mask)


@triton.jit
def _topk_route_bwd_kernel(
    dw_ptr, weights_ptr, experts_ptr, logits_ptr, dlogits_ptr, rows, num_experts, stride_t,
    stride_dt, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    ks = tl.arange(0, BLOCK_K)
    offs = t.to(tl.int64)[:, None] * TOP_K + ks[None, :]
    mask_k = (t < rows)[:, None] & (ks < TOP_K)[None, :]
    g = tl.load(dw_ptr + offs, mask=mask_k, other=0.0).to(tl.float32)
    w = tl.load(weights_ptr + offs, mask=mask_k, other=0.0)
    picked_e = tl.load(experts_ptr + offs, mask=mask_k, other=-1).to(tl.int32)
    dot = tl.sum(w * g, axis=1)
    # g and w of the picks at their experts' columns, 0 elsewhere
    g_E = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    w_E = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        here = e[None, :] == tl.sum(tl.where(ks[None, :] == j, picked_e, 0), axis=1)[:, None]
        g_E = tl.where(here, tl.sum(tl.where(ks[None, :] == j, g, 0.0), axis=1)[:, None], g_E)
        w_E = tl.where(here, tl.sum(tl.where(ks[None, :] == j, w, 0.0), axis=1)[:, None], w_E)
    if RENORMALIZE:
        d = w_E * (g_E - dot[:, None])
    else:  # every probability moves: p (g - dot), the probabilities recomputed
        l = _row_logits(logits_ptr, t, e, rows, num_experts, stride_t)
        p = tl.exp(l - tl.max(l, axis=1)[:, None])
        d = p / tl.sum(p, axis=1)[:, None] * (g_E - dot[:, None])
    mask = (t < rows)[:, None] & (e < num_experts)[None, :]
    out = dlogits_ptr + t.to(tl.int64)[:, None] * stride_dt + e[None, :]
    tl.store(out, d.to(dlogits_ptr.dtype.element_ty), mask=mask)


@functools.cache  # per call otherwise: a few microseconds of host time in the step's prefix
def _blocks(num_experts: int, top_k: int) -> dict:
    block_e = kl.next_power_of_2(num_experts)
    return dict(
        BLOCK_T=max(1, _BLOCK_ELEMENTS // block_e),
        BLOCK_E=block_e,
        BLOCK_K=kl.next_power_of_2(top_k),
    )


class _TopKRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, top_k, renormalize):
        rows, num_experts = logits_TE.shape
        weights_TK = logits_TE.new_empty(rows, top_k, dtype=torch.float32)
        experts_TK = logits_TE.new_empty(rows, top_k, dtype=torch.int64)
        sizes = dict(TOP_K=top_k, RENORMALIZE=renormalize, **_blocks(num_experts, top_k))
        if rows:
            grid = (kl.cdiv(rows, sizes["BLOCK_T"]),)
            args = (logits_TE, weights_TK, experts_TK, rows, num_experts, logits_TE.stride(0))
            kl.launch(_topk_route_fwd_kernel, grid, args, sizes, ("route", *sizes.values()))
        ctx.mark_non_differentiable(experts_TK)
        ctx.save_for_backward(logits_TE, weights_TK, experts_TK)
        ctx.sizes = sizes
        return weights_TK, experts_TK

    @staticmethod
    def backward(ctx, dw_TK, _):
        logits_TE, weights_TK, experts_TK = ctx.saved_tensors
        if torch.is_grad_enabled():  # a double backward (create_graph): torch's ops, which have one
            return _differentiable_grad(logits_TE, experts_TK, dw_TK, ctx.sizes["RENORMALIZE"])
        rows, num_experts = logits_TE.shape
        dlogits_TE = logits_TE.new_empty(logits_TE.shape)
        if rows:
            sizes = ctx.sizes
            grid = (kl.cdiv(rows, sizes["BLOCK_T"]),)
            # fmt: off
            args = (dw_TK.contiguous(), weights_TK, experts_TK, logits_TE, dlogits_TE, rows,
                    num_experts, logits_TE.stride(0), dlogits_TE.stride(0))
            # fmt: on
            kl.launch(_topk_route_bwd_kernel, grid, args, sizes, ("route_bwd", *sizes.values()))
        return dlogits_TE, None, None


def _differentiable_grad(logits_TE, experts_TK, dw_TK, renormalize: bool) -> tuple:
    """The logits' gradient by torch's ops on the kernel's picks, itself differentiable (in the
    logits and ``dw_TK``), for backward passes that build a graph (``create_graph=True``)."""
    with torch.enable_grad():
        logits = logits_TE if logits_TE.requires_grad else logits_TE.detach().requires_grad_()
        if renormalize:
            weights_TK = logits.gather(1, experts_TK).float().softmax(dim=-1)
        else:
            weights_TK = logits.float().softmax(dim=-1).gather(1, experts_TK)
        (dlogits_TE,) = torch.autograd.grad(weights_TK, logits, dw_TK, create_graph=True)
    return dlogits_TE, None, None


def runs(logits_TE: torch.Tensor, top_k: int) -> bool:
    """Whether :func:`topk_route` runs for these logits on the GPU: a CUDA tensor in half
    precision or fp32 with unit stride over experts, E <= 1024 and k <= 32 (on CPU, tests call
    it under ``TRITON_INTERPRET=1``)."""
    return (
        logits_TE.is_cuda
        and logits_TE.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and logits_TE.stride(-1) == 1
        and logits_TE.shape[-1] <= MAX_EXPERTS
        and top_k <= MAX_TOP_K
    )


def topk_route(
    logits_TE: torch.Tensor, top_k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, K] fp32, experts [T, K] int64)`` of the k largest logits per token, picks
    in descending order (see the module docstring); differentiable in the logits. Callers check
    :func:`runs` and the arguments (:func:`moelab.ops.routing.route` does)."""
    return _TopKRoute.apply(logits_TE, top_k, bool(renormalize))
