"""Time each stage of the triton backend's forward + backward separately, on a real shape.

``python -m moelab.bench stages --shape qwen3-30b-a3b --tokens 8192 --mode lora``

Each stage is one launcher call of :mod:`moelab.kernels.triton` on the same inputs as a full
step, timed alone (median of ``--iters`` CUDA-event timings of ``--repeat`` back-to-back calls
each, after warm-up and autotuning: the kernels' time, not the host's cost of launching them).
torch's grouped GEMM on pre-sorted rows of the same sizes is timed beside the two forward
products as the plain grouped GEMM to beat (no gather, no epilogue).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from moelab.bench.experts import build_block
from moelab.bench.shapes import SHAPES
from moelab.bench.timing import median_ms
from moelab.kernels import grouped_mm as gmm
from moelab.kernels import triton as tr
from moelab.kernels import triton_grads as tg
from moelab.kernels import triton_kernels as tk
from moelab.ops import route


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
    plan, tiles, w_N = tr.dispatch_tiles(routing.experts, e, routing.weights)
    rows = plan.token_N.numel()
    oai = shape.activation == "swiglu_oai"
    gb, db = ex.get("gate_up_bias"), ex.get("down_bias")
    gb = None if gb is None else gb.detach()
    db = None if db is None else db.detach()
    lora = {n: t.detach() for n, t in ex["lora"].items()} if lora_mode else {}
    a1, b1 = lora.get("gate_up_a"), lora.get("gate_up_b")
    a2, b2 = lora.get("down_a"), lora.get("down_b")
    s, r = (2.0, args.rank) if lora_mode else (1.0, 0)
    low = tr.lora_products(a1, b1, a2, b2, s, rows, *tr.LORA_PLACEMENT)
    # the backend's own stage functions on one set of inputs, as in a step (fp32 routing weights)
    h_NG, act = tr.up_projection(x, gate_up, gb, low["up"], plan, tiles, oai)
    y = tr.down_projection(act, down, db, low["down"], plan, tiles)
    weights = routing.weights.reshape(-1).contiguous()
    dh, _, act_w, _ = tr.down_backward(dout, down, h_NG, w_N, low["bwd_down"], plan, tiles,
                                       oai, want_actw=True)  # fmt: skip
    dxs = tr.up_backward(dh, gate_up, low["bwd_up"], plan, tiles)

    products = {
        "up (gather, SwiGLU epilogue)": (
            lambda lr: tr.up_projection(x, gate_up, gb, lr, plan, tiles, oai),
            "up",
            2 * rows * h * 2 * i,
        ),
        "down (scatter to slots)": (
            lambda lr: tr.down_projection(act, down, db, lr, plan, tiles),
            "down",
            2 * rows * i * h,
        ),
        "bwd dY W2 (dSwiGLU, router grad)": (
            lambda lr: tr.down_backward(
                dout, down, h_NG, w_N, lr, plan, tiles, oai, want_actw=True
            ),
            "bwd_down",
            2 * rows * h * i,
        ),
        "bwd dh W1 (dX to slots)": (
            lambda lr: tr.up_backward(dh, gate_up, lr, plan, tiles),
            "bwd_up",
            2 * rows * 2 * i * h,
        ),
    }
    stages = {
        name: (partial(stage, low[product]), flops)
        for name, (stage, product, flops) in products.items()
    }
    # the down projection's backward with each main loop (the stage above: the measured one)
    for main in tr._main_loops.allowed:
        fn = partial(tr.down_backward, dout, down, h_NG, w_N, low["bwd_down"], plan, tiles,
                     oai, want_actw=True, main=main)  # fmt: skip
        stages[f"alt: bwd dY W2 [{main} main loop]"] = (fn, 2 * rows * h * i)
    stages["combine"] = (lambda: tr.combine_rows(y, k, weights), 0)
    stages["dX combine"] = (lambda: tr.combine_rows(dxs, k, None), 0)

    def torch_grads(need: tuple[bool, ...]) -> None:
        """The parameter gradients ``need`` asks for, on torch's grouped GEMM."""
        grads = [None] * 13
        dout_NH = dout.index_select(0, plan.token_N)
        # fmt: off
        gmm.down_grads(need, s, plan, dout, dout_NH, act_w, tr._z(low["bwd_down"]),
                       tr._z(low["down"]), w_N[:, None], routing.weights, routing.experts, db, e,
                       grads)
        gmm.up_grads(need, s, plan, x, dh, tr._z(low["bwd_up"]), tr._z(low["up"]), grads)
        # fmt: on

    if lora_mode:
        # both placements of z for each product (the stage above uses the measured choice)
        label = {tk.LORA_IN_LOOP: "z in loop", tk.LORA_GIVEN: "z by rank-r launch"}
        for name, (stage, product, flops) in products.items():
            for placement, text in label.items():
                alt = low[product]._replace(placement=placement)
                stages[f"alt: {name} [{text}]"] = (partial(stage, alt), flops)
        grads_name, grads_flops = "LoRA dA, dB (rank-r kernels)", 2 * rows * r * (4 * h + 6 * i)
        need = (False,) * 7 + (True,) * 4 + (False,) * 2  # dA1, dB1, dA2, dB2

        def param_grads():
            grads = [None] * 13
            # fmt: off
            tg.lora_down_grads(need, s, plan, dout, w_N, act_w, tr._z(low["bwd_down"]),
                               tr._z(low["down"]), a2, b2, grads, create_graph=False)
            tg.lora_up_grads(need, s, plan, x, dh, tr._z(low["bwd_up"]), tr._z(low["up"]), a1,
                             b1, grads, create_graph=False)
            # fmt: on

        stages["alt: LoRA dA, dB (torch grouped_mm)"] = (partial(torch_grads, need), grads_flops)
    else:
        grads_name, grads_flops = "dW1, dW2", 2 * rows * h * i * 3

        def param_grads(path: str | None = None) -> None:
            tg.weight_grad(dout, act_w, plan, out_jd=False, path=path)
            tg.weight_grad(x, dh, plan, out_jd=True, path=path)

        for path, text in (("triton", "rows by index"), ("torch", "gathered copies")):
            stages[f"alt: dW1, dW2 [{path}: {text}]"] = (partial(param_grads, path), grads_flops)

    stages[grads_name] = (param_grads, grads_flops)
    xs, douts = x.index_select(0, plan.token_N), dout.index_select(0, plan.token_N)
    ref = {
        "ref: torch grouped_mm up, sorted rows": (
            lambda: gmm._gmm(xs, gate_up.transpose(1, 2), plan.offs_E),
            2 * rows * h * 2 * i,
        ),
        "ref: torch grouped_mm down, sorted rows": (
            lambda: gmm._gmm(act, down.transpose(1, 2), plan.offs_E),
            2 * rows * i * h,
        ),
        "ref: torch grouped_mm dY W2, sorted rows": (
            lambda: gmm._gmm(douts, down, plan.offs_E),
            2 * rows * h * i,
        ),
        "ref: torch grouped_mm dh W1, sorted rows": (
            lambda: gmm._gmm(dh, gate_up, plan.offs_E),
            2 * rows * 2 * i * h,
        ),
    }
    out = []
    for name, (fn, flops) in {**stages, **ref}.items():
        ms = median_ms(fn, args.iters, repeat=args.repeat)
        row = dict(shape=args.shape, tokens=tokens, mode=args.mode, stage=name, ms=round(ms, 4))
        row["tflops"] = round(flops / ms / 1e9, 1) if flops else None
        out.append(row)
        print(json.dumps(row), flush=True)
    out.append(
        dict(
            configs=tr.best_configs(),
            lora_placements={key: v for (_, key), v in tr._placements.chosen.items()},
            main_loops={key: v for (_, key), v in tr._main_loops.chosen.items()},
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
    # fmt: off
    p.add_argument("--repeat", type=int, default=5,
                   help="back-to-back calls per timing, so the host's launch cost is hidden")
    # fmt: on
    p.add_argument("--json", default=None)
