"""``grouped_mm``: the expert MLP on torch's grouped GEMM, with a hand-written backward.

Forward, on the expert-sorted rows (dispatch in :mod:`moelab.ops.dispatch`)::

    xs = x[token]                                    gathered copy, dropped after the up GEMMs
    h  = xs W1^T (+ s (xs A1^T) B1^T)                saved: the pre-activation
    a  = act(h + b1)                                 bias added in place, in row chunks
    y  = a W2^T (+ s (a A2^T) B2^T)
    out[t] = sum_j w[t, j] y[slot[t, j]]             fp32 k-sum, fixed order
             (+ sum_j w[t, j] b2[e_tj])              one small [T, E] x [E, H] product

Backward, with upstream ``dout``::

    g  = dout[token] W2 (+ s (dout B2) A2)           dY W2 before the routing weight
    dw = <g, a> (+ <dout, b2[e]>)                    router gradient without keeping y
    dh = act'(h, w g);  dxs = dh W1 (+ s (dh B1) A1);  dx[t] = sum_j dxs[slot[t, j]]
    LoRA dA/dB and, for weights that require grad, dW as varlen-K grouped products.

Saved for backward: x, h ``[N, 2I]`` (bias included), a ``[N, I]``, the rank-R products
``xs A1^T`` and ``a A2^T``, the routing weights and the int dispatch plan; ``xs`` is gathered
again when a weight gradient needs it. Weights enter the
GEMMs as transposed views (never copied per step) and nothing synchronises with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.kernels.first_order import first_order_backward
from moelab.kernels.problem import ExpertProblem
from moelab.ops.activations import activation_backward, activation_forward
from moelab.ops.dispatch import DispatchPlan, combine, dispatch, scatter_to_slots
from moelab.ops.lora import ExpertLoRA

NAME = "grouped_mm"
_MAX_GROUPS = 1023
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The gathered expert bias is added in row chunks of about this many elements.
CHUNK_ELEMENTS = 1 << 23


def saved_bytes_per_token(problem: ExpertProblem, itemsize: int) -> int:
    """Activation bytes kept for backward per token (x, h, act, z1, z2, routing and plan ints)."""
    k, z = problem.top_k, problem.lora_z_width
    return itemsize * (problem.hidden + k * (3 * problem.inter + z)) + k * (4 + 5 * 8)


def _grouped_mm_op():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def unsupported_reason(problem: ExpertProblem) -> str | None:
    if problem.recompute:
        return "grouped_mm keeps the pre-activation (recompute is triton's)"
    return grouped_products_reason(problem)


def grouped_products_reason(problem: ExpertProblem) -> str | None:
    """Why torch's grouped GEMM cannot run this problem's products (also triton's weight and
    LoRA gradients), or None."""
    if _grouped_mm_op() is None:
        return f"torch {torch.__version__} has no grouped_mm"
    if problem.accumulate != "fp32":
        return "grouped_mm sums the k expert outputs in fp32 only"
    if problem.dtype not in _DTYPES:
        return f"grouped_mm takes bf16, fp16 or fp32, not {problem.dtype}"
    if problem.num_experts > _MAX_GROUPS:
        return f"grouped_mm takes at most {_MAX_GROUPS} groups, got E={problem.num_experts}"
    itemsize = problem.dtype.itemsize
    dims = {"H": problem.hidden, "I": problem.inter}
    if problem.lora_rank:
        dims["r"] = problem.lora_rank
    if problem.lora_rank_max:
        dims["the larger r"] = problem.lora_rank_max
    for name, size in dims.items():
        if size * itemsize % 16:
            return (
                f"grouped_mm needs 16-byte strides: {name}={size} is not a multiple of "
                f"{16 // itemsize} in {problem.dtype}"
            )
    return None


def _gmm(a_MK: torch.Tensor, b_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Row-grouped product: rows of expert e times ``b_EKN[e]``."""
    return _grouped_mm_op()(a_MK, b_EKN, offs=offs_E)


def _gmm_wgrad(a_NP: torch.Tensor, b_NQ: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per-expert ``a_e^T b_e`` over each expert's rows, ``[E, P, Q]`` (K = rows, jagged)."""
    return _grouped_mm_op()(a_NP.t(), b_NQ, offs=offs_E)


def _project(
    x_NK: torch.Tensor,
    w_EOK: torch.Tensor,
    lora_a_ERK: torch.Tensor | None,
    lora_b_EOR: torch.Tensor | None,
    scale: float,
    offs_E: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x W^T (+ s (x A^T) B^T)`` per expert; also returns the rank-R product ``x A^T``."""
    y_NO = _gmm(x_NK, w_EOK.transpose(1, 2), offs_E)
    z_NR = None
    if lora_a_ERK is not None:
        z_NR = _gmm(x_NK, lora_a_ERK.transpose(1, 2), offs_E)
        y_NO.add_(_gmm(z_NR, lora_b_EOR.transpose(1, 2), offs_E), alpha=scale)
    return y_NO, z_NR


def _add_expert_bias_(h_NG: torch.Tensor, bias_EG: torch.Tensor, plan: DispatchPlan) -> None:
    """``h[n] += bias[expert[n]]`` in place, in row chunks so the gathered bias stays small."""
    rows = max(1, CHUNK_ELEMENTS // h_NG.shape[1])
    for start in range(0, h_NG.shape[0], rows):
        chunk = slice(start, start + rows)
        h_NG[chunk] += bias_EG.index_select(0, plan.expert_N[chunk])


def _dense_weights(weights_TK: torch.Tensor, experts_TK: torch.Tensor, num_experts: int):
    """``[T, E]`` fp32 routing weights (zero where not routed); rows hold no duplicate ids."""
    dense_TE = weights_TK.new_zeros(weights_TK.shape[0], num_experts)
    return dense_TE.scatter_(1, experts_TK, weights_TK)


def down_grads(
    need: tuple[bool, ...],
    s: float,
    plan: DispatchPlan,
    dout_TH: torch.Tensor,
    dout_NH: torch.Tensor | None,
    act_w_NI: torch.Tensor | None,
    u2_NR: torch.Tensor | None,
    z2_NR: torch.Tensor | None,
    w_N1: torch.Tensor | None,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    down_bias: torch.Tensor | None,
    num_experts: int,
    grads: list[torch.Tensor | None],
) -> None:
    """Gradients of the down projection's weights: dW2 (4), down bias (6), LoRA dA2 (9) and
    dB2 (10), with ``act_w = w * act`` so that dW2 = dY^T act = dout^T (w act)."""
    offs_E = plan.offs_E
    if need[9]:
        grads[9] = _gmm_wgrad(u2_NR, act_w_NI, offs_E).mul_(s)
    if need[10]:
        grads[10] = _gmm_wgrad(dout_NH, (z2_NR * w_N1).to(z2_NR.dtype), offs_E).mul_(s)
    if need[4]:
        grads[4] = _gmm_wgrad(dout_NH, act_w_NI, offs_E)
    if need[6]:
        dense_TE = _dense_weights(weights_TK, experts_TK, num_experts)
        grads[6] = (dense_TE.t() @ dout_TH.float()).to(down_bias.dtype)


def up_grads(
    need: tuple[bool, ...],
    s: float,
    plan: DispatchPlan,
    x_TH: torch.Tensor,
    dh_NG: torch.Tensor,
    u1_NR: torch.Tensor | None,
    z1_NR: torch.Tensor | None,
    grads: list[torch.Tensor | None],
) -> None:
    """Gradients of the up projection's weights: dW1 (3), gate_up bias (5), LoRA dA1 (7) and
    dB1 (8); x is gathered again only when dW1 or dA1 needs it."""
    offs_E = plan.offs_E
    if need[5]:
        # per-expert row sums as a product with ones: fp32 accumulation, fixed order
        grads[5] = _gmm_wgrad(dh_NG, dh_NG.new_ones(dh_NG.shape[0], 8), offs_E)[..., 0]
    if need[8]:
        grads[8] = _gmm_wgrad(dh_NG, z1_NR, offs_E).mul_(s)
    if need[3] or need[7]:
        xs_NH = x_TH.index_select(0, plan.token_N)
        if need[3]:
            grads[3] = _gmm_wgrad(dh_NG, xs_NH, offs_E)
        if need[7]:
            grads[7] = _gmm_wgrad(u1_NR, xs_NH, offs_E).mul_(s)


def router_grad(
    g_dot_act_N: torch.Tensor,
    plan: DispatchPlan,
    dout_TH: torch.Tensor,
    down_bias: torch.Tensor | None,
    experts_TK: torch.Tensor,
) -> torch.Tensor:
    """dL/dw[t, j] = <g, act> + <dout_t, b2[e_tj]>, back in (token, slot) order."""
    dw_TK = scatter_to_slots(g_dot_act_N, plan)
    if down_bias is not None:
        dw_TK += (dout_TH.float() @ down_bias.float().t()).gather(1, experts_TK)
    return dw_TK


class _GroupedExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x_TH,
        weights_TK,
        experts_TK,
        gate_up,
        down,
        gate_up_bias,
        down_bias,
        a1,
        b1,
        a2,
        b2,
        scale,
        activation,
    ):
        plan = dispatch(experts_TK, gate_up.shape[0])
        xs_NH = x_TH.index_select(0, plan.token_N)
        h_NG, z1_NR = _project(xs_NH, gate_up, a1, b1, scale, plan.offs_E)
        del xs_NH
        if gate_up_bias is not None:
            _add_expert_bias_(h_NG, gate_up_bias, plan)
        act_NI = activation_forward(h_NG, activation)
        y_NH, z2_NR = _project(act_NI, down, a2, b2, scale, plan.offs_E)
        out_TH = combine(y_NH, plan, weights_TK)
        if down_bias is not None:
            # sum_j w_tj b_(e_tj) as one small dense product instead of an [N, H] bias gather
            dense_TE = _dense_weights(weights_TK, experts_TK, gate_up.shape[0])
            out_TH = (out_TH.float() + dense_TE @ down_bias.float()).to(x_TH.dtype)
        # fmt: off
        ctx.save_for_backward(x_TH, weights_TK, experts_TK, gate_up, down, down_bias,
                              a1, b1, a2, b2, h_NG, act_NI, z1_NR, z2_NR, *plan.tensors())
        # fmt: on
        ctx.scale, ctx.activation = scale, activation
        return out_TH

    @staticmethod
    @first_order_backward("the grouped_mm expert MLP")
    def backward(ctx, dout_TH):
        # fmt: off
        (x_TH, weights_TK, experts_TK, gate_up, down, down_bias,
         a1, b1, a2, b2, h_NG, act_NI, z1_NR, z2_NR, *plan_tensors) = ctx.saved_tensors
        # fmt: on
        plan = DispatchPlan(*plan_tensors)
        offs_E = plan.offs_E
        need, s, activation = ctx.needs_input_grad, ctx.scale, ctx.activation
        grads = [None] * 13
        dout_TH = dout_TH.contiguous()
        dout_NH = dout_TH.index_select(0, plan.token_N)
        w_N1 = weights_TK.reshape(-1).index_select(0, plan.order_N)[:, None]

        # down projection; g = dY W2 before the routing weight, so dw = <g, act> needs no y
        g_NI = _gmm(dout_NH, down, offs_E)
        if a2 is not None:
            u2_NR = _gmm(dout_NH, b2, offs_E)
            g_NI.add_(_gmm(u2_NR, a2, offs_E), alpha=s)
        if need[1]:
            g_dot_act = (g_NI * act_NI).sum(-1, dtype=torch.float32)
            grads[1] = router_grad(g_dot_act, plan, dout_TH, down_bias, experts_TK)
        act_w_NI = (act_NI * w_N1).to(act_NI.dtype)
        down_grads(
            need,
            s,
            plan,
            dout_TH,
            dout_NH,
            act_w_NI,
            u2_NR if a2 is not None else None,
            z2_NR,
            w_N1,
            weights_TK,
            experts_TK,
            down_bias,
            gate_up.shape[0],
            grads,
        )
        del act_w_NI, dout_NH

        # activation, then the up projection
        dh_NG = activation_backward(h_NG, g_NI.mul_(w_N1), activation)
        del g_NI
        u1_NR = _gmm(dh_NG, b1, offs_E) if a1 is not None else None
        up_grads(need, s, plan, x_TH, dh_NG, u1_NR, z1_NR, grads)
        if need[0]:
            dxs_NH = _gmm(dh_NG, gate_up, offs_E)
            if a1 is not None:
                dxs_NH.add_(_gmm(u1_NR, a1, offs_E), alpha=s)
            grads[0] = combine(dxs_NH, plan)
        return tuple(grads)


def apply_function(
    function: type[torch.autograd.Function],
    x_TH: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    lora: ExpertLoRA | None,
    *options: object,
) -> torch.Tensor:
    """``function.apply`` in the argument order this module's and the triton backend's autograd
    functions share, LoRA unpacked into its four factors and scale; backend-specific
    ``options`` last."""
    a1, b1, a2, b2 = lora.tensors() if lora is not None else (None,) * 4
    scale = float(lora.scale) if lora is not None else 0.0
    # fmt: off
    return function.apply(x_TH, weights_TK, experts_TK, gate_up, down, gate_up_bias, down_bias,
                          a1, b1, a2, b2, scale, activation, *options)
    # fmt: on


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
    # fmt: off
    return apply_function(_GroupedExperts, x_TH, weights_TK, experts_TK, gate_up_EGH, down_EHI,
                          gate_up_bias_EG, down_bias_EH, activation, lora)
    # fmt: on
