"""``triton``: fused expert-MLP kernels (``triton_kernels.py``), their launchers, one autograd.

Forward, over expert-sorted rows (dispatch in :mod:`moelab.ops.dispatch`), two grouped GEMMs::

    h, act = swiglu(x[token] W1^T + s z1 B1^T + b1)      gather in the A-load, act in epilogue;
                                                         z1 = x[token] A1^T in the same K loop
    y[slot] = act W2^T + s z2 B2^T + b2                  z2 = act A2^T in the K loop; written
                                                         to (token, slot) order
    out[t] = sum_j w[t, j] y[t, j]                       combine kernel, fp32, slot order

Backward::

    g = dout[token] W2 + s u2 A2                         u2 = dout B2 in the K loop; epilogue:
                                                         dw = <g, act>, dh = act'(h, w g), w act
                                                         (or g stored by a product of its
                                                         own, ours or torch's, and the
                                                         epilogue alone: down_backward)
    LoRA dA2/dB2                                         rank-r reduction kernel per factor
                                                         (or added into .grad in place)
    dW2                                                  varlen-K grouped product (torch's,
                                                         ours, or added into .grad in place)
    dxs[slot] = dh W1 + s u1 A1;  dx[t] = sum_j dxs      u1 = dh B1 in the K loop
    LoRA dA1/dB1; dW1 and biases                         as above

Products that read a token-order operand (x, dout) from a sorted copy (torch's GEMM, the
in-place weight gradient's TMA loads) get that copy from ``tg.gather_rows``.

Each rank-r product can instead come from its own rank-r launch; which is faster is measured
once per shape and machine (``LORA_PLACEMENT``; remembered on disk by
:mod:`moelab.kernels.measured`). Saved for backward: x, h ``[N, 2I]``, z1, z2, the routing
weights and the int plan and tile table; with ``recompute`` (``moe_experts``) h is not kept but
recomputed by a second up projection in backward (the same kernel, so the same bits), which
trades one GEMM for ``2 I k`` elements per token. No host synchronisation, no atomics: same bits
on every run.

The y and dxs products (plain stores over sorted rows, z in the K loop or no LoRA) run on the
persistent kernel where TMA can read A and W: the tile loop flattened into the K loop, so the
next tile loads during this tile's epilogue (``MOELAB_TRITON_PERSISTENT=0``: the tiled kernel,
the same bits).

The weights' and LoRA factors' gradient launchers are :mod:`moelab.kernels.triton_grads`; tuning
on this machine (configurations per launch key, measured choices) is
:mod:`moelab.kernels.triton_tuning`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from moelab.kernels import grouped_mm as gmm
from moelab.kernels import launch as kl
from moelab.kernels import triton_grads as tg
from moelab.kernels import triton_kernels as tk
from moelab.kernels import triton_tuning as tuning
from moelab.kernels.first_order import first_order_backward
from moelab.kernels.measured import MeasuredChoices
from moelab.kernels.problem import ExpertProblem
from moelab.kernels.triton_grads import transposed_strides as _t
from moelab.ops.dispatch import DispatchPlan
from moelab.ops.lora import ExpertLoRA

NAME = "triton"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_RANK = 128


def machine_reason() -> str | None:
    if not (torch.cuda.is_available() or kl.interpreting()):
        return "needs a CUDA GPU (or TRITON_INTERPRET=1, Triton's CPU interpreter)"
    return None


def unsupported_reason(problem: ExpertProblem) -> str | None:
    if problem.device.type == "cpu" and not kl.interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    if problem.device.type not in ("cpu", "cuda"):
        return f"runs on CUDA (or the CPU interpreter), not {problem.device.type}"
    if problem.accumulate != "fp32":
        return "triton sums the k expert outputs in fp32 only"
    if problem.lora_rank_largest > _MAX_RANK:
        return f"LoRA rank {problem.lora_rank_largest} exceeds {_MAX_RANK}"
    # the weight gradients may take torch's grouped GEMM (a measured choice): its alignment rules
    return gmm.grouped_products_reason(problem)


# Average rows per expert from which triton measured faster than grouped_mm on an H200
# (BENCHMARKS.md), by activation: the fewest measured where it won, in LoRA and full fine-tune
# alike (every larger count measured won too). Below about 64 rows per expert both backends are
# bound by the host's launching, so the grouped_mm backend's extra elementwise launches for
# swiglu_oai and the biases (GPT-OSS) decide it. Triton's time over grouped_mm's: GPT-OSS at 16
# rows per expert 0.88x (LoRA, run 53) and 0.91x (full, run 57), at 32 0.75x and 0.77x (run 53);
# Qwen3 (swiglu) at 32 1.08x (LoRA) and 1.02x (full, run 53), so it keeps 64, where it won (LoRA
# 2.13 vs 2.90 ms in run 45, full 3.11 vs 3.26 in run 46).
_AUTO_MIN_ROWS_PER_EXPERT = {"swiglu": 64, "swiglu_oai": 16}


def auto_reason(problem: ExpertProblem) -> str | None:
    """Why ``auto`` does not pick triton although it could run (None: pick it)."""
    if problem.device.type != "cuda":
        return "the CPU interpreter is for tests; ask for triton by name"
    return _measured_slower(problem, kl.capability(problem.device))


def _measured_slower(problem: ExpertProblem, capability: tuple[int, int]) -> str | None:
    if problem.recompute:  # asked for, and no other backend offers it
        return None
    if capability < (9, 0):
        return f"tuned and measured on sm90+ only, this GPU is sm{capability[0]}{capability[1]}"
    rows = problem.num_tokens * problem.top_k / problem.num_experts
    need = _AUTO_MIN_ROWS_PER_EXPERT[problem.activation]
    if rows < need:
        return (
            f"{rows:.0f} rows per expert; triton measured faster than grouped_mm from {need} "
            f"with {problem.activation} (BENCHMARKS.md)"
        )
    return None


def saved_bytes_per_token(problem: ExpertProblem, itemsize: int) -> int:
    """Activation bytes kept for backward per token (x, h unless recomputed, z1, z2, the fp32
    routing weights in token and in sorted order, expert ids and the plan's four int64 per
    slot; the two tile tables, under one byte per slot, are left out)."""
    k, h = problem.top_k, 0 if problem.recompute else 2 * problem.inter
    return itemsize * (problem.hidden + k * (h + problem.lora_z_width)) + k * (2 * 4 + 5 * 8)


# ---- launchers ------------------------------------------------------------------------------


# Dispatch launches: a block of routed rows per program, placed SUB at a time (a SUB x SUB
# comparison gives each row's rank among its expert's rows of the sub-block)
_DISPATCH_SUB, _TILE_SLOTS_BLOCK = 64, 32


def _dispatch_block(rows: int) -> int:
    """Routed rows per dispatch program: each program sums the counts of every block and then
    places its own rows one sub-block after another, so about 128 programs, 256 to 1024 rows
    each (run 66, both launches: 65536 rows 41.5 us at 1024 per program, 29.0 at 512; 8192
    rows 38.9 at 1024, 16.3 at 256; 524288 rows 152 at 1024, 337 at 512)."""
    return min(1024, max(256, kl.next_power_of_2(kl.cdiv(rows, 128))))


def dispatch_tiles(
    experts_TK: torch.Tensor, num_experts: int, weights_TK: torch.Tensor | None = None
) -> tuple[DispatchPlan, torch.Tensor, torch.Tensor | None]:
    """The plan of :func:`moelab.ops.dispatch.dispatch` (a stable sort of the routed rows by
    expert, the same bits), the GEMMs' tile tables and, given ``weights_TK``, the routing
    weights in sorted order (``[N]``, for the backward; else None), in two small launches
    without a host sync: counts per block of rows, then each row's place.

    The tile tables are ``[2, 4, slots]`` int32: for each row-tile height of
    ``tk.TILE_BLOCKS_M``, the expert (-1 for padding), first row and end row of each row tile,
    so the tile height is tuned like any other block size, and in field 3's first slot how many
    row tiles are listed; ``slots = ceil(N / 64) + E``, the worst case. torch's stable sort
    alone was 22 kernels here, launched while the GPU waited.
    """
    num_tokens, top_k = experts_TK.shape
    ids_N = experts_TK.reshape(-1)
    rows = ids_N.numel()
    block = _dispatch_block(rows)
    blocks = kl.cdiv(rows, block)
    bins = kl.next_power_of_2(num_experts + 1)  # bin E: ids out of range, placed last
    device = ids_N.device
    hist = torch.empty(blocks, bins, dtype=torch.int32, device=device)
    offs_E = torch.empty(num_experts, dtype=torch.int32, device=device)
    order, token, expert, slot = torch.empty(4, rows, dtype=torch.int64, device=device)
    slots = kl.cdiv(rows, tk.TILE_BLOCKS_M[0]) + num_experts
    tiles = torch.empty(2, 4, slots, dtype=torch.int32, device=device)
    weights_N = None if weights_TK is None else weights_TK.reshape(-1).contiguous()
    sorted_N = None if weights_N is None else torch.empty_like(weights_N)
    per_program = kl.cdiv(kl.cdiv(slots, blocks), _TILE_SLOTS_BLOCK) * _TILE_SLOTS_BLOCK
    sizes = dict(BLOCK=block, BINS=bins)
    # fmt: off
    kl.launch(tk._dispatch_count_kernel, (blocks,), (ids_N, hist, rows, num_experts), sizes,
              ("count", bins, block))
    kl.launch(
        tk._dispatch_place_kernel, (blocks,),
        (ids_N, hist, blocks, offs_E, order, token, expert, slot,
         ids_N if weights_N is None else weights_N, ids_N if sorted_N is None else sorted_N,
         tiles, tiles.stride(0), tiles.stride(1), rows, num_experts, top_k, per_program),
        dict(sizes, SUB=_DISPATCH_SUB, CHUNK=16, BLOCK_T=_TILE_SLOTS_BLOCK,
             WEIGHTS=weights_N is not None),
        ("place", bins, block, weights_N is not None))
    # fmt: on
    plan = DispatchPlan(order, token, expert, offs_E, slot.view(num_tokens, top_k))
    return plan, tiles, sorted_N


# Hopper-shaped candidates (BLOCK_N, BLOCK_K, warps, stages), each at both row-tile heights of
# tk.TILE_BLOCKS_M (pruned by rows per expert): wgmma wants 64-row warpgroups
# and BLOCK_K 64 keeps 128-byte rows; the SwiGLU kernel holds the gate and up tiles side by
# side, so its column block is half as wide; rank-r launches are memory-bound skinny products.
_LOW_RANK, _EPILOGUE_ONLY = 3, 4
_CONFIGS = {
    tk.STORE: ((128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4)),
    # (64, 64, 8, 3) at 128 rows: 100 registers and 96 KB (ptxas, Triton 3.6), so two CTAs share
    # an SM and one's epilogue can overlap the other's loads
    tk.SWIGLU_FWD: (
        (64, 64, 4, 4),
        (64, 64, 8, 4),
        (64, 64, 8, 3),
        (128, 64, 8, 3),
        (128, 64, 8, 2),
    ),
    tk.SWIGLU_BWD: (
        (32, 64, 8, 4),
        (32, 64, 4, 4),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 64, 8, 4),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
    ),
    _LOW_RANK: ((16, 64, 4, 3), (16, 64, 4, 5), (16, 128, 4, 3), (16, 128, 4, 4), (32, 64, 4, 4)),
    # the SwiGLU-backward epilogue alone, over a product torch's grouped GEMM made: memory-bound
    _EPILOGUE_ONLY: ((32, 16, 4, 1), (64, 16, 4, 1), (64, 16, 8, 1), (128, 16, 8, 1)),
}
_FIXED = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)  # CI, repro
_GROUP_M = 8
_DW_COLS = 32  # SWIGLU_BWD writes one router partial per 32 columns (kernel constant)
# Where z = A la^T is computed for each product: tk.LORA_IN_LOOP, tk.LORA_GIVEN, or None to
# time both on the first call of each shape on this machine (with autotuning on; else in the
# loop), the choice kept on disk. Products:
# up (x A1^T), down (act A2^T), bwd_down (dout B2), bwd_up (dh B1).
LORA_PLACEMENT: dict[str, int | None] = dict.fromkeys(("up", "down", "bwd_down", "bwd_up"))
_placements = MeasuredChoices("triton_lora_placement.json", (tk.LORA_IN_LOOP, tk.LORA_GIVEN))
DOWN_BACKWARD_MAIN: str | None = None  # see down_backward
# The torch main loop holds a gathered copy of dout and g, (H + I) elements per row, while it
# runs; above this it is not considered, so long sequences keep the other loops' memory.
_TORCH_MAIN_LOOP_MAX_BYTES = 1 << 30
_main_loops = MeasuredChoices("triton_down_backward.json", ("triton", "gathered", "torch"))
# what the choices above are measured between: stored ones are kept while these are unchanged
_GEMM_KERNELS = (tk._expert_gemm_kernel, tk._persistent_gemm_kernel)


def _even(args: dict) -> dict:
    return dict(
        EVEN_K=args["k_dim"] % args["BLOCK_K"] == 0, EVEN_N=args["n_out"] % args["BLOCK_N"] == 0
    )


_kernels: dict[int, object] = {}


def _kernel(epilogue: int):
    """The GEMM kernel autotuned over ``_CONFIGS[epilogue]`` (with the EVEN_* heuristics)."""
    if epilogue not in _kernels:
        kernel = triton.heuristics(
            {"EVEN_K": lambda a: _even(a)["EVEN_K"], "EVEN_N": lambda a: _even(a)["EVEN_N"]}
        )(tk._expert_gemm_kernel)
        key = ["n_out", "k_dim", "rank", "num_rows", "EPILOGUE", "ACC_IN", "LORA", "GATHER",
               "SCATTER"]  # fmt: skip
        _kernels[epilogue] = _autotuned(kernel, _CONFIGS[epilogue], key)
    return _kernels[epilogue]


def _autotuned(kernel, configs: tuple, key: list[str], extra: tuple[dict, ...] = ({},)):
    """``kernel`` autotuned over ``configs`` (BLOCK_N, BLOCK_K, warps, stages), each with every
    one of ``extra``'s constexprs, at every row-tile height worth timing (the choice is kept on
    disk by ``tuning.run_tuned``)."""

    tuned = [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **more},
            num_warps=warps,
            num_stages=stages,
            pre_hook=_fit_boxes,
        )
        for bm in tk.TILE_BLOCKS_M
        for bn, bk, warps, stages in configs
        for more in extra
    ]
    prune = {"early_config_prune": _tile_heights_worth_timing}
    return triton.autotune(tuned, key=key, prune_configs_by=prune, do_bench=tuning.bench)(kernel)


def _tma_enabled() -> bool:
    return kl.setting("MOELAB_TRITON_TMA", "1") != "0"


def _w_mode(w: torch.Tensor, w_strides, epilogue: int) -> int:
    """How the tensor-memory accelerator can read W: 1 over ``[E, N, K]`` (K contiguous), 2
    over ``[E, K, N]`` (N contiguous, not for the SwiGLU product), 0 not at all (alignment,
    layout, dtype) or switched off (``MOELAB_TRITON_TMA=0``): pointer loads."""
    item = w.element_size()
    s_e, s_n, s_k = w_strides
    aligned = w.data_ptr() % 16 == 0 and (s_e * item) % 16 == 0
    if not (_tma_enabled() and aligned and w.dtype in _DTYPES):
        return 0
    if s_k == 1 and (s_n * item) % 16 == 0:
        return 1
    if s_n == 1 and (s_k * item) % 16 == 0 and epilogue != tk.SWIGLU_FWD:
        return 2
    return 0


def _w_descriptor(w: torch.Tensor, w_strides, n_out: int, k_dim: int, epilogue: int):
    """``(W_DESC, descriptor)`` of ``_w_mode``: a host descriptor over ``[E, N, K]`` (the
    SwiGLU product's as ``[E, 2, I, K]``, so one box holds the gate and up tiles) or ``[E, K,
    N]``, one box per expert, so reads past an expert's edge are zeros; ``(0, w)`` for pointer
    loads. The box is sized per configuration by ``_fit_boxes``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    mode = _w_mode(w, w_strides, epilogue)
    s_e, s_n, s_k = w_strides
    if mode == 1 and epilogue == tk.SWIGLU_FWD:
        shape, strides = [w.shape[0], 2, n_out, k_dim], [s_e, n_out * s_n, s_n, 1]
        return 1, TensorDescriptor(w, shape, strides, [1, 1, 1, 1])
    if mode == 1:
        return 1, TensorDescriptor(w, [w.shape[0], n_out, k_dim], [s_e, s_n, 1], [1, 1, 1])
    if mode == 2:
        return 2, TensorDescriptor(w, [w.shape[0], k_dim, n_out], [s_e, s_k, 1], [1, 1, 1])
    return 0, w


def _a_descriptor(a: torch.Tensor, k_dim: int):
    """A descriptor over ``a [N, K]`` (sorted rows, K contiguous) for the tensor-memory
    accelerator, or None where TMA cannot read it; the box is sized per configuration."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    item = a.element_size()
    aligned = a.data_ptr() % 16 == 0 and (a.stride(0) * item) % 16 == 0
    if not (_tma_enabled() and aligned and a.stride(1) == 1 and a.dtype in _DTYPES):
        return None
    return TensorDescriptor(a, [a.shape[0], k_dim], [a.stride(0), 1], [1, 1])


def _fit_boxes(nargs: dict) -> None:
    """Size the descriptors' boxes for a configuration (a pre-hook of every tuned config;
    ``nargs`` holds the launch's constexprs, ``w_desc`` and, for the persistent kernel,
    ``a_desc``)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    if nargs["W_DESC"] == 1:
        two = nargs.get("EPILOGUE") == tk.SWIGLU_FWD
        nargs["w_desc"].block_shape = [1, 2, bn, bk] if two else [1, bn, bk]
    elif nargs["W_DESC"] == 2:
        nargs["w_desc"].block_shape = [1, bk, bn]
    if "a_desc" in nargs:
        nargs["a_desc"].block_shape = [bm, bk]
    rank_block = nargs.get("BLOCK_R")
    if nargs.get("LORA") == tk.LORA_GIVEN and "z_desc" in nargs:
        nargs["z_desc"].block_shape = [bm, rank_block]
    if nargs.get("LB_DESC") == 1:
        nargs["lb_desc"].block_shape = [1, bn, rank_block]
    elif nargs.get("LB_DESC") == 2:
        nargs["lb_desc"].block_shape = [1, rank_block, bn]


def _tile_heights(num_rows: int, num_experts: int) -> tuple[int, ...]:
    """The row-tile heights worth timing: both only where either may win. With under 128 rows
    per expert a 128-row tile is mostly padding; past 1024 the 64-row tile's padding saving
    (half a tile per expert) is under 3% of the rows. Tuning keys hold these too, so that rows
    of one bucket (``tuning.rows_bucket``) on two sides of a threshold never share a choice."""
    per_expert = num_rows / num_experts
    return (64,) if per_expert < 128 else (128,) if per_expert > 1024 else (64, 128)


def _tile_heights_worth_timing(configs: list, named_args: dict, **kwargs) -> list:
    """The tuner's pruning: ``_tile_heights`` (keeps the tuning time of most shapes as it was)."""
    heights = _tile_heights(named_args["num_rows"], named_args["num_experts"])
    return [c for c in configs if c.kwargs["BLOCK_M"] in heights]


class LowRank(NamedTuple):
    """Split-LoRA inside one product: ``z = A la^T`` (stored to ``z``), then ``+ s z lb^T``.

    ``la`` is read as ``[E, r, K]`` and ``lb`` as ``[E, N, r]`` through the given strides;
    ``placement`` says whether z is computed inside the main loop or by a rank-r launch first
    (``None``: measured on first use, see ``LORA_PLACEMENT``).
    """

    la: torch.Tensor
    la_strides: tuple[int, int, int]
    lb: torch.Tensor
    lb_strides: tuple[int, int, int]
    scale: float
    z: torch.Tensor
    placement: int | None = None


def expert_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    w_strides: tuple[int, int, int],
    n_out: int,
    k_dim: int,
    tiles: torch.Tensor,
    out: torch.Tensor,
    *,
    gather: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
    lora: LowRank | None = None,
    bias: torch.Tensor | None = None,
    epilogue: int = tk.STORE,
    h: torch.Tensor | None = None,
    w_rows: torch.Tensor | None = None,
    dw: torch.Tensor | None = None,
    act_w: torch.Tensor | None = None,
    oai: bool = False,
    act_out: bool = True,
) -> torch.Tensor:
    """One grouped product over the tile table; see ``triton_kernels`` for the epilogues.

    ``w_strides`` are W's (expert, out feature, reduction) strides, so one kernel reads W1,
    W2 and the LoRA factors in either orientation without copies. The column block, K block
    and pipeline depth are autotuned when enabled.
    """

    def run(placement: int | None) -> None:
        low = None if lora is None else lora._replace(placement=placement)
        if low is not None and placement == tk.LORA_GIVEN:
            rank_r_product(a, low, k_dim, tiles, gather)
        _launch(
            a, w, w_strides, n_out, k_dim, tiles, out, gather=gather, scatter=scatter,
            lora=low, bias=bias, epilogue=epilogue, h=h, w_rows=w_rows, dw=dw, act_w=act_w,
            oai=oai, act_out=act_out, tuned_as=epilogue,
        )  # fmt: skip

    placement = None if lora is None else lora.placement
    if lora is not None and placement is None:
        if not tuning.measures(a):
            placement = tk.LORA_IN_LOOP
        elif _in_loop_unsafe(_w_mode(w, w_strides, epilogue), acc_in=False):
            placement = tk.LORA_GIVEN  # _launch would take the rank-r launch anyway: no timing
        else:
            key = (epilogue, n_out, k_dim, lora.z.shape[1], tuning.rows_bucket(out.shape[0]),
                   gather is not None, scatter is not None, str(a.dtype))  # fmt: skip
            # fmt: off
            placement = tuning.measured_choice(_placements, "LoRA placement", key, run, a.device,
                                               _GEMM_KERNELS)
            # fmt: on
    run(placement)
    return out


def rank_r_product(
    a: torch.Tensor,
    low: LowRank,
    k_dim: int,
    tiles: torch.Tensor,
    gather: torch.Tensor | None = None,
) -> None:
    """``low.z = a[gather] la^T`` per expert: the rank-r launch before a product that is given
    z (``tk.LORA_GIVEN``), or alone where only z is needed."""
    _launch(a, low.la, low.la_strides, low.z.shape[1], k_dim, tiles, low.z, gather=gather,
            tuned_as=_LOW_RANK)  # fmt: skip


def _launch(
    a, w, w_strides, n_out, k_dim, tiles, out, *, gather=None, scatter=None,
    lora=None, bias=None, epilogue=tk.STORE, h=None, w_rows=None, dw=None, act_w=None,
    oai=False, acc_in=False, act_out=True, tuned_as: int,
) -> None:  # fmt: skip
    dummy = a  # never read: its branch is compiled out
    rank = lora.z.shape[1] if lora is not None else 0
    # every product has one output row per sorted row (scattered or not), and W is [E, ., .]
    num_rows, num_experts = out.shape[0], w.shape[0]
    # rank-r products read a few KB of W: a descriptor would only cost the launch host time
    no_desc = acc_in or tuned_as == _LOW_RANK
    w_mode, w_desc = (0, w) if no_desc else _w_descriptor(w, w_strides, n_out, k_dim, epilogue)
    placement = tk.LORA_NONE if lora is None else lora.placement
    if placement == tk.LORA_IN_LOOP and _in_loop_unsafe(w_mode, acc_in):
        rank_r_product(a, lora, k_dim, tiles, gather)
        lora, placement = lora._replace(placement=tk.LORA_GIVEN), tk.LORA_GIVEN
    persistent = bool(w_mode) and epilogue == tk.STORE and gather is None and _persistent_enabled()
    a_desc = _a_descriptor(a, k_dim) if persistent else None
    lora_descs = _lora_descriptors(lora, n_out) if a_desc is not None else (0, None, None)
    if a_desc is not None and (placement != tk.LORA_GIVEN or lora_descs[0]):
        # fmt: off
        _launch_persistent(a_desc, w_mode, w_desc, lora_descs, n_out, k_dim, tiles, out,
                           scatter, lora, bias, tuned_as)
        # fmt: on
        return
    args = (
        a,
        gather if gather is not None else dummy,
        a.stride(0),
        a.stride(1),
        w,
        *w_strides,
        w_desc,
        *_lora_bias_table_out(lora, bias, tiles, num_rows, num_experts, out, scatter, dummy),
        h if h is not None else dummy,
        *(h.stride() if h is not None else (0, 0)),
        act_w if act_w is not None else dummy,
        *(act_w.stride() if act_w is not None else (0, 0)),
        w_rows if w_rows is not None else dummy,
        dw if dw is not None else dummy,
        dw.stride(0) if dw is not None else 0,
        n_out,
        k_dim,
        rank,
        float(lora.scale) if lora is not None else 0.0,
    )
    flags = dict(
        EPILOGUE=epilogue,
        ACC_IN=acc_in,
        GATHER=gather is not None,
        SCATTER=scatter is not None,
        LORA=placement,
        BIAS=bias is not None,
        OAI=oai,
        STORE_ACTW=act_w is not None,
        ACT_OUT=act_out,
        W_DESC=w_mode,
        UPCAST=kl.interpreting(),
        PRECISION="ieee" if a.dtype == torch.float32 else None,
        BLOCK_R=max(16, kl.next_power_of_2(rank)),
        GROUP_M=_GROUP_M,
    )

    def grid(meta: dict) -> tuple[int]:
        row_tiles = kl.cdiv(num_rows, meta["BLOCK_M"]) + num_experts
        return (row_tiles * kl.cdiv(n_out, meta["BLOCK_N"]),)

    def derived(config: dict) -> dict:
        """What the tuned kernel's heuristics set: EVEN_*."""
        return _even(dict(config, k_dim=k_dim, n_out=n_out))

    if tuning.autotune_enabled():
        rows = tuning.rows_bucket(num_rows), _tile_heights(num_rows, num_experts)
        key = (tuned_as, n_out, k_dim, rank, *rows, str(a.dtype), *flags.values())
        # fmt: off
        tuning.run_tuned(tk._expert_gemm_kernel, lambda: _kernel(tuned_as), key, grid, args,
                         flags, derived, lambda kw: _fit_boxes(dict(kw, w_desc=w_desc)), a.device)
        # fmt: on
        return
    fixed = dict(_FIXED, BLOCK_N=16) if tuned_as == _LOW_RANK else _FIXED
    kwargs = dict(flags, **fixed, **derived(fixed))
    _fit_boxes(dict(kwargs, w_desc=w_desc))
    tk._expert_gemm_kernel[grid](*args, **kwargs)


def _in_loop_unsafe(w_mode: int, acc_in: bool) -> bool:
    """Whether a product must not compute LoRA's z in its main loop, and takes z from a rank-r
    launch first instead: on the GPU with W read by pointer (``_w_mode`` 0: TMA switched off,
    or W's alignment or layout), which Triton 3.6 miscompiled in the dX product (an H200 read
    shared memory out of bounds, BENCHMARKS.md run 93, compute-sanitizer); kept on every Triton
    version, as a newer one was not checked. An epilogue-only product (``acc_in``) has no main
    loop and is always given its z. The CPU interpreter runs the loop as written."""
    return not (w_mode or acc_in or kl.interpreting())


def _lora_bias_table_out(lora, bias, tiles, num_rows, num_experts, out, scatter, dummy) -> tuple:
    """The arguments both GEMM kernels take in the same order: LoRA's factors and z, the bias,
    the tile table, the product's size and its output (``dummy`` for what is absent)."""
    return (
        lora.la if lora is not None else dummy,
        *(lora.la_strides if lora is not None else (0, 0, 0)),
        lora.z if lora is not None else dummy,
        *(lora.z.stride() if lora is not None else (0, 0)),
        lora.lb if lora is not None else dummy,
        *(lora.lb_strides if lora is not None else (0, 0, 0)),
        bias if bias is not None else dummy,
        *(bias.stride() if bias is not None else (0, 0)),
        tiles,
        tiles.stride(0),
        tiles.stride(1),
        num_rows,
        num_experts,
        out,
        out.stride(0),
        out.stride(1),
        scatter if scatter is not None else dummy,
    )


def _persistent_enabled() -> bool:
    return kl.setting("MOELAB_TRITON_PERSISTENT", "1") != "0"


def _lora_descriptors(lora: LowRank | None, n_out: int) -> tuple:
    """``(LB_DESC, z, lb)``: descriptors over a LoRA product's z ``[N, r]`` (a given z only)
    and lb (``[E, N, r]``: 1, ``[E, r, N]``: 2) for the persistent kernel's epilogue, or
    ``(0, None, None)`` where TMA cannot read them (rows of z or lb not a multiple of 16
    bytes; alignment; ``MOELAB_TRITON_TMA=0``). A rank below its block (``BLOCK_R``, a power
    of two from 16) reads zeros past r, as the pointer loads' masks do. Boxes are sized per
    configuration by ``_fit_boxes``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if lora is None:
        return 0, None, None
    z, lb = lora.z, lora.lb
    rank, item = z.shape[1], z.element_size()
    s_e, s_n, s_r = lora.lb_strides
    aligned = all(t.data_ptr() % 16 == 0 for t in (z, lb)) and (s_e * item) % 16 == 0
    if not (_tma_enabled() and aligned and (rank * item) % 16 == 0 and z.stride() == (rank, 1)):
        return 0, None, None
    if s_r == 1 and (s_n * item) % 16 == 0:
        mode, shape, strides = 1, [lb.shape[0], n_out, rank], [s_e, s_n, 1]
    elif s_n == 1 and (s_r * item) % 16 == 0:
        mode, shape, strides = 2, [lb.shape[0], rank, n_out], [s_e, s_r, 1]
    else:
        return 0, None, None
    z_desc = TensorDescriptor(z, list(z.shape), [rank, 1], [1, 1])
    return mode, z_desc, TensorDescriptor(lb, shape, strides, [1, 1, 1])


def _launch_persistent(
    a_desc, w_mode, w_desc, lora_descs, n_out, k_dim, tiles, out, scatter, lora, bias, tuned_as
) -> None:
    """A ``STORE`` product over sorted rows by ``tk._persistent_gemm_kernel`` (A and W by TMA;
    LoRA none, in the loop, or given with ``lora_descs`` from ``_lora_descriptors``)."""
    dummy = out  # never read: its branch is compiled out
    rank = lora.z.shape[1] if lora is not None else 0
    num_rows, num_experts = out.shape[0], w_desc.base.shape[0]
    lb_mode, z_desc, lb_desc = lora_descs
    given = lora is not None and lora.placement == tk.LORA_GIVEN
    z_desc = z_desc if given else dummy
    lb_desc = lb_desc if lb_mode else dummy
    args = (
        a_desc,
        w_desc,
        z_desc,
        lb_desc,
        *_lora_bias_table_out(lora, bias, tiles, num_rows, num_experts, out, scatter, dummy),
        n_out,
        k_dim,
        rank,
        float(lora.scale) if lora is not None else 0.0,
    )
    flags = dict(
        SCATTER=scatter is not None,
        LORA=tk.LORA_NONE if lora is None else lora.placement,
        BIAS=bias is not None,
        UPCAST=kl.interpreting(),
        PRECISION="ieee" if out.dtype == torch.float32 else None,
        W_DESC=w_mode,
        LB_DESC=lb_mode,
        BLOCK_R=max(16, kl.next_power_of_2(rank)),
        GROUP_M=_GROUP_M,
    )

    def grid(meta: dict) -> tuple[int]:
        row_tiles = kl.cdiv(num_rows, meta["BLOCK_M"]) + num_experts
        tiles_at_most = row_tiles * kl.cdiv(n_out, meta["BLOCK_N"])
        # 1 or 2 per SM, tuned: most configurations hold 100-180 KB of shared memory, so a
        # second program per SM runs after the first, as a tail wave; with a given z, one per
        # SM measured 6-19% faster than two (BENCHMARKS.md, run 42)
        return (kl.persistent_programs(out.device, tiles_at_most, meta["SM_PROGRAMS"]),)

    descriptors = dict(w_desc=w_desc, a_desc=a_desc, z_desc=z_desc, lb_desc=lb_desc)
    if tuning.autotune_enabled():
        key = ("persistent", tuned_as, n_out, k_dim, rank, tuning.rows_bucket(num_rows),
               _tile_heights(num_rows, num_experts), str(out.dtype), *flags.values())  # fmt: skip
        # fmt: off
        tuning.run_tuned(tk._persistent_gemm_kernel, _persistent_kernel, key, grid, args, flags,
                         prepare=lambda kw: _fit_boxes(dict(kw, **descriptors)),
                         device=out.device)
        # fmt: on
        return
    kwargs = dict(flags, **_FIXED, SM_PROGRAMS=1)
    _fit_boxes(dict(kwargs, **descriptors))
    tk._persistent_gemm_kernel[grid](*args, **kwargs)


@functools.cache
def _persistent_kernel():
    """The persistent kernel autotuned over the ``STORE`` configurations, each with one or two
    programs per SM (``kl.persistent_programs``)."""
    key = ["n_out", "k_dim", "rank", "num_rows", "SCATTER", "LORA", "BIAS", "W_DESC", "LB_DESC"]
    per_sm = ({"SM_PROGRAMS": 1}, {"SM_PROGRAMS": 2})
    return _autotuned(tk._persistent_gemm_kernel, _CONFIGS[tk.STORE], key, per_sm)


def best_configs() -> dict[int, str]:
    """The autotuner's choice per epilogue (for benchmark reports)."""
    return {
        ep: str(getattr(kernel, "best_config", None))
        for ep, kernel in _kernels.items()
        if ep is not None
    }


def combine_rows(y_NH: torch.Tensor, top_k: int, weights_N: torch.Tensor | None) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] y[t * K + j]`` (rows in slot order), fp32, fixed order."""
    rows, hidden = y_NH.shape
    out = y_NH.new_empty(rows // top_k, hidden)
    block = min(1024, max(16, kl.next_power_of_2(hidden)))
    grid = (rows // top_k, kl.cdiv(hidden, block))
    w = weights_N if weights_N is not None else y_NH
    flags = dict(TOP_K=top_k, HAS_W=weights_N is not None, UPCAST=kl.interpreting(), BLOCK_H=block)
    # fmt: off
    kl.launch(tk._combine_kernel, grid, (y_NH, w, out, hidden, y_NH.stride(0), out.stride(0)),
              flags, ("combine", *flags.values()))
    # fmt: on
    return out


def router_grad(
    dw_parts_NP: torch.Tensor,
    plan: DispatchPlan,
    dout_TH: torch.Tensor,
    down_bias_EH: torch.Tensor | None,
    experts_TK: torch.Tensor,
) -> torch.Tensor:
    """``dL/dw [T, K]`` fp32: each routed row's partials of ``<g, act>`` summed, back in (token,
    slot) order, plus ``<dout_t, b2[e_tj]>`` with a down bias; one launch
    (``tk._router_grad_kernel``)."""
    num_tokens, top_k = experts_TK.shape
    dw_TK = dw_parts_NP.new_empty(num_tokens, top_k)
    pairs, parts = num_tokens * top_k, dw_parts_NP.shape[1]
    if pairs == 0:
        return dw_TK
    bias = down_bias_EH if down_bias_EH is not None else dw_parts_NP  # never read without one
    # the kernel walks the pairs, partials and dout rows with unit inner strides
    experts_TK, dout_TH, dw_parts_NP = (t.contiguous() for t in (experts_TK, dout_TH, dw_parts_NP))
    block = 64
    # partials in column blocks of at most 128: a 64 x 128 fp32 tile per load, whatever I is
    sizes = dict(TOP_K=top_k, HAS_BIAS=down_bias_EH is not None, BLOCK=block,
                 BLOCK_P=min(128, kl.next_power_of_2(parts)), BLOCK_H=128)  # fmt: skip
    args = (dw_parts_NP, plan.slot_TK, dout_TH, bias, experts_TK, dw_TK, pairs, parts,
            dout_TH.shape[1], bias.shape[0] if down_bias_EH is not None else 0,
            dw_parts_NP.stride(0), dout_TH.stride(0), *bias.stride())  # fmt: skip
    kl.launch(tk._router_grad_kernel, (kl.cdiv(pairs, block),), args, sizes,
              ("router_grad", *sizes.values()))  # fmt: skip
    return dw_TK


# ---- autograd ------------------------------------------------------------------------------


def _low_rank(product: str, la, la_strides, lb, lb_strides, scale: float, rows: int, rank: int):
    z = la.new_empty(rows, rank)
    return LowRank(la, la_strides, lb, lb_strides, scale, z, LORA_PLACEMENT[product])


def lora_products(
    a1: torch.Tensor | None,
    b1: torch.Tensor | None,
    a2: torch.Tensor | None,
    b2: torch.Tensor | None,
    scale: float,
    rows: int,
    *names: str,
) -> dict[str, LowRank | None]:
    """Split-LoRA's rank-r products ``names`` (of ``LORA_PLACEMENT``), each a LowRank with its
    ``z`` buffer, or None without LoRA: forward x A1^T ("up") and act A2^T ("down"), backward
    dout B2 ("bwd_down", B2 [E, H, r] read as [E, r, H]) and dh B1 ("bwd_up")."""
    if a1 is None:
        return dict.fromkeys(names)
    factors = {
        "up": (a1, a1.stride(), b1, b1.stride()),
        "down": (a2, a2.stride(), b2, b2.stride()),
        "bwd_down": (b2, _t(b2), a2, _t(a2)),
        "bwd_up": (b1, _t(b1), a1, _t(a1)),
    }
    rank = {"up": a1.shape[1], "bwd_up": a1.shape[1], "down": a2.shape[1], "bwd_down": a2.shape[1]}
    return {n: _low_rank(n, *factors[n], scale, rows, rank[n]) for n in names}


# The four grouped products of a step, shared by the autograd function and the stage benchmark.


def up_projection(
    x_TH: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    lora: LowRank | None,
    plan: DispatchPlan,
    tiles: torch.Tensor,
    oai: bool,
    want_act: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h [N, 2I], act [N, I]``: act = swiglu(x[token] W1^T + s z1 B1^T + b1), z1 into lora.z;
    act is None (never written) without ``want_act``, as when backward recomputes h."""
    rows, (two_inter, hidden) = plan.token_N.numel(), gate_up.shape[1:]
    h_NG = x_TH.new_empty(rows, two_inter)
    act_NI = x_TH.new_empty(rows, two_inter // 2) if want_act else None
    # fmt: off
    expert_gemm(x_TH, gate_up, gate_up.stride(), two_inter // 2, hidden, tiles,
                h_NG if act_NI is None else act_NI, gather=plan.token_N,
                epilogue=tk.SWIGLU_FWD, h=h_NG, oai=oai, lora=lora, bias=gate_up_bias,
                act_out=want_act)
    # fmt: on
    return h_NG, act_NI


def down_projection(
    act_NI: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor | None,
    lora: LowRank | None,
    plan: DispatchPlan,
    tiles: torch.Tensor,
) -> torch.Tensor:
    """``y [N, H]`` in (token, slot) order: act W2^T + s z2 B2^T + b2, z2 into lora.z."""
    hidden, inter = down.shape[1:]
    y_slots = act_NI.new_empty(act_NI.shape[0], hidden)
    # fmt: off
    expert_gemm(act_NI, down, down.stride(), hidden, inter, tiles, y_slots,
                scatter=plan.order_N, bias=down_bias, lora=lora)
    # fmt: on
    return y_slots


def down_backward(
    dout_TH: torch.Tensor,
    down: torch.Tensor,
    h_NG: torch.Tensor,
    w_N: torch.Tensor,
    lora: LowRank | None,
    plan: DispatchPlan,
    tiles: torch.Tensor,
    oai: bool,
    want_actw: bool,
    main: str | None = None,
    weight_grad: bool = False,
    weight_grad_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``dh [N, 2I]``, router partials ``[N, I / 32]``, ``w act [N, I]`` (or None) and, with
    ``weight_grad``, dW2 ``[E, H, I]`` (else None) from g = dout W2 + s u2 A2, u2 = dout B2
    into lora.z.

    g comes from the fused kernel's own main loop (``"triton"``), or is stored by a product of
    its own and then read by the same epilogue alone: our grouped GEMM gathering dout's rows in
    its loads, LoRA included (``"gathered"``), or torch's over a gathered copy of dout
    (``"torch"``). The epilogue's registers keep the fused kernel's column block narrow, so it
    re-reads each row of dout I / BLOCK_N times. ``DOWN_BACKWARD_MAIN`` fixes the choice; else
    it is measured once per shape and machine and kept on disk like the LoRA placement (the
    torch loop only while its transient copies stay under ``_TORCH_MAIN_LOOP_MAX_BYTES``);
    ``main`` overrides both.
    ``weight_grad`` (full fine-tune) also gives dW2 = sum dout^T (w act) per expert, on the torch
    loop's gathered dout where that loop ran (one gather instead of two). The main loop is then
    measured together with dW2's product: the other loops' time alone leaves out the copy of
    dout that dW2 makes for itself after them (run 107's cache held "gathered" for Qwen3 full).
    With ``weight_grad_into`` (``down``'s ``.grad``, see ``tg.adds_in_place``) dW2 is added
    into it instead, and None returned; the measured choice then adds into a scratch copy.
    """
    hidden, inter = down.shape[1:]
    rows = h_NG.shape[0]
    dh_NG = h_NG.new_empty(rows, 2 * inter)
    dw_parts = h_NG.new_empty(rows, kl.cdiv(inter, _DW_COLS), dtype=torch.float32)
    act_w = h_NG.new_empty(rows, inter) if want_actw else None
    epilogue = dict(epilogue=tk.SWIGLU_BWD, h=h_NG, w_rows=w_N, dw=dw_parts, act_w=act_w, oai=oai)

    def epilogue_alone(g_NI: torch.Tensor, low: LowRank | None = None) -> None:
        # fmt: off
        _launch(g_NI, down, _t(down), inter, 0, tiles, dh_NG, lora=low, acc_in=True,
                tuned_as=_EPILOGUE_ONLY, **epilogue)
        # fmt: on

    def run(main: str) -> torch.Tensor | None:
        if main == "triton":
            # fmt: off
            expert_gemm(dout_TH, down, _t(down), inter, hidden, tiles, dh_NG,
                        gather=plan.token_N, lora=lora, **epilogue)
            # fmt: on
            return None
        if main == "gathered":
            g_NI = h_NG.new_empty(rows, inter)
            # fmt: off
            expert_gemm(dout_TH, down, _t(down), inter, hidden, tiles, g_NI,
                        gather=plan.token_N, lora=lora)
            # fmt: on
            epilogue_alone(g_NI)
            return None
        dout_NH = tg.gather_rows(dout_TH, plan.token_N)
        g_NI = gmm._gmm(dout_NH, down, plan.offs_E)
        low = None if lora is None else lora._replace(placement=tk.LORA_GIVEN)
        if low is not None:
            rank_r_product(dout_NH, low, hidden, tiles)
        if not weight_grad:
            dout_NH = None  # freed before the epilogue runs
        epilogue_alone(g_NI, low)
        return dout_NH

    def run_all(main: str, into: torch.Tensor | None = weight_grad_into) -> torch.Tensor | None:
        gathered_NH = run(main)
        if not weight_grad:
            return None
        if into is not None:
            if gathered_NH is None:
                gathered_NH = tg.gather_rows(dout_TH, plan.token_N)
            tg.add_weight_grad(into, gathered_NH, act_w, plan.offs_E)
            return None
        return tg.weight_grad(dout_TH, act_w, plan, out_jd=False, gathered_ND=gathered_NH)

    main = main or DOWN_BACKWARD_MAIN
    if main is None:
        if not tuning.measures(dout_TH):
            main = "triton"
        else:
            extra = rows * (hidden + inter) * dout_TH.element_size()
            torch_ok = extra <= _TORCH_MAIN_LOOP_MAX_BYTES
            in_place = weight_grad_into is not None
            key = ("down_backward", hidden, inter, tuning.rows_bucket(rows), lora is not None,
                   str(dout_TH.dtype), torch_ok, weight_grad, in_place)  # fmt: skip
            scratch: list[torch.Tensor] = []  # made only if this key is measured now

            def measured_run(candidate: str) -> torch.Tensor | None:
                if in_place and not scratch:
                    scratch.append(torch.empty_like(weight_grad_into))
                return run_all(candidate, scratch[0] if in_place else None)

            # fmt: off
            candidates = _main_loops.allowed if torch_ok else ("triton", "gathered")
            main = tuning.measured_choice(_main_loops, "down-projection backward", key,
                                          measured_run, dout_TH.device, _GEMM_KERNELS, candidates)
            # fmt: on
            scratch.clear()
    return dh_NG, dw_parts, act_w, run_all(main)


def up_backward(
    dh_NG: torch.Tensor,
    gate_up: torch.Tensor,
    lora: LowRank | None,
    plan: DispatchPlan,
    tiles: torch.Tensor,
) -> torch.Tensor:
    """``dX [N, H]`` in (token, slot) order: dh W1 + s u1 A1, u1 = dh B1 into lora.z."""
    two_inter, hidden = gate_up.shape[1:]
    dx_slots = dh_NG.new_empty(dh_NG.shape[0], hidden)
    # fmt: off
    expert_gemm(dh_NG, gate_up, _t(gate_up), hidden, two_inter, tiles, dx_slots,
                scatter=plan.order_N, lora=lora)
    # fmt: on
    return dx_slots


def _only(need: tuple[bool, ...], index: int) -> tuple[bool, ...]:
    """``needs_input_grad`` with every gradient but ``index`` off (the biases' gradients are
    left to the grouped_mm backend's helpers; the rest are computed here)."""
    return tuple(n and i == index for i, n in enumerate(need))


def _z(lora: LowRank | None) -> torch.Tensor | None:
    return None if lora is None else lora.z


class _TritonExperts(torch.autograd.Function):
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
        recompute,
    ):
        num_experts, top_k = gate_up.shape[0], experts_TK.shape[1]
        ctx.empty = experts_TK.numel() == 0
        if ctx.empty:  # no tokens (or no slots): nothing routed, zero output and gradients
            ctx.save_for_backward(x_TH, weights_TK, experts_TK, gate_up, down, gate_up_bias,
                                  down_bias, a1, b1, a2, b2)  # fmt: skip
            return x_TH.new_zeros(x_TH.shape[0], down.shape[1])
        plan, tiles, w_N = dispatch_tiles(experts_TK, num_experts, weights_TK)
        rows = plan.token_N.numel()
        oai = activation == "swiglu_oai"
        low = lora_products(a1, b1, a2, b2, scale, rows, "up", "down")
        h_NG, act_NI = up_projection(x_TH, gate_up, gate_up_bias, low["up"], plan, tiles, oai)
        y_slots = down_projection(act_NI, down, down_bias, low["down"], plan, tiles)
        del act_NI
        out_TH = combine_rows(y_slots, top_k, weights_TK.reshape(-1).contiguous())
        # fmt: off
        ctx.save_for_backward(x_TH, weights_TK, experts_TK, gate_up, down, gate_up_bias,
                              down_bias, a1, b1, a2, b2, None if recompute else h_NG,
                              _z(low["up"]), _z(low["down"]), tiles, w_N, *plan.tensors())
        # fmt: on
        ctx.scale, ctx.activation = scale, activation
        return out_TH

    @staticmethod
    @first_order_backward("the triton expert MLP")
    def backward(ctx, dout_TH):
        if ctx.empty:
            zeros = [torch.zeros_like(t) if n and t is not None else None
                     for t, n in zip(ctx.saved_tensors, ctx.needs_input_grad)]  # fmt: skip
            return (*zeros, None, None, None)
        # fmt: off
        (x_TH, weights_TK, experts_TK, gate_up, down, gate_up_bias, down_bias,
         a1, b1, a2, b2, h_NG, z1, z2, tiles, w_N, *plan_tensors) = ctx.saved_tensors
        # fmt: on
        plan = DispatchPlan(*plan_tensors)
        need, s = ctx.needs_input_grad, ctx.scale
        num_experts, top_k = gate_up.shape[0], experts_TK.shape[1]
        oai = ctx.activation == "swiglu_oai"
        grads = [None] * 14
        dout_TH = dout_TH.contiguous()
        rows = plan.token_N.numel()
        if h_NG is None:  # recompute: the forward's up projection again
            up = lora_products(a1, b1, a2, b2, s, rows, "up")["up"]
            # fmt: off
            h_NG, _ = up_projection(x_TH, gate_up, gate_up_bias, up, plan, tiles, oai,
                                    want_act=False)
            # fmt: on
        low = lora_products(a1, b1, a2, b2, s, rows, "bwd_down", "bwd_up")

        # weights whose gradient is added into their .grad here (gradient accumulation)
        # fmt: off
        w1_into = need[3] and tg.adds_in_place(gate_up, ctx.create_graph)
        w2_into = need[4] and tg.adds_in_place(down, ctx.create_graph)
        # down projection backward, fused with dSwiGLU and the router gradient's partials
        dh_NG, dw_parts, act_w, grads[4] = down_backward(
            dout_TH, down, h_NG, w_N, low["bwd_down"], plan, tiles, oai,
            want_actw=need[9] or need[4], weight_grad=need[4],
            weight_grad_into=down.grad if w2_into else None)
        # fmt: on
        if need[1]:
            grads[1] = router_grad(dw_parts, plan, dout_TH, down_bias, experts_TK)

        # the down projection's LoRA gradients now, so that w * act is freed before the up
        # projection's [N, H] dX buffer exists (a lower peak)
        # fmt: off
        tg.lora_down_grads(need, s, plan, dout_TH, w_N, act_w, _z(low["bwd_down"]), z2, a2, b2,
                           grads, create_graph=ctx.create_graph)
        gmm.down_grads(_only(need, 6), s, plan, dout_TH, None, None, None, None, None,
                       weights_TK, experts_TK, down_bias, num_experts, grads)
        # fmt: on
        del act_w

        # up projection backward: dX to slots, summed per token (and u1 = dh B1 for dA1)
        if need[0]:
            dx_slots = up_backward(dh_NG, gate_up, low["bwd_up"], plan, tiles)
            grads[0] = combine_rows(dx_slots, top_k, None)
            del dx_slots
        elif need[7]:  # x frozen: u1 alone, not the [N, 2I] x [2I, H] product
            rank_r_product(dh_NG, low["bwd_up"], gate_up.shape[1], tiles)
        # weight, LoRA and bias gradients: varlen-K grouped products over the sorted rows
        # fmt: off
        tg.lora_up_grads(need, s, plan, x_TH, dh_NG, _z(low["bwd_up"]), z1, a1, b1, grads,
                         create_graph=ctx.create_graph)
        # fmt: on
        if w1_into:
            x_NH = tg.gather_rows(x_TH, plan.token_N)
            tg.add_weight_grad(gate_up.grad, dh_NG, x_NH, plan.offs_E)
            del x_NH
        elif need[3]:
            grads[3] = tg.weight_grad(x_TH, dh_NG, plan, out_jd=True)
        gmm.up_grads(_only(need, 5), s, plan, x_TH, dh_NG, None, None, grads)
        return tuple(grads)


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
    recompute: bool = False,
) -> torch.Tensor:
    # fmt: off
    return gmm.apply_function(_TritonExperts, x_TH.contiguous(), weights_TK.contiguous(),
                              experts_TK, gate_up_EGH, down_EHI, gate_up_bias_EG, down_bias_EH,
                              activation, lora, recompute)
    # fmt: on
