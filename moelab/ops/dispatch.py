"""Dispatch and combine: tokens to expert-sorted rows and back.

Shape suffixes: see :mod:`moelab.ops`. Everything here runs on device with integer ops or
fixed-order reductions: no host synchronisation, same bits on every run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DispatchPlan:
    """Where each routed (token, slot) pair sits among the expert-sorted rows.

    Attributes:
        order_N: flat ``t * K + j`` index of each sorted row (stable sort by expert id).
        token_N: source token of each sorted row.
        expert_N: expert id of each sorted row (non-decreasing).
        offs_E: int32 end of each expert's rows (``offs_E[-1] == N``), as grouped GEMMs take.
        slot_TK: sorted-row position of each (token, slot): the inverse of ``order_N``.
    """

    order_N: torch.Tensor
    token_N: torch.Tensor
    expert_N: torch.Tensor
    offs_E: torch.Tensor
    slot_TK: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields in order, e.g. for ``save_for_backward``; ``DispatchPlan(*t)`` rebuilds."""
        return tuple(getattr(self, f.name) for f in fields(self))


def dispatch(experts_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Sort the T*K routed rows by expert; see :class:`DispatchPlan`."""
    num_tokens, top_k = experts_TK.shape
    flat_N = experts_TK.reshape(-1)
    expert_N, order_N = torch.sort(flat_N, stable=True)
    # each expert's end among the sorted ids (few launches: the block's host issues every op)
    ids_E = torch.arange(num_experts, device=flat_N.device, dtype=flat_N.dtype)
    offs_E = torch.searchsorted(expert_N, ids_E, right=True, out_int32=True)
    arange_N = torch.arange(flat_N.numel(), device=flat_N.device)
    slot_N = torch.empty_like(order_N).scatter_(0, order_N, arange_N)
    return DispatchPlan(
        order_N=order_N,
        token_N=order_N.div(top_k, rounding_mode="floor"),
        expert_N=expert_N,
        offs_E=offs_E,
        slot_TK=slot_N.view(num_tokens, top_k),
    )


def combine(
    rows_NH: torch.Tensor, plan: DispatchPlan, weights_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * rows[slot[t, j]]``, summed in slot order with fp32 accumulation.

    Without weights this is the plain gather-sum that returns dX to token order.
    NOTE: the weights are rounded to the rows' dtype first (as the reference models do in bf16);
    the sum itself accumulates in fp32 and rounds once.
    """
    per_row = None if weights_TK is None else weights_TK.to(rows_NH.dtype)
    return F.embedding_bag(plan.slot_TK, rows_NH, per_sample_weights=per_row, mode="sum")


def scatter_to_slots(values_N: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Move one value per sorted row back to its ``[T, K]`` (token, slot) position."""
    return values_N.index_select(0, plan.slot_TK.reshape(-1)).view(plan.slot_TK.shape)
