"""``triton``: fused expert-MLP kernels (``triton_kernels.py``), their launchers, one autograd.

Forward, over expert-sorted rows (dispatch in :mod:`moelab.ops.dispatch`)::

    z1 = x[token] A1^T                                   rank-r launch, gathers x
    h, act = swiglu(x[token] W1^T + s z1 B1^T + b1)      gather in the A-load, act in epilogue
    z2 = act A2^T                                        rank-r launch
    y[slot] = act W2^T + s z2 B2^T + b2                  written to (token, slot) order
    out[t] = sum_j w[t, j] y[t, j]                       combine kernel, fp32, slot order

Backward::

    u2 = dout[token] B2                                  rank-r launch
    g = dout[token] W2 + s u2 A2                         epilogue: dw = <g, act>, dh = act'(h, w g),
                                                         w act (for weight gradients)
    u1 = dh B1;  dxs[slot] = dh W1 + s u1 A1;  dx[t] = sum_j dxs[t, j]
    LoRA dA/dB, dW and bias gradients: varlen-K grouped products (torch grouped_mm).

Saved for backward: x, h ``[N, 2I]``, the rank-r products z1, z2, the routing weights and the
int plan and tile table. No host synchronisation, no atomics: same bits on every run.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from moelab.kernels import grouped_mm as gmm
from moelab.kernels import triton_kernels as tk
from moelab.kernels.problem import ExpertProblem
from moelab.ops.dispatch import DispatchPlan, dispatch
from moelab.ops.lora import ExpertLoRA

NAME = "triton"
log = logging.getLogger("moelab")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_RANK = 128
_tuned_logged: set[tuple] = set()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def machine_reason() -> str | None:
    if not (torch.cuda.is_available() or _interpreting()):
        return "needs a CUDA GPU (or TRITON_INTERPRET=1, Triton's CPU interpreter)"
    return None


def unsupported_reason(problem: ExpertProblem) -> str | None:
    if problem.device.type == "cpu" and not _interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    if problem.device.type not in ("cpu", "cuda"):
        return f"runs on CUDA (or the CPU interpreter), not {problem.device.type}"
    if problem.accumulate != "fp32":
        return "triton sums the k expert outputs in fp32 only"
    if problem.lora_rank > _MAX_RANK:
        return f"LoRA rank {problem.lora_rank} exceeds {_MAX_RANK}"
    # weight and LoRA gradients use torch's grouped GEMM, with its alignment rules
    return gmm.unsupported_reason(problem)


def auto_reason(problem: ExpertProblem) -> str | None:
    """Why ``auto`` does not pick triton although it could run.

    NOTE: measured on an H200 on 2026-11-29 (BENCHMARKS.md), this version was slower than
    grouped_mm in LoRA mode at both reference shapes (its grouped GEMM kernel reaches about
    150 TFLOP/s against CUTLASS's 450+), so auto keeps grouped_mm until a measurement says
    otherwise; ``backend="triton"`` still runs it.
    """
    if problem.device.type != "cuda":
        return "the CPU interpreter is for tests; ask for triton by name"
    return "measured slower than grouped_mm (BENCHMARKS.md); ask for triton by name"


def saved_bytes_per_token(problem: ExpertProblem, itemsize: int) -> int:
    """Activation bytes kept for backward per token (x, h, z1, z2, routing and plan ints)."""
    k, r = problem.top_k, problem.lora_rank
    return itemsize * (problem.hidden + k * (2 * problem.inter + 2 * r)) + k * (4 + 5 * 8)


# ---- launchers ------------------------------------------------------------------------------


def _block_m(num_rows: int, num_experts: int) -> int:
    return 64 if num_rows < 128 * num_experts else 128


def tile_table(offs_E: torch.Tensor, num_rows: int, block_m: int) -> torch.Tensor:
    """``[3, tiles]`` int32: expert (-1 for padding), first row, end row of each row tile.

    Sized for the worst case ``ceil(N / BM) + E`` so the grid is known without a host sync.
    """
    num_experts = offs_E.numel()
    ends = offs_E.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    tiles = (counts + block_m - 1) // block_m
    cum = tiles.cumsum(0)
    ids = torch.arange(triton_cdiv(num_rows, block_m) + num_experts, device=offs_E.device)
    expert = torch.searchsorted(cum, ids, right=True)
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    start = ends[e] - counts[e] + (ids - (cum[e] - tiles[e])) * block_m
    return torch.stack([torch.where(valid, e, -1), start, ends[e]]).to(torch.int32)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _configs(dual: bool) -> list[dict]:
    blocks = (64,) if dual else (64, 128)
    return [
        dict(BLOCK_N=bn, BLOCK_K=64, num_warps=w, num_stages=3) for bn in blocks for w in (4, 8)
    ]


def _autotune_enabled() -> bool:
    return not _interpreting() and os.environ.get("MOELAB_TRITON_AUTOTUNE", "1") != "0"


_tuned_kernels: dict[bool, object] = {}


def _tuned(dual: bool):
    if dual not in _tuned_kernels:
        import triton

        configs = [
            triton.Config(
                {"BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]},
                num_warps=c["num_warps"],
                num_stages=c["num_stages"],
            )
            for c in _configs(dual)
        ]
        extra = (
            {"cache_results": True}
            if "cache_results" in triton.autotune.__code__.co_varnames
            else {}
        )
        _tuned_kernels[dual] = triton.autotune(
            configs, key=["n_out", "k_dim", "EPILOGUE", "LORA", "GATHER", "SCATTER"], **extra
        )(tk._expert_gemm_kernel)
    return _tuned_kernels[dual]


def expert_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    w_strides: tuple[int, int, int],
    n_out: int,
    k_dim: int,
    tiles: torch.Tensor,
    block_m: int,
    out: torch.Tensor,
    *,
    gather: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, tuple[int, int, int], float] | None = None,
    bias: torch.Tensor | None = None,
    epilogue: int = tk.STORE,
    h: torch.Tensor | None = None,
    w_rows: torch.Tensor | None = None,
    dw: torch.Tensor | None = None,
    act_w: torch.Tensor | None = None,
    oai: bool = False,
    block_n: int | None = None,
) -> torch.Tensor:
    """One grouped product over the tile table; see ``triton_kernels`` for the epilogues.

    ``w_strides`` are W's (expert, out feature, reduction) strides, so one kernel reads W1,
    W2 and the LoRA factors in either orientation without copies. ``block_n`` fixes the
    column block (rank-r launches); otherwise the block shape is autotuned when enabled.
    """
    z, lb, lb_strides, scale = lora if lora is not None else (None, None, (0, 0, 0), 0.0)
    rank = z.shape[1] if z is not None else 0
    dummy = a  # never read: its branch is compiled out
    args = (
        a,
        gather if gather is not None else dummy,
        a.stride(0),
        a.stride(1),
        w,
        *w_strides,
        z if z is not None else dummy,
        *(z.stride() if z is not None else (0, 0)),
        lb if lb is not None else dummy,
        *lb_strides,
        bias if bias is not None else dummy,
        *(bias.stride() if bias is not None else (0, 0)),
        tiles[0],
        tiles[1],
        tiles[2],
        out,
        out.stride(0),
        out.stride(1),
        scatter if scatter is not None else dummy,
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
        float(scale),
    )
    flags = dict(
        EPILOGUE=epilogue,
        GATHER=gather is not None,
        SCATTER=scatter is not None,
        LORA=lora is not None,
        BIAS=bias is not None,
        OAI=oai,
        STORE_ACTW=act_w is not None,
        UPCAST=_interpreting(),
        PRECISION="ieee" if a.dtype == torch.float32 else None,
        BLOCK_M=block_m,
        BLOCK_R=max(16, triton_next_pow2(rank)),
    )
    rows_grid = tiles.shape[1]
    if block_n is None and _autotune_enabled():
        kernel = _tuned(epilogue == tk.SWIGLU_FWD)
        key = (epilogue, n_out, k_dim, flags["LORA"], flags["GATHER"], str(a.dtype))
        t0 = time.perf_counter()
        kernel[lambda meta: (rows_grid, triton_cdiv(n_out, meta["BLOCK_N"]))](*args, **flags)
        if key not in _tuned_logged:
            _tuned_logged.add(key)
            log.info(
                "moelab: triton tuning for %s took %.1f s (then cached on disk)",
                key,
                time.perf_counter() - t0,
            )
        return out
    cfg = _configs(epilogue == tk.SWIGLU_FWD)[0]
    if block_n is not None:
        cfg = dict(cfg, BLOCK_N=block_n)
    grid = (rows_grid, triton_cdiv(n_out, cfg["BLOCK_N"]))
    tk._expert_gemm_kernel[grid](
        *args,
        **flags,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def low_rank(a, factor, strides, rank, rows, tiles, block_m, gather=None) -> torch.Tensor:
    """``[N, r]`` product of the (gathered) sorted rows with a rank-r LoRA factor."""
    out = a.new_empty(rows, rank)
    return expert_gemm(
        a,
        factor,
        strides,
        rank,
        a.shape[1],
        tiles,
        block_m,
        out,
        gather=gather,
        block_n=max(16, triton_next_pow2(rank)),
    )


def combine_rows(y_NH: torch.Tensor, top_k: int, weights_N: torch.Tensor | None) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] y[t * K + j]`` (rows in slot order), fp32, fixed order."""
    rows, hidden = y_NH.shape
    out = y_NH.new_empty(rows // top_k, hidden)
    block = min(1024, max(16, triton_next_pow2(hidden)))
    grid = (rows // top_k, triton_cdiv(hidden, block))
    tk._combine_kernel[grid](
        y_NH,
        weights_N if weights_N is not None else y_NH,
        out,
        hidden,
        y_NH.stride(0),
        out.stride(0),
        TOP_K=top_k,
        HAS_W=weights_N is not None,
        UPCAST=_interpreting(),
        BLOCK_H=block,
    )
    return out


# ---- autograd ------------------------------------------------------------------------------


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
    ):
        num_tokens, hidden = x_TH.shape
        num_experts, two_inter, _ = gate_up.shape
        inter, top_k = two_inter // 2, experts_TK.shape[1]
        plan = dispatch(experts_TK, num_experts)
        rows = plan.token_N.numel()
        bm = _block_m(rows, num_experts)
        tiles = tile_table(plan.offs_E, rows, bm)
        oai = activation == "swiglu_oai"
        z1 = z2 = None
        if a1 is not None:
            z1 = low_rank(x_TH, a1, a1.stride(), a1.shape[1], rows, tiles, bm, gather=plan.token_N)
        h_NG = x_TH.new_empty(rows, two_inter)
        act_NI = x_TH.new_empty(rows, inter)
        expert_gemm(
            x_TH,
            gate_up,
            gate_up.stride(),
            inter,
            hidden,
            tiles,
            bm,
            act_NI,
            gather=plan.token_N,
            epilogue=tk.SWIGLU_FWD,
            h=h_NG,
            oai=oai,
            lora=None if a1 is None else (z1, b1, b1.stride(), scale),
            bias=gate_up_bias,
        )
        if a2 is not None:
            z2 = low_rank(act_NI, a2, a2.stride(), a2.shape[1], rows, tiles, bm)
        y_slots = x_TH.new_empty(rows, hidden)
        expert_gemm(
            act_NI,
            down,
            down.stride(),
            hidden,
            inter,
            tiles,
            bm,
            y_slots,
            scatter=plan.order_N,
            bias=down_bias,
            lora=None if a2 is None else (z2, b2, b2.stride(), scale),
        )
        out_TH = combine_rows(y_slots, top_k, weights_TK.reshape(-1).contiguous())
        # fmt: off
        ctx.save_for_backward(x_TH, weights_TK, experts_TK, gate_up, down, down_bias,
                              a1, b1, a2, b2, h_NG, z1, z2, tiles, *plan.tensors())
        # fmt: on
        ctx.scale, ctx.activation, ctx.block_m = scale, activation, bm
        return out_TH

    @staticmethod
    def backward(ctx, dout_TH):
        # fmt: off
        (x_TH, weights_TK, experts_TK, gate_up, down, down_bias,
         a1, b1, a2, b2, h_NG, z1, z2, tiles, *plan_tensors) = ctx.saved_tensors
        # fmt: on
        plan = DispatchPlan(*plan_tensors)
        need, s, bm = ctx.needs_input_grad, ctx.scale, ctx.block_m
        num_experts, two_inter, hidden = gate_up.shape
        inter, top_k, rows = two_inter // 2, experts_TK.shape[1], plan.token_N.numel()
        oai = ctx.activation == "swiglu_oai"
        grads = [None] * 13
        dout_TH = dout_TH.contiguous()
        w_N = weights_TK.reshape(-1).index_select(0, plan.order_N).contiguous()

        # down projection backward: g = dout W2 (+ s u2 A2), fused with dSwiGLU and dw
        u2 = None
        if a2 is not None:  # B2 [E, H, r] read as [E, r, H]
            u2 = low_rank(
                dout_TH,
                b2,
                (b2.stride(0), b2.stride(2), b2.stride(1)),
                b2.shape[2],
                rows,
                tiles,
                bm,
                gather=plan.token_N,
            )
        dh_NG = h_NG.new_empty(rows, two_inter)
        dw_parts = torch.zeros(
            rows, triton_cdiv(inter, 64), device=h_NG.device, dtype=torch.float32
        )
        want_actw = a2 is not None or need[4]
        act_w = h_NG.new_empty(rows, inter) if want_actw else None
        expert_gemm(
            dout_TH,
            down,
            (down.stride(0), down.stride(2), down.stride(1)),
            inter,
            hidden,
            tiles,
            bm,
            dh_NG,
            gather=plan.token_N,
            epilogue=tk.SWIGLU_BWD,
            h=h_NG,
            w_rows=w_N,
            dw=dw_parts,
            act_w=act_w,
            oai=oai,
            lora=None if a2 is None else (u2, a2, (a2.stride(0), a2.stride(2), a2.stride(1)), s),
        )
        if need[1]:
            grads[1] = gmm.router_grad(dw_parts.sum(1), plan, dout_TH, down_bias, experts_TK)

        # up projection backward
        u1 = None
        if a1 is not None:  # B1 [E, 2I, r] read as [E, r, 2I]
            u1 = low_rank(
                dh_NG, b1, (b1.stride(0), b1.stride(2), b1.stride(1)), b1.shape[2], rows, tiles, bm
            )
        if need[0]:
            dx_slots = dh_NG.new_empty(rows, hidden)
            expert_gemm(
                dh_NG,
                gate_up,
                (gate_up.stride(0), gate_up.stride(2), gate_up.stride(1)),
                hidden,
                two_inter,
                tiles,
                bm,
                dx_slots,
                scatter=plan.order_N,
                lora=None
                if a1 is None
                else (u1, a1, (a1.stride(0), a1.stride(2), a1.stride(1)), s),
            )
            grads[0] = combine_rows(dx_slots, top_k, None)

        # weight, LoRA and bias gradients: varlen-K grouped products over the sorted rows
        dout_NH = dout_TH.index_select(0, plan.token_N) if need[4] or need[10] else None
        gmm.down_grads(
            need,
            s,
            plan,
            dout_TH,
            dout_NH,
            act_w,
            u2,
            z2,
            w_N[:, None],
            weights_TK,
            experts_TK,
            down_bias,
            num_experts,
            grads,
        )
        gmm.up_grads(need, s, plan, x_TH, dh_NG, u1, z1, grads)
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
) -> torch.Tensor:
    a1, b1, a2, b2 = lora.tensors() if lora is not None else (None,) * 4
    scale = float(lora.scale) if lora is not None else 0.0
    return _TritonExperts.apply(
        x_TH.contiguous(),
        weights_TK.contiguous(),
        experts_TK,
        gate_up_EGH,
        down_EHI,
        gate_up_bias_EG,
        down_bias_EH,
        a1,
        b1,
        a2,
        b2,
        scale,
        activation,
    )
