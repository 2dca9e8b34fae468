"""Gradients of the expert weights and the LoRA factors: per-expert reductions over each
expert's sorted rows (``sum_{n of e} q[n]^T p[n]``), by ``tk._expert_grad_kernel`` or, for the
weights, torch's grouped GEMM over a gathered copy where that measured faster.

Gradient slots follow the autograd function of :mod:`moelab.kernels.triton`: 3 dW1, 4 dW2,
7-10 the LoRA factors A1, B1, A2, B2.
"""

from __future__ import annotations

import functools

import torch
import triton

from moelab.kernels import grouped_mm as gmm
from moelab.kernels import launch as kl
from moelab.kernels import triton_kernels as tk
from moelab.kernels import triton_tuning as tuning
from moelab.kernels.measured import MeasuredChoices
from moelab.ops.dispatch import DispatchPlan

# (BLOCK_M, BLOCK_D, warps, stages) of the rank-r weight gradients: memory-bound reductions over
# each expert's rows, so deep pipelines over wide row blocks; p's columns (the rank) in one block
_RANK_GRAD_CONFIGS = ((64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3),
                      (64, 128, 4, 4), (128, 128, 4, 4))  # fmt: skip
_RANK_GRAD_FIXED = dict(BLOCK_M=32, BLOCK_D=32, num_warps=4, num_stages=3)
# (BLOCK_M, BLOCK_D, BLOCK_P, warps, stages) of the expert weights' gradients: GEMMs whose
# reduction runs over an expert's rows (a few hundred at 8192 tokens), so wide output tiles
_WIDE_GRAD_CONFIGS = ((64, 128, 128, 8, 3), (128, 128, 128, 8, 3), (64, 128, 256, 8, 3),
                      (128, 128, 256, 8, 3), (64, 256, 128, 8, 3), (32, 128, 128, 4, 4),
                      (64, 64, 128, 4, 4))  # fmt: skip
_WIDE_GRAD_FIXED = dict(BLOCK_M=32, BLOCK_D=32, BLOCK_P=32, num_warps=4, num_stages=3)
_ONE_BLOCK_MAX = 128  # p's columns up to this in one block (LoRA ranks)


@functools.cache
def _expert_grad_kernel(wide: bool, adds: bool = False):
    """The per-expert gradient kernel autotuned over ``_WIDE_GRAD_CONFIGS`` (``wide``: p's
    columns in tuned blocks) or ``_RANK_GRAD_CONFIGS`` (one block, sized by the caller);
    ``adds``: into ``out``'s values, each candidate's addition undone after it is timed."""
    if wide:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_P": bp}, num_warps=w, num_stages=st)
            for bm, bd, bp, w, st in _WIDE_GRAD_CONFIGS
        ]
    else:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)
            for bm, bd, warps, stages in _RANK_GRAD_CONFIGS
        ]
    key = ["d_dim", "p_dim", "GATHER", "ROW_SCALE", "ADD_OUT"]
    restore = ["out_ptr"] if adds else None
    # fmt: off
    return triton.autotune(configs, key=key, do_bench=tuning.bench,
                           restore_value=restore)(tk._expert_grad_kernel)
    # fmt: on


def expert_grad(
    q_MD: torch.Tensor,
    p_NP: torch.Tensor,
    offs_E: torch.Tensor,
    out: torch.Tensor,
    out_strides: tuple[int, int, int],
    scale: float,
    *,
    gather: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    add: bool = False,
) -> torch.Tensor:
    """``out[e, d, j] = s * sum_{n of e} q[n, d] p[n, j]`` written through ``out_strides``
    (expert, d, j), so LoRA's A ``[E, r, D]`` and B ``[E, D, r]`` and the weights' ``[E, N, K]``
    all come out in place; ``q`` rows through ``gather`` (token order), ``p`` rows times
    ``row_scale``; ``add``: ``out +=`` instead, rounded once."""
    d_dim, p_dim = q_MD.shape[1], p_NP.shape[1]
    args = (
        q_MD,
        gather if gather is not None else offs_E,
        q_MD.stride(0),
        q_MD.stride(1),
        p_NP,
        p_NP.stride(0),
        p_NP.stride(1),
        row_scale if row_scale is not None else p_NP,
        offs_E,
        out,
        *out_strides,
        d_dim,
        p_dim,
        float(scale),
    )
    wide = p_dim > _ONE_BLOCK_MAX
    flags = dict(
        GATHER=gather is not None,
        ROW_SCALE=row_scale is not None,
        ADD_OUT=add,
        UPCAST=kl.interpreting(),
        PRECISION="ieee" if q_MD.dtype == torch.float32 else None,
    )
    if not wide:
        flags["BLOCK_P"] = max(16, kl.next_power_of_2(p_dim))

    def grid(meta: dict) -> tuple[int, int, int]:
        blocks_p = kl.cdiv(p_dim, meta["BLOCK_P"])
        return (offs_E.numel(), kl.cdiv(d_dim, meta["BLOCK_D"]), blocks_p)

    if tuning.autotune_enabled():
        key = ("expert_grad", d_dim, p_dim, str(q_MD.dtype), *flags.values())
        # fmt: off
        tuning.run_tuned(tk._expert_grad_kernel, lambda: _expert_grad_kernel(wide, add), key,
                         grid, args, flags, device=q_MD.device)
        # fmt: on
    else:
        fixed = _WIDE_GRAD_FIXED if wide else _RANK_GRAD_FIXED
        tk._expert_grad_kernel[grid](*args, **flags, **fixed)
    return out


def transposed_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of an ``[E, m, n]`` tensor read as ``[E, n, m]``."""
    return t.stride(0), t.stride(2), t.stride(1)


def _factor_grad(factor, q, p, s, offs_E, create_graph, *, is_a, gather=None, row_scale=None):
    """A LoRA factor's gradient by :func:`expert_grad`: A is ``[E, r, D]`` (the reduction's d
    on its last axis), B is ``[E, D, r]``. Added into ``factor.grad`` where
    :func:`adds_in_place` holds (then None: autograd has nothing left to add)."""
    add = adds_in_place(factor, create_graph, by_tma=False)
    out = factor.grad if add else torch.empty_like(factor)
    strides = transposed_strides(out) if is_a else out.stride()
    expert_grad(q, p, offs_E, out, strides, s, gather=gather, row_scale=row_scale, add=add)
    return None if add else out


# How dW1 and dW2 are computed: "triton" (expert_grad, the token-order operand read through
# the row index) or "torch" (a gathered copy of it, then torch's grouped GEMM): the
# MOELAB_TRITON_WEIGHT_GRADS setting, else measured once per shape on this machine (with
# autotuning on; else "triton") and kept on disk.
_weight_grad_paths = MeasuredChoices("triton_weight_grads.json", ("triton", "torch"))


def _weight_grads_setting() -> str | None:
    value = kl.setting("MOELAB_TRITON_WEIGHT_GRADS", "")
    if value and value not in _weight_grad_paths.allowed:
        allowed = " or ".join(_weight_grad_paths.allowed)
        raise ValueError(f"MOELAB_TRITON_WEIGHT_GRADS={value!r}: expected {allowed} (or unset)")
    return value or None


def gather_rows(src_TD: torch.Tensor, index_N: torch.Tensor) -> torch.Tensor:
    """``src[index]`` (rows, ``[N, D]``, contiguous) by ``tk._gather_rows_kernel``: a token-order
    operand's copy in sorted row order for the backward's products over sorted rows. 2048
    elements per program in blocks 256 columns wide (narrower rows: one block of their width):
    3.0 TB/s written against ``index_select``'s 2.2 at Qwen3's 65536 x 2048 (BENCHMARKS.md run
    141)."""
    rows, width = index_N.numel(), src_TD.shape[1]
    out = src_TD.new_empty(rows, width)
    if rows == 0 or width == 0:
        return out
    if src_TD.stride(1) != 1:
        src_TD = src_TD.contiguous()
    index_N = index_N.contiguous()  # read as a flat run of ids
    block_c = min(256, kl.next_power_of_2(width))
    block_r = 2048 // block_c
    even = rows % block_r == 0 and width % block_c == 0
    sizes = dict(EVEN=even, BLOCK_R=block_r, BLOCK_C=block_c)
    grid = (kl.cdiv(rows, block_r), kl.cdiv(width, block_c))
    # fmt: off
    kl.launch(tk._gather_rows_kernel, grid, (src_TD, index_N, out, rows, width, src_TD.stride(0)),
              sizes, ("gather_rows", *sizes.values()))
    # fmt: on
    return out


def weight_grad(
    tokens_TD: torch.Tensor,
    rows_NJ: torch.Tensor,
    plan: DispatchPlan,
    out_jd: bool,
    path: str | None = None,
    gathered_ND: torch.Tensor | None = None,
) -> torch.Tensor:
    """An expert weight's gradient, ``sum_{n of e} tokens[token(n)]^T rows[n]`` per expert:
    ``[E, J, D]`` when ``out_jd`` (dW1 = dh^T x), else ``[E, D, J]`` (dW2 = dout^T (w act)).
    ``tokens`` stays in token order: the triton path reads its rows through ``plan.token_N``;
    the torch path gathers a ``[N, D]`` copy for torch's grouped GEMM, or takes
    ``gathered_ND``, a copy already made (then nothing is measured). ``path`` overrides the
    setting and the measured choice."""
    num_experts = plan.offs_E.numel()
    d_dim, j_dim = tokens_TD.shape[1], rows_NJ.shape[1]

    def run(path: str) -> torch.Tensor:
        if path == "torch":
            copy_ND = gathered_ND
            if copy_ND is None:
                copy_ND = gather_rows(tokens_TD, plan.token_N)
            if out_jd:
                return gmm._gmm_wgrad(rows_NJ, copy_ND, plan.offs_E)
            return gmm._gmm_wgrad(copy_ND, rows_NJ, plan.offs_E)
        if out_jd:
            out = rows_NJ.new_empty(num_experts, j_dim, d_dim)
            strides = (j_dim * d_dim, 1, d_dim)
        else:
            out = rows_NJ.new_empty(num_experts, d_dim, j_dim)
            strides = (d_dim * j_dim, j_dim, 1)
        return expert_grad(tokens_TD, rows_NJ, plan.offs_E, out, strides, 1.0, gather=plan.token_N)

    if gathered_ND is not None:
        path = "torch"
    path = path or _weight_grads_setting()
    if path is None:
        if not tuning.measures(tokens_TD):
            path = "triton"
        else:
            rows = rows_NJ.shape[0]
            bucket = tuning.rows_bucket(rows)
            key = ("weight_grad", d_dim, j_dim, bucket, num_experts, out_jd, str(rows_NJ.dtype))
            # fmt: off
            path = tuning.measured_choice(_weight_grad_paths, "weight gradient", key, run,
                                          tokens_TD.device, (tk._expert_grad_kernel,))
            # fmt: on
    return run(path)


# (BLOCK_M, BLOCK_A, BLOCK_B, warps, stages, programs per SM, PREFETCH) of the in-place weight
# gradient: two programs per SM where both fit in shared memory (one's epilogue under the other's
# loop); the fastest of run 135, each with and without the next tile's old values prefetched
_ADD_CONFIGS = tuple((*c, prefetch) for c in ((64, 128, 128, 8, 3, 2), (64, 128, 128, 8, 2, 2),
                                              (64, 128, 128, 4, 3, 2), (64, 128, 256, 8, 3, 1),
                                              (64, 256, 128, 8, 3, 1), (32, 128, 256, 8, 4, 1))
                     for prefetch in (False, True))  # fmt: skip
_ADD_FIXED = dict(BLOCK_M=32, BLOCK_A=32, BLOCK_B=32, PREFETCH=True, SM_PROGRAMS=1, num_warps=4,
                  num_stages=3)  # fmt: skip


def _fit_add_boxes(nargs: dict) -> None:
    """The descriptors' boxes for a configuration (B's descriptor is ragged: two leading
    dimensions of one)."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_A"]]
    nargs["b_desc"].block_shape = [1, 1, nargs["BLOCK_M"], nargs["BLOCK_B"]]


@functools.cache
def _weight_add_kernel():
    """The in-place weight gradient autotuned over ``_ADD_CONFIGS``; each candidate's additions
    are undone after it is timed (``restore_value``), so the gradient gets one."""
    configs = [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_A": ba, "BLOCK_B": bb, "SM_PROGRAMS": per_sm, "PREFETCH": pf},
            num_warps=w,
            num_stages=st,
            pre_hook=_fit_add_boxes,
        )
        for bm, ba, bb, w, st, per_sm, pf in _ADD_CONFIGS
    ]
    # fmt: off
    return triton.autotune(configs, key=["a_dim", "b_dim", "num_experts"], do_bench=tuning.bench,
                           restore_value=["out_ptr"])(tk._weight_grad_add_kernel)
    # fmt: on


def add_weight_grad(
    grad_EAB: torch.Tensor, a_NA: torch.Tensor, b_NB: torch.Tensor, offs_E: torch.Tensor
) -> None:
    """``grad[e] += sum_{n of e} a[n]^T b[n]`` in place, one rounding, by
    ``tk._weight_grad_add_kernel``: ``a`` and ``b`` in sorted row order (dW1: dh and x's rows
    gathered; dW2: dout's rows gathered and w act), ``grad`` contiguous. Only where
    :func:`adds_in_place` holds."""
    from triton.tools.ragged_tma import create_ragged_descriptor
    from triton.tools.tensor_descriptor import TensorDescriptor

    num_experts, a_dim, b_dim = grad_EAB.shape
    a_desc = TensorDescriptor(a_NA, list(a_NA.shape), list(a_NA.stride()), [1, 1])
    b_desc = create_ragged_descriptor(b_NB, [1, 1])
    args = (a_desc, b_desc, offs_E, grad_EAB, grad_EAB.stride(0), grad_EAB.stride(1), a_dim,
            b_dim, num_experts)  # fmt: skip
    flags = dict(
        UPCAST=kl.interpreting(),
        PRECISION="ieee" if grad_EAB.dtype == torch.float32 else None,
    )

    def grid(meta: dict) -> tuple[int]:
        tiles = num_experts * kl.cdiv(a_dim, meta["BLOCK_A"]) * kl.cdiv(b_dim, meta["BLOCK_B"])
        return (kl.persistent_programs(grad_EAB.device, tiles, meta["SM_PROGRAMS"]),)

    descriptors = dict(a_desc=a_desc, b_desc=b_desc)
    if tuning.autotune_enabled():
        key = ("weight_grad_add", a_dim, b_dim, num_experts, tuning.rows_bucket(a_NA.shape[0]),
               str(grad_EAB.dtype), *flags.values())  # fmt: skip
        # fmt: off
        tuning.run_tuned(tk._weight_grad_add_kernel, _weight_add_kernel, key, grid, args, flags,
                         prepare=lambda kw: _fit_add_boxes(dict(kw, **descriptors)),
                         device=grad_EAB.device)
        # fmt: on
        return
    _fit_add_boxes(dict(_ADD_FIXED, **descriptors))
    tk._weight_grad_add_kernel[grid](*args, **flags, **_ADD_FIXED)


def adds_in_place(weight: torch.Tensor | None, create_graph: bool, by_tma: bool = True) -> bool:
    """Whether this backward adds ``weight``'s gradient into ``weight.grad`` itself (an expert
    weight's by :func:`add_weight_grad`, a LoRA factor's by :func:`expert_grad`, ``by_tma``
    False) and returns none for it: exactly where autograd would add the
    gradient into an existing ``.grad`` in place (``grad += new``, what its accumulation does
    without ``create_graph``) and nothing could see the gradient on its way there.

    So: ``.backward()`` will run the weight's accumulation node (not ``torch.autograd.grad``,
    nor ``inputs=`` leaving it out); the weight is a leaf whose ``.grad`` exists, dense,
    contiguous, of its shape, dtype and device; no tensor hooks, no post-accumulate hooks.
    Hooks put on the accumulation node itself (DDP's reducer puts its own there) cannot be seen
    from Python: that node still runs, after the add, given no gradient, so one that reads
    ``.grad`` finds the sum. ``MOELAB_TRITON_GRAD_IN_PLACE=0`` turns
    this off. ``by_tma``: the kernel reads by TMA, so sm_90 or later (or the CPU interpreter),
    and rows of 16-byte multiples (the operands' rows are as wide as the weight's last two
    dimensions)."""
    setting = kl.setting("MOELAB_TRITON_GRAD_IN_PLACE", "1")
    if setting not in ("0", "1"):
        raise ValueError(f"MOELAB_TRITON_GRAD_IN_PLACE={setting!r}: expected 0 or 1 (or unset)")
    if weight is None or create_graph or setting == "0":
        return False
    grad = weight.grad
    if grad is None or not (weight.is_leaf and weight.requires_grad):
        return False
    if grad.is_sparse or not grad.is_contiguous() or grad.shape != weight.shape:
        return False
    if grad.dtype != weight.dtype or grad.device != weight.device:
        return False
    if weight._backward_hooks or weight._post_accumulate_grad_hooks:
        return False
    if by_tma and not _tma_can_read(weight):
        return False
    node = torch.autograd.graph.get_gradient_edge(weight).node
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # under torch.autograd.grad: the gradient is returned, not accumulated
        return False


def _tma_can_read(weight: torch.Tensor) -> bool:
    if weight.is_cuda and kl.capability(weight.device) < (9, 0):
        return False
    return not any(size * weight.element_size() % 16 for size in weight.shape[-2:])


def lora_down_grads(
    need: tuple[bool, ...],
    s: float,
    plan: DispatchPlan,
    dout_TH: torch.Tensor,
    w_N: torch.Tensor,
    act_w_NI: torch.Tensor | None,
    u2_NR: torch.Tensor | None,
    z2_NR: torch.Tensor | None,
    a2: torch.Tensor | None,
    b2: torch.Tensor | None,
    grads: list[torch.Tensor | None],
    *,
    create_graph: bool,
) -> None:
    """dA2 (9) = s u2^T (w act) and dB2 (10) = s dout[token]^T (w z2) per expert (each added
    into the factor's ``.grad`` where :func:`adds_in_place` holds)."""
    if need[9]:
        grads[9] = _factor_grad(a2, act_w_NI, u2_NR, s, plan.offs_E, create_graph, is_a=True)
    if need[10]:
        # fmt: off
        grads[10] = _factor_grad(b2, dout_TH, z2_NR, s, plan.offs_E, create_graph, is_a=False,
                                 gather=plan.token_N, row_scale=w_N)
        # fmt: on


def lora_up_grads(
    need: tuple[bool, ...],
    s: float,
    plan: DispatchPlan,
    x_TH: torch.Tensor,
    dh_NG: torch.Tensor,
    u1_NR: torch.Tensor | None,
    z1_NR: torch.Tensor | None,
    a1: torch.Tensor | None,
    b1: torch.Tensor | None,
    grads: list[torch.Tensor | None],
    *,
    create_graph: bool,
) -> None:
    """dA1 (7) = s u1^T x[token] and dB1 (8) = s dh^T z1 per expert (each added into the
    factor's ``.grad`` where :func:`adds_in_place` holds)."""
    if need[7]:
        # fmt: off
        grads[7] = _factor_grad(a1, x_TH, u1_NR, s, plan.offs_E, create_graph, is_a=True,
                                gather=plan.token_N)
        # fmt: on
    if need[8]:
        grads[8] = _factor_grad(b1, dh_NG, z1_NR, s, plan.offs_E, create_graph, is_a=False)
