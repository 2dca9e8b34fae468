"""Triton kernels of the ``triton`` expert backend (launchers and autograd: ``triton.py``).

One grouped GEMM serves every expert product. Programs walk a tile table (expert, first row,
end row) over the expert-sorted rows; A is read from token order through a row index when
``GATHER`` (no permuted copy of x or dout), W by TMA where it can (``W_DESC``), results go to
(token, slot) order when ``SCATTER``. Plain stores over sorted rows: the persistent kernel below.
Epilogues:
- ``STORE``: ``A W_e^T (+ s z B_e^T) (+ b_e)`` as it is.
- ``SWIGLU_FWD``: the gate and up tiles side by side in one accumulator; stores the
  pre-activation h and (unless ``ACT_OUT`` is off) the activation, computed from the rounded
  h, exactly what backward recomputes.
- ``SWIGLU_BWD``: the accumulator is ``g = dY W2`` before the routing weight; recomputes the
  activation from h, writes the per-row partial ``<g, act>`` (the router gradient, no expert
  outputs kept), ``dh = act'(h, w g)`` and optionally ``w * act`` for weight gradients.

Split-LoRA's ``z = A la_e^T`` either rides along the main loop's A tiles (``LORA_IN_LOOP``:
every column block recomputes it, r / BLOCK_N more MMA work instead of another pass over A)
or comes from a rank-r launch of this kernel (``LORA_GIVEN``); the launcher picks per product.

Shape suffixes: see :mod:`moelab.ops`. ``UPCAST`` makes both dot operands fp32: Triton's CPU
interpreter returns garbage for bf16 dots (kernel-notes.md), the GPU keeps bf16 tensor cores.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.tools.ragged_tma import load_ragged

STORE, SWIGLU_FWD, SWIGLU_BWD = 0, 1, 2
LORA_NONE, LORA_IN_LOOP, LORA_GIVEN = 0, 1, 2


# GPT-OSS clamped SwiGLU: limit 7.0, alpha 1.702 (moelab.ops.activations.OAI_LIMIT, OAI_ALPHA)
@triton.jit
def _act_fwd(gate, up, OAI: tl.constexpr):
    if OAI:
        g = tl.minimum(gate, 7.0)
        u = tl.minimum(tl.maximum(up, -7.0), 7.0)
        return (u + 1.0) * g * tl.sigmoid(1.702 * g)
    return gate * tl.sigmoid(gate) * up


@triton.jit
def _act_bwd(gate, up, dact, OAI: tl.constexpr):
    if OAI:
        g = tl.minimum(gate, 7.0)
        u = tl.minimum(tl.maximum(up, -7.0), 7.0)
        sig = tl.sigmoid(1.702 * g)
        glu = g * sig
        dup = tl.where(tl.abs(up) > 7.0, 0.0, dact * glu)
        dgate = tl.where(gate > 7.0, 0.0, dact * (u + 1.0) * (sig + 1.702 * glu * (1.0 - sig)))
        return dgate, dup
    sig = tl.sigmoid(gate)
    silu = gate * sig
    return dact * up * (sig + silu * (1.0 - sig)), dact * silu


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x.to(dtype)``; under the interpreter (UPCAST), bf16 by explicit round-to-nearest-even,
    as the interpreter truncates and the GPU rounds."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile_coords(index, num_row_tiles, num_pid_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of a product's ``index``-th tile. L2-friendly order: GROUP_M row
    tiles (mostly of one expert) sweep all column tiles together, so their rows and the
    expert's weight columns are read from HBM about once."""
    in_group = GROUP_M * num_pid_n
    first_m = index // in_group * GROUP_M
    group_m = tl.minimum(num_row_tiles - first_m, GROUP_M)
    return first_m + (index % in_group) % group_m, (index % in_group) // group_m


@triton.jit
def _lora_term(
    acc,
    acc_z,
    z_ptr,
    stride_zm,
    stride_zr,
    z_desc,
    lb_ptr,
    stride_lbe,
    stride_lbn,
    stride_lbr,
    lb_desc,
    e,
    row_start,
    rows,
    row_mask,
    lb_cols,
    lb_col_mask,
    pid_n,
    rank,
    lora_scale,
    out_dtype: tl.constexpr,
    LORA: tl.constexpr,
    LB_DESC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``acc + s z lb_e^T`` over the tile's rows and ``lb_cols``. z was computed in the loop
    (``acc_z``, rounded as stored, and stored by the first column tile: the LoRA gradients
    read it) or is given (by TMA when ``LB_DESC``, else by pointer). lb by pointer, or by TMA
    over ``[E, N, r]`` (``LB_DESC`` 1) or ``[E, r, N]`` (2); without descriptors (``LB_DESC``
    0) ``z_desc`` and ``lb_desc`` are never read. ``s z`` is rounded once and accumulates into
    the main accumulator: a second fp32 tile for it would double the epilogue's registers."""
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < rank
    z_ptrs = z_ptr + rows[:, None].to(tl.int64) * stride_zm + rs[None, :] * stride_zr
    z_mask = row_mask[:, None] & r_mask[None, :]
    if LORA == 1:  # LORA_IN_LOOP
        z = _cast(acc_z, out_dtype, UPCAST)
        if pid_n == 0:
            tl.store(z_ptrs, z, mask=z_mask)
    elif LB_DESC != 0:  # given, by TMA (rows past the tile's end: never stored)
        z = z_desc.load([row_start, 0])
    else:  # given, by pointer
        z = tl.load(z_ptrs, mask=z_mask, other=0.0)
    z = _cast(z.to(tl.float32) * lora_scale, out_dtype, UPCAST)
    if LB_DESC == 1:
        lb = tl.reshape(lb_desc.load([e, pid_n * BLOCK_N, 0]), (BLOCK_N, BLOCK_R)).T
    elif LB_DESC == 2:
        lb = tl.reshape(lb_desc.load([e, 0, pid_n * BLOCK_N]), (BLOCK_R, BLOCK_N))
    else:
        lb_ptrs = (
            lb_ptr
            + e.to(tl.int64) * stride_lbe
            + lb_cols[None, :] * stride_lbn
            + rs[:, None] * stride_lbr
        )
        lb = tl.load(lb_ptrs, mask=r_mask[:, None] & lb_col_mask[None, :], other=0.0)
    return _dot(z, lb, acc, UPCAST, PRECISION)


@triton.jit
def _add_bias(acc, bias_ptr, stride_be, stride_bn, e, cols, col_mask):
    b_ptrs = bias_ptr + e.to(tl.int64) * stride_be + cols * stride_bn
    return acc + tl.load(b_ptrs, mask=col_mask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _store_rows(
    acc, out_ptr, stride_om, stride_on, out_rows_ptr, rows, row_mask, cols, col_mask,
    SCATTER: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The ``STORE`` epilogue's write: to the sorted rows, or (``SCATTER``) through
    ``out_rows``."""
    if SCATTER:
        dst = tl.load(out_rows_ptr + rows, mask=row_mask, other=0)
    else:
        dst = rows
    tl.store(
        out_ptr + dst[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on,
        _cast(acc, out_ptr.dtype.element_ty, UPCAST),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _expert_gemm_kernel(
    a_ptr,
    a_rows_ptr,
    stride_am,
    stride_ak,
    w_ptr,
    stride_we,
    stride_wn,
    stride_wk,
    w_desc,
    la_ptr,
    stride_lae,
    stride_lar,
    stride_lak,
    z_ptr,
    stride_zm,
    stride_zr,
    lb_ptr,
    stride_lbe,
    stride_lbn,
    stride_lbr,
    bias_ptr,
    stride_be,
    stride_bn,
    tiles_ptr,
    stride_tt,
    stride_tf,
    num_rows,
    num_experts,
    out_ptr,
    stride_om,
    stride_on,
    out_rows_ptr,
    h_ptr,
    stride_hm,
    stride_hn,
    actw_ptr,
    stride_xm,
    stride_xn,
    wrow_ptr,
    dw_ptr,
    stride_dwm,
    n_out,
    k_dim,
    rank,
    lora_scale,
    EPILOGUE: tl.constexpr,
    ACC_IN: tl.constexpr,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    LORA: tl.constexpr,
    BIAS: tl.constexpr,
    OAI: tl.constexpr,
    STORE_ACTW: tl.constexpr,
    ACT_OUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    W_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    num_pid_n = tl.cdiv(n_out, BLOCK_N)
    # the tile table of this BLOCK_M (TILE_BLOCKS_M): worst-case length, padding marked e = -1
    num_row_tiles = tl.cdiv(num_rows, BLOCK_M) + num_experts
    table = tiles_ptr + (BLOCK_M // 128) * stride_tt
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_row_tiles, num_pid_n, GROUP_M)
    e = tl.load(table + pid_m)
    if e < 0:
        return
    row_start = tl.load(table + stride_tf + pid_m)
    row_end = tl.load(table + 2 * stride_tf + pid_m)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    # rows past the tile's end re-read its last row: loads stay unmasked, stores are masked
    rows_in = tl.minimum(rows, row_end - 1)
    if GATHER:
        src = tl.load(a_rows_ptr + rows_in)
    else:
        src = rows_in
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_out
    if EPILOGUE == 1:  # SWIGLU_FWD
        # gate and up columns interleaved in one accumulator (the up half sits n_out rows further
        # in W): one dot twice as wide, so the MMA reads each A tile once for both halves
        c2 = tl.arange(0, 2 * BLOCK_N)
        w_cols = pid_n * BLOCK_N + c2 % BLOCK_N + (c2 // BLOCK_N) * n_out
        w_col_mask = pid_n * BLOCK_N + c2 % BLOCK_N < n_out
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    else:
        w_cols = cols
        w_col_mask = col_mask
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
    w_ptrs = (
        w_ptr + e.to(tl.int64) * stride_we + w_cols[None, :] * stride_wn + ks[:, None] * stride_wk
    )
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < rank
    la_ptrs = (
        la_ptr + e.to(tl.int64) * stride_lae + rs[None, :] * stride_lar + ks[:, None] * stride_lak
    )
    acc_z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if ACC_IN:  # the product came from another GEMM (rows in sorted order): epilogue only
        acc = tl.load(
            a_ptr + rows_in[:, None].to(tl.int64) * stride_am + cols[None, :] * stride_ak,
            mask=col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
    else:
        for k0 in range(0, k_dim, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k0 + ks)[None, :] < k_dim, other=0.0)
            if W_DESC == 1 and EPILOGUE == 1:  # [E, 2, I, K] boxes: gate and up tiles at once
                w = tl.reshape(w_desc.load([e, 0, pid_n * BLOCK_N, k0]), (2 * BLOCK_N, BLOCK_K)).T
            elif W_DESC == 1:  # [E, N, K]
                w = tl.reshape(w_desc.load([e, pid_n * BLOCK_N, k0]), (BLOCK_N, BLOCK_K)).T
            elif W_DESC == 2:  # [E, K, N]
                w = tl.reshape(w_desc.load([e, k0, pid_n * BLOCK_N]), (BLOCK_K, BLOCK_N))
            elif EVEN_K and EVEN_N:
                w = tl.load(w_ptrs)
            else:
                w_mask = ((k0 + ks)[:, None] < k_dim) & w_col_mask[None, :]
                w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            acc = _dot(a, w, acc, UPCAST, PRECISION)
            if LORA == 1:  # LORA_IN_LOOP
                la = tl.load(
                    la_ptrs, mask=((k0 + ks)[:, None] < k_dim) & r_mask[None, :], other=0.0
                )
                acc_z = _dot(a, la, acc_z, UPCAST, PRECISION)
                la_ptrs += BLOCK_K * stride_lak
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk

    out_dtype = out_ptr.dtype.element_ty
    if LORA != 0:
        # fmt: off
        # z and lb by pointer here (LB_DESC 0): the pointers stand in for the descriptors
        acc = _lora_term(acc, acc_z, z_ptr, stride_zm, stride_zr, z_ptr, lb_ptr, stride_lbe,
                         stride_lbn, stride_lbr, lb_ptr, e, row_start, rows, row_mask, w_cols,
                         w_col_mask, pid_n, rank, lora_scale, out_dtype, LORA, 0, BLOCK_N,
                         BLOCK_R, UPCAST, PRECISION)
        # fmt: on
    if BIAS:
        acc = _add_bias(acc, bias_ptr, stride_be, stride_bn, e, w_cols, w_col_mask)

    mask = row_mask[:, None] & col_mask[None, :]
    if EPILOGUE == 0:  # STORE
        # fmt: off
        _store_rows(acc, out_ptr, stride_om, stride_on, out_rows_ptr, rows, row_mask, cols,
                    col_mask, SCATTER, UPCAST)
        # fmt: on
    elif EPILOGUE == 1:  # SWIGLU_FWD
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :] * stride_hn
        gate_acc, up_acc = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
        gate = _cast(gate_acc, out_dtype, UPCAST)
        up = _cast(up_acc, out_dtype, UPCAST)
        tl.store(h_ptrs, gate, mask=mask)
        tl.store(h_ptrs + n_out * stride_hn, up, mask=mask)
        if ACT_OUT:  # off when backward recomputes h: it reads the activation from h itself
            act = _act_fwd(gate.to(tl.float32), up.to(tl.float32), OAI)
            act = _cast(act, out_dtype, UPCAST)
            tl.store(
                out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on,
                act,
                mask=mask,
            )
    else:  # SWIGLU_BWD: acc = g = dY W2 (+ LoRA), before the routing weight
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :] * stride_hn
        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + n_out * stride_hn, mask=mask, other=0.0).to(tl.float32)
        act = _cast(_act_fwd(gate, up, OAI), out_dtype, UPCAST).to(tl.float32)  # as stored
        w_row = tl.load(wrow_ptr + rows, mask=row_mask, other=0.0)
        dgate, dup = _act_bwd(gate, up, acc * w_row[:, None], OAI)
        o_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
        tl.store(o_ptrs, _cast(dgate, out_dtype, UPCAST), mask=mask)
        tl.store(o_ptrs + n_out * stride_on, _cast(dup, out_dtype, UPCAST), mask=mask)
        if STORE_ACTW:
            tl.store(
                actw_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xn,
                _cast(act * w_row[:, None], out_dtype, UPCAST),
                mask=mask,
            )
        # router partials <g, act> per 32 columns (the same layout whatever BLOCK_N is tuned
        # to), last: with gate and up dead by now the epilogue does not spill (sm_90 code)
        part = tl.sum(tl.reshape(acc * act, (BLOCK_M, BLOCK_N // 32, 32)), axis=2)
        pcols = pid_n * (BLOCK_N // 32) + tl.arange(0, BLOCK_N // 32)
        tl.store(
            dw_ptr + rows[:, None].to(tl.int64) * stride_dwm + pcols[None, :],
            part,
            mask=row_mask[:, None] & (pcols < tl.cdiv(n_out, 32))[None, :],
        )


@triton.jit
def _combine_kernel(
    y_ptr,
    w_ptr,
    out_ptr,
    hidden,
    stride_y,
    stride_o,
    TOP_K: tl.constexpr,
    HAS_W: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = sum_j w[t, j] * y[t * K + j], in slot order, fp32 accumulation."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = t.to(tl.int64) * TOP_K + j
        y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            y = y * tl.load(w_ptr + row)
        acc += y
    tl.store(
        out_ptr + t.to(tl.int64) * stride_o + cols,
        _cast(acc, out_ptr.dtype.element_ty, UPCAST),
        mask=mask,
    )


@triton.jit
def _gather_rows_kernel(
    src_ptr,
    index_ptr,
    out_ptr,
    num_rows,
    width,
    stride_s,
    EVEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[n] = src[index[n]]: a row-block by column-block copy (``EVEN``: both divide evenly,
    no masks)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    out = out_ptr + rows.to(tl.int64)[:, None] * width + cols[None, :]
    if EVEN:
        src = tl.load(index_ptr + rows).to(tl.int64)
        tl.store(out, tl.load(src_ptr + src[:, None] * stride_s + cols[None, :]))
    else:
        row_mask = rows < num_rows
        mask = row_mask[:, None] & (cols < width)[None, :]
        src = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        tl.store(out, tl.load(src_ptr + src[:, None] * stride_s + cols[None, :], mask=mask),
                 mask=mask)  # fmt: skip


@triton.jit
def _router_grad_kernel(
    parts_ptr, slot_ptr, dout_ptr, bias_ptr, experts_ptr, dw_ptr, pairs, num_parts, hidden,
    num_experts, stride_p, stride_d, stride_be, stride_bh,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """The routing weights' gradient in (token, slot) order, one (t, j) pair per row, fp32 in a
    fixed order: ``dw[t, j] = sum_c parts[slot[t, j], c] + <dout[t], b2[e[t, j]]>``, from the
    ``SWIGLU_BWD`` epilogue's per-row partials of ``<g, act>`` (the bias term when
    ``HAS_BIAS``). One launch where torch spelled a sum, a gather and, with the bias, two fp32
    copies, a GEMM over every expert, a gather and an add. An expert id outside ``[0, E)``
    reads no bias (its rows were never computed either: dispatch places them after every
    expert's)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = p < pairs
    slot = tl.load(slot_ptr + p, mask=mask, other=0)
    cs = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, num_parts, BLOCK_P):
        c = c0 + cs
        parts = tl.load(
            parts_ptr + slot[:, None] * stride_p + c[None, :],
            mask=mask[:, None] & (c < num_parts)[None, :],
            other=0.0,
        )
        acc += tl.sum(parts, axis=1)
    if HAS_BIAS:
        token = (p // TOP_K).to(tl.int64)
        expert = tl.load(experts_ptr + p, mask=mask, other=0)
        known = mask & (expert >= 0) & (expert < num_experts)
        hs = tl.arange(0, BLOCK_H)
        for h0 in range(0, hidden, BLOCK_H):
            h = h0 + hs
            both = known[:, None] & (h < hidden)[None, :]
            d = tl.load(dout_ptr + token[:, None] * stride_d + h[None, :], mask=both, other=0.0)
            b = tl.load(
                bias_ptr + expert[:, None] * stride_be + h[None, :] * stride_bh,
                mask=both,
                other=0.0,
            )
            acc += tl.sum(d.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(dw_ptr + p, acc, mask=mask)


@triton.jit
def _expert_grad_kernel(
    q_ptr,
    q_rows_ptr,
    stride_qm,
    stride_qd,
    p_ptr,
    stride_pm,
    stride_pj,
    row_scale_ptr,
    offs_ptr,
    out_ptr,
    stride_oe,
    stride_od,
    stride_oj,
    d_dim,
    p_dim,
    scale,
    GATHER: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    ADD_OUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """A per-expert gradient, ``out[e, d, j] = s * sum_{n of e} q[n, d] p[n, j]``, over one
    expert's sorted rows in row order (no atomics): a LoRA factor's (j over the rank, one
    column block) or an expert weight's (dW1, dW2). ``q`` is read from token order through a
    row index when ``GATHER``, so no gathered copy of it is made; ``p`` times a per-row weight
    when ``ROW_SCALE`` (rounded to p's dtype, as a stored product would be). An empty expert
    gets zeros. ``ADD_OUT``: added to ``out``'s values in fp32 and rounded once (a ``.grad``
    accumulated in place)."""
    e = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d_dim
    js = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    j_mask = js < p_dim
    end = tl.load(offs_ptr + e)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    acc = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        if GATHER:
            src = tl.load(q_rows_ptr + rows, mask=row_mask, other=0)
        else:
            src = rows
        q = tl.load(
            q_ptr + src[:, None].to(tl.int64) * stride_qm + cols[None, :] * stride_qd,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        p = tl.load(
            p_ptr + rows[:, None].to(tl.int64) * stride_pm + js[None, :] * stride_pj,
            mask=row_mask[:, None] & j_mask[None, :],
            other=0.0,
        )
        if ROW_SCALE:
            w = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
            p = _cast(p.to(tl.float32) * w[:, None], p_ptr.dtype.element_ty, UPCAST)
        acc = _dot(tl.trans(q), p, acc, UPCAST, PRECISION)
    out_ptrs = (
        out_ptr + e.to(tl.int64) * stride_oe + cols[:, None] * stride_od + js[None, :] * stride_oj
    )
    out_mask = col_mask[:, None] & j_mask[None, :]
    acc = acc * scale
    if ADD_OUT:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, _cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=out_mask)


@triton.jit
def _grad_tile(tile, per_expert, num_b, out_ptr, stride_oe, stride_oa, a_dim, b_dim, valid,
               BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
    """Expert, first A and B columns, output pointers and mask of a weight-gradient tile (an
    all-false mask where not ``valid``)."""
    e = tile // per_expert
    a0 = (tile % per_expert) // num_b * BLOCK_A
    b0 = (tile % per_expert) % num_b * BLOCK_B
    rows_a = a0 + tl.arange(0, BLOCK_A)
    rows_b = b0 + tl.arange(0, BLOCK_B)
    out = out_ptr + e.to(tl.int64) * stride_oe + rows_a[:, None] * stride_oa + rows_b[None, :]
    mask = (rows_a < tl.where(valid, a_dim, 0))[:, None] & (rows_b < b_dim)[None, :]
    return e, a0, b0, out, mask


@triton.jit
def _weight_grad_add_kernel(
    a_desc,
    b_desc,
    offs_ptr,
    out_ptr,
    stride_oe,
    stride_oa,
    a_dim,
    b_dim,
    num_experts,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PREFETCH: tl.constexpr,
    SM_PROGRAMS: tl.constexpr,
):
    """An expert weight's gradient added into ``out`` (the weight's ``.grad``, contiguous) in
    place: ``out[e, a, b] += sum_{n of e} A[n, a] B[n, b]`` over each expert's sorted rows,
    the old value as the accumulator's start (one rounding, no second pass over ``out``).

    Both operands by TMA, so A and B are in sorted row order (a token-order operand is gathered
    first): through the row index, its loads made this kernel ~30% slower than torch's
    grouped GEMM (BENCHMARKS.md runs 73 and 133). B's descriptor is ragged (``b_desc`` from
    ``create_ragged_descriptor``): rows past the expert's end read as zeros, so A's rows there
    (the next expert's) add nothing. Persistent programs take every num_programs-th tile,
    expert-major, so an expert's rows stay in L2 while its tiles run. ``PREFETCH``: the next
    tile's old values load before this tile's row loop, so that their latency hides under it
    (no program reads a tile another one writes). ``SM_PROGRAMS``: programs per SM, a tuned
    grid parameter the kernel does not read."""
    num_b = tl.cdiv(b_dim, BLOCK_B)
    per_expert = tl.cdiv(a_dim, BLOCK_A) * num_b
    tiles = num_experts * per_expert
    step = tl.num_programs(0)
    if PREFETCH:
        # fmt: off
        first = tl.program_id(0)
        _, _, _, out, mask = _grad_tile(first, per_expert, num_b, out_ptr, stride_oe, stride_oa,
                                        a_dim, b_dim, first < tiles, BLOCK_A, BLOCK_B)
        # fmt: on
        old_next = tl.load(out, mask=mask, other=0.0)
    for tile in tl.range(tl.program_id(0), tiles, step):
        # fmt: off
        e, a0, b0, out, mask = _grad_tile(tile, per_expert, num_b, out_ptr, stride_oe, stride_oa,
                                          a_dim, b_dim, tile < tiles, BLOCK_A, BLOCK_B)
        # fmt: on
        if PREFETCH:
            acc = old_next.to(tl.float32)
            # fmt: off
            _, _, _, out_next, mask_next = _grad_tile(tile + step, per_expert, num_b, out_ptr,
                                                      stride_oe, stride_oa, a_dim, b_dim,
                                                      tile + step < tiles, BLOCK_A, BLOCK_B)
            # fmt: on
            old_next = tl.load(out_next, mask=mask_next, other=0.0)
        else:
            acc = tl.load(out, mask=mask, other=0.0).to(tl.float32)
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(offs_ptr + e)
        for m0 in range(start, end, BLOCK_M):
            a = a_desc.load([m0, a0])
            b = load_ragged(b_desc, start, end - start, [m0 - start, b0])
            acc = _dot(tl.trans(a), b, acc, UPCAST, PRECISION)
        tl.store(out, _cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=mask)


# Row-tile heights the GEMMs are tuned over; one tile table each (``_dispatch_place_kernel``).
TILE_BLOCKS_M = (64, 128)


@triton.jit
def _dispatch_count_kernel(
    ids_ptr, hist_ptr, num_rows, num_experts, BLOCK: tl.constexpr, BINS: tl.constexpr
):
    """Dispatch, step 1: how many of each BLOCK routed rows go to each expert. Bin E takes
    ids outside ``[0, E)`` (they are placed after every expert's rows)."""
    b = tl.program_id(0)
    i = b * BLOCK + tl.arange(0, BLOCK)
    mask = i < num_rows
    bins = _dispatch_bins(ids_ptr, i, mask, num_experts)
    hist = tl.histogram(bins, BINS)
    # the rows past the end went to bin E as well
    es = tl.arange(0, BINS)
    hist -= tl.where(es == num_experts, BLOCK - tl.sum(mask.to(tl.int32), axis=0), 0)
    tl.store(hist_ptr + b * BINS + es, hist)


@triton.jit
def _dispatch_bins(ids_ptr, i, mask, num_experts):
    ids = tl.load(ids_ptr + i, mask=mask, other=0)
    valid = mask & (ids >= 0) & (ids < num_experts)
    return tl.where(valid, ids, num_experts).to(tl.int32)


@triton.jit
def _dispatch_place_kernel(
    ids_ptr,
    hist_ptr,
    num_blocks,
    offs_ptr,
    order_ptr,
    token_ptr,
    expert_ptr,
    slot_ptr,
    weights_ptr,
    sorted_weights_ptr,
    tiles_ptr,
    stride_tt,
    stride_tf,
    num_rows,
    num_experts,
    top_k,
    slots_per_program,
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    WEIGHTS: tl.constexpr,
):
    """Dispatch, step 2: every routed row to its sorted position (a stable counting sort: a
    row's position is its expert's first position, plus that expert's rows in earlier blocks,
    plus those before it in this block), with ``WEIGHTS`` its routing weight too, then this
    program's share of the tile tables. Every program sums all blocks' counts (a few KB to a
    few hundred KB, from L2): no scan launch."""
    b = tl.program_id(0)
    es = tl.arange(0, BINS)
    total = tl.zeros((BINS,), dtype=tl.int32)
    before = tl.zeros((BINS,), dtype=tl.int32)
    for b0 in range(0, num_blocks, CHUNK):
        bs = b0 + tl.arange(0, CHUNK)
        ptrs = hist_ptr + bs[:, None] * BINS + es[None, :]
        counts = tl.load(ptrs, mask=(bs < num_blocks)[:, None], other=0)
        total += tl.sum(counts, axis=0)
        before += tl.sum(tl.where((bs < b)[:, None], counts, 0), axis=0)
    ends = tl.cumsum(total, axis=0)
    starts = ends - total
    e_mask = es < num_experts
    if b == 0:
        tl.store(offs_ptr + es, ends, mask=e_mask)
    first = starts + before
    js = tl.arange(0, SUB)
    for s0 in range(0, BLOCK, SUB):
        i = b * BLOCK + s0 + js
        mask = i < num_rows
        bins = _dispatch_bins(ids_ptr, i, mask, num_experts)
        earlier = (bins[:, None] == bins[None, :]) & (js[None, :] < js[:, None])
        pos = tl.sum(earlier.to(tl.int32), axis=1) + tl.gather(first, bins, axis=0)
        tl.store(order_ptr + pos, i, mask=mask)
        tl.store(token_ptr + pos, i // top_k, mask=mask)
        tl.store(expert_ptr + pos, tl.load(ids_ptr + i, mask=mask, other=0), mask=mask)
        tl.store(slot_ptr + i, pos, mask=mask)
        if WEIGHTS:
            tl.store(sorted_weights_ptr + pos, tl.load(weights_ptr + i, mask=mask), mask=mask)
        first += tl.histogram(bins, BINS)

    # tile tables, one per height in TILE_BLOCKS_M: each expert's rows cut into row tiles,
    # listed expert by expert; field 0 the expert (-1 past the last tile), 1 the first row,
    # 2 the expert's end row; ceil(N / 64) + E slots (the worst case: no host sync); field 3's
    # first slot the number of row tiles listed
    for h in tl.static_range(2):
        block_m = 64 * (h + 1)  # TILE_BLOCKS_M[h]
        tiles = tl.where(e_mask, (total + block_m - 1) // block_m, 0)
        first_tiles = tl.cumsum(tiles, axis=0) - tiles
        if b == 0:
            tl.store(tiles_ptr + h * stride_tt + 3 * stride_tf, tl.sum(tiles, axis=0))
        for t0 in range(b * slots_per_program, (b + 1) * slots_per_program, BLOCK_T):
            ids = t0 + tl.arange(0, BLOCK_T)
            # a slot's expert: how many experts' tiles all come before it
            ahead = (first_tiles + tiles)[None, :] <= ids[:, None]
            e = tl.sum((ahead & e_mask[None, :]).to(tl.int32), axis=1)
            start = (
                tl.gather(starts, e, axis=0) + (ids - tl.gather(first_tiles, e, axis=0)) * block_m
            )
            valid = e < num_experts
            slot_mask = ids < tl.cdiv(num_rows, block_m) + num_experts
            row = tiles_ptr + h * stride_tt + ids
            tl.store(row, tl.where(valid, e, -1), mask=slot_mask)
            tl.store(row + stride_tf, tl.where(valid, start, 0), mask=slot_mask)
            tl.store(
                row + 2 * stride_tf, tl.where(valid, tl.gather(ends, e, axis=0), 0), mask=slot_mask
            )


@triton.jit
def _persistent_gemm_kernel(
    a_desc,
    w_desc,
    z_desc,
    lb_desc,
    la_ptr,
    stride_lae,
    stride_lar,
    stride_lak,
    z_ptr,
    stride_zm,
    stride_zr,
    lb_ptr,
    stride_lbe,
    stride_lbn,
    stride_lbr,
    bias_ptr,
    stride_be,
    stride_bn,
    tiles_ptr,
    stride_tt,
    stride_tf,
    num_rows,  # (the autotuner's key and pruning)
    num_experts,
    out_ptr,
    stride_om,
    stride_on,
    out_rows_ptr,
    n_out,
    k_dim,
    rank,
    lora_scale,
    SCATTER: tl.constexpr,
    LORA: tl.constexpr,
    BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    W_DESC: tl.constexpr,
    LB_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    SM_PROGRAMS: tl.constexpr,
):
    """The ``STORE`` product over sorted A rows ``[N, K]``, A and W both by TMA: persistent
    programs take every num_programs-th tile of the table, the tile loop flattened into the K
    loop, so the next tile's first K blocks load while this tile's epilogue runs (gathered rows
    and the SwiGLU epilogues measured slower this way, BENCHMARKS.md run 38). LoRA none, in the
    loop, or given with z and lb read by TMA: a given z's pointer loads inside the flattened
    loop cost more than the rank-r product saved (run 38), its TMA loads do not (run 42).
    ``LB_DESC``: lb by pointer (0) or by a descriptor over ``[E, N, r]`` (1) or ``[E, r, N]``
    (2). ``SM_PROGRAMS``: programs per SM, a tuned grid parameter the kernel does not read.
    Same tiles, K order and roundings as ``_expert_gemm_kernel``."""
    num_pid_n = tl.cdiv(n_out, BLOCK_N)
    table = tiles_ptr + (BLOCK_M // 128) * stride_tt
    num_row_tiles = tl.load(table + 3 * stride_tf)  # field 3: the row tiles listed
    ks = tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < rank
    out_dtype = out_ptr.dtype.element_ty
    for tile in tl.range(tl.program_id(0), num_row_tiles * num_pid_n, tl.num_programs(0),
                         flatten=True):  # fmt: skip
        pid_m, pid_n = _tile_coords(tile, num_row_tiles, num_pid_n, GROUP_M)
        e = tl.load(table + pid_m)
        row_start = tl.load(table + stride_tf + pid_m)
        row_end = tl.load(table + 2 * stride_tf + pid_m)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end  # TMA reads the next expert's rows past the end: not stored
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n_out
        la_ptrs = (
            la_ptr
            + e.to(tl.int64) * stride_lae
            + rs[None, :] * stride_lar
            + ks[:, None] * stride_lak
        )
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, k_dim, BLOCK_K):
            a = a_desc.load([row_start, k0])
            if W_DESC == 1:  # [E, N, K]
                w = tl.reshape(w_desc.load([e, pid_n * BLOCK_N, k0]), (BLOCK_N, BLOCK_K)).T
            else:  # [E, K, N]
                w = tl.reshape(w_desc.load([e, k0, pid_n * BLOCK_N]), (BLOCK_K, BLOCK_N))
            acc = _dot(a, w, acc, UPCAST, PRECISION)
            if LORA == 1:  # LORA_IN_LOOP
                la_mask = ((k0 + ks)[:, None] < k_dim) & r_mask[None, :]
                la = tl.load(la_ptrs + k0 * stride_lak, mask=la_mask, other=0.0)
                acc_z = _dot(a, la, acc_z, UPCAST, PRECISION)
        if LORA != 0:
            # fmt: off
            acc = _lora_term(acc, acc_z, z_ptr, stride_zm, stride_zr, z_desc, lb_ptr,
                             stride_lbe, stride_lbn, stride_lbr, lb_desc, e, row_start, rows,
                             row_mask, cols, col_mask, pid_n, rank, lora_scale, out_dtype, LORA,
                             LB_DESC, BLOCK_N, BLOCK_R, UPCAST, PRECISION)
            # fmt: on
        if BIAS:
            acc = _add_bias(acc, bias_ptr, stride_be, stride_bn, e, cols, col_mask)
        # fmt: off
        _store_rows(acc, out_ptr, stride_om, stride_on, out_rows_ptr, rows, row_mask, cols,
                    col_mask, SCATTER, UPCAST)
        # fmt: on
