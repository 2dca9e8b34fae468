"""Time each stage of the triton backend's forward + backward separately, on a real shape.

``python -m moelab.bench stages --shape qwen3-30b-a3b --tokens 8192 --mode lora``

Each stage is one launcher call of :mod:`moelab.kernels.triton` on the same inputs as a full
step, timed alone (median of ``--iters`` CUDA-event timings after warm-up and autotuning).
torch's grouped GEMM on pre-sorted rows of the same sizes is timed beside the two forward
products as the plain grouped GEMM to beat (no gather, no epilogue).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moelab.bench.experts import build_block
from moelab.bench.shapes import SHAPES
from moelab.kernels import grouped_mm as gmm
from moelab.kernels import triton as tr
from moelab.kernels import triton_kernels as tk
from moelab.ops import route
from moelab.ops.dispatch import dispatch


def _median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if not torch.cuda.is_available():  # the CPU interpreter: a smoke run, not a timing
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[dict]:
    shape = SHAPES[args.shape]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lora_mode = args.mode == "lora"
    params, _ = build_block(shape, args.mode, args.rank, dtype, device)
    ex = params["experts"]
    gate_up, down = ex["gate_up"].detach(), ex["down"].detach()
    e, h, i = shape.num_experts, shape.hidden, shape.inter
    tokens, k = args.tokens, shape.top_k
    x = torch.randn(tokens, h, device=device, dtype=dtype)
    dout = torch.randn_like(x)
    logits = x.float() @ params["router"]["weight"].detach().float().t()
    routing = route(logits, shape.router, k)
    plan = dispatch(routing.experts, e)
    rows = plan.token_N.numel()
    bm = tr._block_m(rows, e)
    tiles = tr.tile_table(plan.offs_E, rows, bm)
    oai = shape.activation == "swiglu_oai"
    gb, db = ex.get("gate_up_bias"), ex.get("down_bias")
    gb = None if gb is None else gb.detach()
    db = None if db is None else db.detach()
    lora = {n: t.detach() for n, t in ex["lora"].items()} if lora_mode else None
    r = args.rank if lora_mode else 0

    def lr(product, la, la_s, lb, lb_s):
        return tr._low_rank(product, la, la_s, lb, lb_s, 2.0, rows, r)

    a1, b1 = (lora["gate_up_a"], lora["gate_up_b"]) if lora else (None, None)
    a2, b2 = (lora["down_a"], lora["down_b"]) if lora else (None, None)
    h_NG = x.new_empty(rows, 2 * i)
    act = x.new_empty(rows, i)
    y = x.new_empty(rows, h)
    dh = x.new_empty(rows, 2 * i)
    dxs = x.new_empty(rows, h)
    dw_parts = torch.zeros(rows, tr.triton_cdiv(i, tr._DW_COLS), device=device)
    act_w = x.new_empty(rows, i)
    w_N = routing.weights.reshape(-1).to(dtype).index_select(0, plan.order_N).contiguous()
    up_l = lr("up", a1, a1.stride(), b1, b1.stride()) if lora else None
    dn_l = lr("down", a2, a2.stride(), b2, b2.stride()) if lora else None
    bdn_l = lr("bwd_down", b2, tr._t(b2), a2, tr._t(a2)) if lora else None
    bup_l = lr("bwd_up", b1, tr._t(b1), a1, tr._t(a1)) if lora else None
    weights = routing.weights.to(dtype).reshape(-1).contiguous()

    def up(low):
        return lambda: tr.expert_gemm(
            x, gate_up, gate_up.stride(), i, h, tiles, bm, act, gather=plan.token_N,
            epilogue=tk.SWIGLU_FWD, h=h_NG, oai=oai, lora=low, bias=gb,
        )  # fmt: skip

    def down_(low):
        return lambda: tr.expert_gemm(
            act, down, down.stride(), h, i, tiles, bm, y, scatter=plan.order_N, bias=db, lora=low
        )

    def bwd_down(low):
        return lambda: tr.expert_gemm(
            dout, down, tr._t(down), i, h, tiles, bm, dh, gather=plan.token_N,
            epilogue=tk.SWIGLU_BWD, h=h_NG, w_rows=w_N, dw=dw_parts, act_w=act_w, oai=oai,
            lora=low,
        )  # fmt: skip

    def bwd_up(low):
        return lambda: tr.expert_gemm(
            dh, gate_up, tr._t(gate_up), h, 2 * i, tiles, bm, dxs, scatter=plan.order_N, lora=low
        )

    products = {
        "up (gather, SwiGLU epilogue)": (up, up_l, 2 * rows * h * 2 * i),
        "down (scatter to slots)": (down_, dn_l, 2 * rows * i * h),
        "bwd dY W2 (dSwiGLU, router grad)": (bwd_down, bdn_l, 2 * rows * h * i),
        "bwd dh W1 (dX to slots)": (bwd_up, bup_l, 2 * rows * 2 * i * h),
    }
    stages = {name: (make(low), flops) for name, (make, low, flops) in products.items()}
    stages["combine"] = (lambda: tr.combine_rows(y, k, weights), 0)
    stages["dX combine"] = (lambda: tr.combine_rows(dxs, k, None), 0)
    if lora:
        # both placements of z for each product (the stage above uses the measured choice)
        label = {tk.LORA_IN_LOOP: "z in loop", tk.LORA_GIVEN: "z by rank-r launch"}
        for name, (make, low, flops) in products.items():
            for placement, text in label.items():
                stages[f"alt: {name} [{text}]"] = (make(low._replace(placement=placement)), flops)
        need = (False,) * 7 + (True,) * 4 + (False,) * 2

        def lora_grads():
            grads = [None] * 13
            dout_NH = dout.index_select(0, plan.token_N)
            gmm.down_grads(
                need,
                2.0,
                plan,
                dout,
                dout_NH,
                act_w,
                bdn_l.z,
                dn_l.z,
                w_N[:, None],
                routing.weights,
                routing.experts,
                db,
                e,
                grads,
            )
            gmm.up_grads(need, 2.0, plan, x, dh, bup_l.z, up_l.z, grads)

        stages["LoRA dA, dB (torch grouped_mm)"] = (lora_grads, 2 * rows * r * (4 * h + 6 * i))
    else:
        need = (False,) * 3 + (True, True) + (False,) * 8

        def weight_grads():
            grads = [None] * 13
            dout_NH = dout.index_select(0, plan.token_N)
            gmm.down_grads(
                need,
                1.0,
                plan,
                dout,
                dout_NH,
                act_w,
                None,
                None,
                w_N[:, None],
                routing.weights,
                routing.experts,
                db,
                e,
                grads,
            )
            gmm.up_grads(need, 1.0, plan, x, dh, None, None, grads)

        stages["dW1, dW2 (torch grouped_mm)"] = (weight_grads, 2 * rows * h * i * 3)
    xs = x.index_select(0, plan.token_N)
    ref = {
        "ref: torch grouped_mm up, sorted rows": (
            lambda: gmm._gmm(xs, gate_up.transpose(1, 2), plan.offs_E),
            2 * rows * h * 2 * i,
        ),
        "ref: torch grouped_mm down, sorted rows": (
            lambda: gmm._gmm(act, down.transpose(1, 2), plan.offs_E),
            2 * rows * i * h,
        ),
    }
    out = []
    for name, (fn, flops) in {**stages, **ref}.items():
        ms = _median_ms(fn, args.iters)
        row = dict(shape=args.shape, tokens=tokens, mode=args.mode, stage=name, ms=round(ms, 4))
        row["tflops"] = round(flops / ms / 1e9, 1) if flops else None
        out.append(row)
        print(json.dumps(row), flush=True)
    out.append(
        dict(
            configs=tr.best_configs(),
            lora_placements={str(k): v for k, v in tr._placements.items()},
        )
    )
    print(json.dumps(out[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def print_table(rows: list[dict]) -> None:
    timed = [r for r in rows if "stage" in r]
    if not timed:
        return
    r0 = timed[0]
    print(f"\nstages of the triton backend: {r0['shape']}, {r0['tokens']} tokens, {r0['mode']}")
    total = 0.0
    for r in timed:
        if not r["stage"].startswith(("ref:", "alt:")):
            total += r["ms"]
        tf = "" if r["tflops"] is None else f"{r['tflops']:8.1f} TFLOP/s"
        print(f"  {r['stage']:<42}{r['ms']:8.3f} ms {tf}")
    print(f"  {'sum of stages':<42}{total:8.3f} ms")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--mode", default="lora", choices=("lora", "full"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
