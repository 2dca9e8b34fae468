"""``native_torch``: a loop over the experts that received tokens, differentiated by autograd.

The readable reference and the last fallback: runs on any device and any float dtype (float64
included), at the cost of one host synchronisation to learn which experts are hit. Outputs are
accumulated in fp32 (fp64 for fp64 inputs; or in x's dtype with ``accumulate="input"``, the
reference models' eager numerics) in ascending expert order, one ``index_add`` per expert; a
token meets each expert at most once, so every add is free of duplicate indices and the result
is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.kernels.problem import ExpertProblem
from moelab.ops.activations import activation_forward
from moelab.ops.lora import ExpertLoRA

NAME = "native_torch"


def unsupported_reason(problem: ExpertProblem) -> str | None:
    if problem.recompute:
        return "native_torch keeps what autograd saves (recompute is triton's)"
    return None


def _expert(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else t[e]


def _project(
    x_MK: torch.Tensor,
    w_NK: torch.Tensor,
    bias_N: torch.Tensor | None,
    lora_a_RK: torch.Tensor | None,
    lora_b_NR: torch.Tensor | None,
    scale: float,
    reference: bool = False,
) -> torch.Tensor:
    if reference and bias_N is not None:  # the reference models round x W^T, then add b
        y = F.linear(x_MK, w_NK) + bias_N
    else:
        y = F.linear(x_MK, w_NK, bias_N)
    if lora_a_RK is not None:
        y = y + scale * F.linear(F.linear(x_MK, lora_a_RK), lora_b_NR)
    return y


def experts_mlp(
    x_TH: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    gate_up_EGH: torch.Tensor,
    down_EHI: torch.Tensor,
    gate_up_bias_EG: torch.Tensor | None,
    down_bias_EH: torch.Tensor | None,
    activation: str,
    lora: ExpertLoRA | None,
    accumulate: str = "fp32",
) -> torch.Tensor:
    reference = accumulate == "input"
    acc_dtype = x_TH.dtype if reference else torch.promote_types(x_TH.dtype, torch.float32)
    out_TH = x_TH.new_zeros(x_TH.shape, dtype=acc_dtype)
    scale = lora.scale if lora is not None else 0.0
    lora_tensors = lora.tensors() if lora is not None else (None,) * 4
    for e in torch.unique(experts_TK).tolist():
        token_M, slot_M = (experts_TK == e).nonzero(as_tuple=True)
        a1, b1, a2, b2 = (_expert(t, e) for t in lora_tensors)
        h_MG = _project(
            x_TH[token_M], gate_up_EGH[e], _expert(gate_up_bias_EG, e), a1, b1, scale, reference
        )
        act_MI = activation_forward(h_MG, activation)
        y_MH = _project(act_MI, down_EHI[e], _expert(down_bias_EH, e), a2, b2, scale, reference)
        w_M1 = weights_TK[token_M, slot_M, None]
        if accumulate == "input":  # the reference models' eager path, rounding for rounding
            contrib = (y_MH * w_M1).to(acc_dtype)
        else:
            contrib = y_MH.to(acc_dtype) * w_M1.to(acc_dtype)
        out_TH = out_TH.index_add(0, token_M, contrib)
    if not out_TH.numel():  # no tokens: an empty output still in the graph (zero gradients)
        inputs = (x_TH, weights_TK, gate_up_EGH, down_EHI, gate_up_bias_EG, down_bias_EH)
        for t in (*inputs, *lora_tensors):
            if t is not None:
                out_TH = out_TH + t[:0].sum().to(acc_dtype)
    return out_TH.to(x_TH.dtype)
