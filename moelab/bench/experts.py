"""Benchmark of one MoE block (router + experts), forward + backward, per backend.

``python -m moelab.bench experts --shape qwen3-30b-a3b --tokens 8192,32768 --mode lora,full``

Timing follows ``shared/bench/anchor_bench.py`` so rows compare side by side: 3 warm-ups, then
the median of ``--iters`` steps timed with CUDA events; peak = extra allocated memory during the
timed steps over what was allocated after warm-up (weights, LoRA gradients, inputs). ``--check``
first compares every backend with the float64 ``native_torch`` evaluation on fresh inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from moelab.bench import compiled
from moelab.bench.gpu_clock import clock_log, clock_text
from moelab.bench.shapes import SHAPES, BlockShape, moe_flops
from moelab.kernels import available, registry
from moelab.kernels.problem import ExpertProblem
from moelab.kernels.registry import unsupported_reason
from moelab.ops import ExpertLoRA, MoEConfig, moe_block, moe_experts, route
from moelab.train.graphed_call import graphed_block
from moelab.train.graphs import CapturedStep

_Out = TypeVar("_Out")
# backends whose block cannot be recorded as CUDA graphs (--graphed-block): native_torch reads
# the expert counts on the host, and the compiled pipeline is torch.compile's own
NOT_RECORDABLE = ("native_torch", compiled.NAME)


def build_block(
    shape: BlockShape, mode: str, rank: int, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[dict, list[torch.Tensor]]:
    """Random block params (std 0.02 as the anchor) and the list of trainable tensors."""
    gen = torch.Generator(device=device).manual_seed(seed)
    e, h, i = shape.num_experts, shape.hidden, shape.inter

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * 0.02).to(
            dtype
        )

    params = {
        "router": {"weight": rand(e, h)},
        "experts": {"gate_up": rand(e, 2 * i, h), "down": rand(e, h, i)},
    }
    if shape.biases:
        params["router"]["bias"] = rand(e)
        params["experts"]["gate_up_bias"] = rand(e, 2 * i)
        params["experts"]["down_bias"] = rand(e, h)
    if mode == "lora":
        # B random rather than zero, so every gradient path carries signal.
        params["experts"]["lora"] = {
            "gate_up_a": rand(e, rank, h),
            "gate_up_b": rand(e, 2 * i, rank),
            "down_a": rand(e, rank, i),
            "down_b": rand(e, h, rank),
        }
        trainable = list(params["experts"]["lora"].values())
    elif mode == "full":
        trainable = [t for group in ("router", "experts") for t in params[group].values()]
    else:
        raise ValueError(f"unknown mode {mode!r}; expected 'lora' or 'full'")
    for t in trainable:
        t.requires_grad_(True)
    return params, trainable


def block_config(shape: BlockShape, backend: str, rank: int, recompute: bool = False) -> MoEConfig:
    return MoEConfig(
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        router=shape.router,
        activation=shape.activation,
        lora_scale=2.0,  # alpha = 2r, as the anchor
        backend=backend,
        recompute=recompute,
        # as the anchor's block (Transformers' sparse MoE block): no router losses or metrics,
        # which the trainer's blocks compute
        router_stats=False,
    )


def _problem(
    shape: BlockShape, tokens: int, rank: int, dtype, device, recompute: bool = False
) -> ExpertProblem:
    return ExpertProblem(
        device=torch.device(device),
        dtype=dtype,
        num_tokens=tokens,
        top_k=shape.top_k,
        num_experts=shape.num_experts,
        hidden=shape.hidden,
        inter=shape.inter,
        lora_rank=rank,
        has_bias=shape.biases,
        activation=shape.activation,
        recompute=recompute,
    )


def captured_block_step(
    shape_name: str, mode: str, tokens: int = 8192, rank: int = 16, device: str = "cuda"
) -> tuple[CapturedStep, torch.Tensor]:
    """The triton block's forward + backward (bf16, gradients added) after three eager steps,
    captured as a CUDA graph, and the input it replays on: what ``scripts/graph_gaps.py`` and
    ``scripts/step_sequence.py`` time."""
    shape = SHAPES[shape_name]
    params, _ = build_block(shape, mode, rank, torch.bfloat16, device)
    cfg = block_config(shape, "triton", rank)
    x0 = torch.randn(tokens, shape.hidden, device=device, dtype=torch.bfloat16)
    g = torch.randn_like(x0)
    step = lambda x: moe_block(x, params, cfg)[0].backward(g)  # noqa: E731
    for _ in range(3):
        step(x0.detach().requires_grad_(True))
    captured = CapturedStep(step)
    captured.capture(x0.detach().requires_grad_(True))
    return captured, x0


def dropping_grads(fn: Callable[..., _Out], tensors: list[torch.Tensor]) -> Callable[..., _Out]:
    """``fn`` that first drops ``tensors``' gradients, so each step's are written, not added
    (as after ``zero_grad(set_to_none=True)``)."""

    def call(*args):
        for t in tensors:
            t.grad = None
        return fn(*args)

    return call


def time_step(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    iters: int,
    warmup: int = 3,
    graph: bool = False,
    fresh: list[torch.Tensor] | None = None,
) -> tuple[float, float | None, float | None]:
    """Median ms of ``fn(x).backward(grad)``, peak extra MiB and the median ms the host took
    to issue the step (both None off CUDA): when the host's time is close to the GPU's, the
    step is bound by launching, not by the kernels. ``graph`` times replays of the step
    captured as a CUDA graph (the kernels' time without the launching; CUDA only).

    By default every step adds its gradients to those of the step before (the anchor's
    protocol, like micro-batches of gradient accumulation); ``fresh`` tensors have their
    ``.grad`` dropped before each step, as ``zero_grad(set_to_none=True)`` does between
    optimizer steps, so their gradients are written, not added. With ``graph`` they are dropped
    before the capture, so the graph writes them into tensors of its own at every replay (what a
    captured training step does after ``zero_grad(set_to_none=True)``)."""
    cuda = x0.device.type == "cuda"
    grad = torch.randn_like(x0)
    call = dropping_grads(fn, fresh) if fresh else fn
    step = lambda x: call(x).backward(grad)  # noqa: E731
    for _ in range(warmup):
        step(x0.detach().requires_grad_(True))
    base = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    if graph:
        captured = CapturedStep(step)
        captured.capture(x0.detach().requires_grad_(True))
        step = captured
    times, host = [], []
    for _ in range(iters):
        x = x0.detach().requires_grad_(True)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            step(x)
            host.append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(x)
            times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return statistics.median(times), peak, statistics.median(host) if cuda else None


def profile_step(
    fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, top: int = 12
) -> list[tuple[str, float, int]]:
    """Device time per kernel over 2 steps, largest first: (name, ms per step, calls per step)."""
    from torch.profiler import ProfilerActivity, profile

    grad = torch.randn_like(x0)
    activities = [ProfilerActivity.CUDA] if x0.device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(2):
            fn(x0.detach().requires_grad_(True)).backward(grad)
        if x0.device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = ev.device_time_total if x0.device.type == "cuda" else ev.self_cpu_time_total
        if us > 0:
            rows.append((ev.key[:60], us / 2e3, ev.count // 2))
    return sorted(rows, key=lambda r: -r[1])[:top]


def check_backends(
    shape: BlockShape,
    backends: list[str],
    dtype: torch.dtype,
    device: str,
    tokens: int,
    rank: int,
    recompute: bool = False,
) -> list[dict]:
    """Relative error of the expert output and every gradient (x, router logits, weights,
    biases, LoRA) against float64 ``native_torch``, on fresh inputs and one shared routing.

    Expert 0 receives no tokens, so its gradients must come back exactly zero.
    """
    rows = []
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(tokens, shape.num_experts, generator=gen, device=device)
    logits[:, 0] = -30.0
    logits.requires_grad_(True)
    x32 = torch.randn(tokens, shape.hidden, generator=gen, device=device)
    dout32 = torch.randn(tokens, shape.hidden, generator=gen, device=device)
    for mode in ("lora", "full"):
        results = []
        for backend, dt in [("native_torch", torch.float64)] + [(b, dtype) for b in backends]:
            params, trainable = build_block(shape, mode, rank, dt, device, seed)
            experts = params["experts"]
            router = list(params["router"].values())
            trainable = [t for t in trainable if not any(t is r for r in router)]
            lora = experts.get("lora")
            x = x32.to(dt).requires_grad_(True)
            out = moe_experts(
                x,
                route(logits, shape.router, shape.top_k),
                experts["gate_up"],
                experts["down"],
                gate_up_bias=experts.get("gate_up_bias"),
                down_bias=experts.get("down_bias"),
                activation=shape.activation,
                backend=backend,
                lora=None if lora is None else ExpertLoRA(**lora, scale=2.0),
                recompute=recompute and backend != "native_torch",
            )
            grads = torch.autograd.grad(out, [x, logits, *trainable], dout32.to(dt))
            results.append((backend, out, grads))
        _, ref_out, ref_grads = results[0]
        for backend, out, grads in results[1:]:
            errs = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
            empty_ok = all(bool((g[0] == 0).all()) for g in grads[2:])
            rows.append(
                dict(
                    check=backend,
                    mode=mode,
                    dtype=str(dtype),
                    tokens=tokens,
                    max_rel_err=max(errs),
                    empty_expert_zero_grad=empty_ok,
                )
            )
    return rows


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a64, r64 = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a64).all():
        return float("inf")
    return (a64 - r64).norm().item() / max(r64.norm().item(), 1e-30)


def run(args: argparse.Namespace) -> list[dict]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"  # "cuda:1" too
    if (args.graph or args.graphed_block) and not cuda:
        raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    shape = SHAPES[args.shape]
    backends = args.backends.split(",") if args.backends else available()
    rows = []
    if args.check:
        probe = _problem(shape, 256, args.rank, dtype, device, args.recompute)
        ok = [b for b in backends if b != compiled.NAME and unsupported_reason(b, probe) is None]
        checks = check_backends(
            shape, ok, dtype, device, args.check_tokens, args.rank, args.recompute
        )
        for row in checks:
            print(json.dumps(row), flush=True)
            rows.append(row)
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for mode in args.mode.split(","):
            for backend in backends:
                row = dict(
                    shape=args.shape,
                    tokens=tokens,
                    mode=mode,
                    backend=backend,
                    rank=args.rank if mode == "lora" else 0,
                    dtype=str(dtype),
                    recompute=args.recompute,
                )
                rank = args.rank if mode == "lora" else 0
                problem = _problem(shape, tokens, rank, dtype, device, args.recompute)
                if args.graphed_block and backend in NOT_RECORDABLE:
                    reason = "not recordable as the block's graphs (--graphed-block)"
                elif backend == compiled.NAME:
                    reason = unsupported_reason("grouped_mm", problem)
                else:
                    reason = unsupported_reason(backend, problem)
                if reason is not None:
                    row["skipped"] = reason
                else:
                    row.update(_time_backend(shape, backend, mode, tokens, args, dtype, device))
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.json:  # after every row: a run cut short keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
                if cuda:
                    torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def _time_backend(shape, backend, mode, tokens, args, dtype, device) -> dict:
    params, trainable = build_block(shape, mode, args.rank, dtype, device)
    x0 = torch.randn(tokens, shape.hidden, device=device, dtype=dtype)
    if backend == compiled.NAME:
        # one dynamic-shape compilation serves every token count
        step = torch.compile(lambda x: compiled.block(x, params, shape, 2.0), dynamic=True)
    elif args.graphed_block:
        step = graphed_block(params, block_config(shape, backend, args.rank, args.recompute))
    else:
        cfg = block_config(shape, backend, args.rank, args.recompute)
        step = lambda x: moe_block(x, params, cfg)[0]  # noqa: E731
    fresh = trainable if args.grads == "fresh" else None
    cuda = x0.device.type == "cuda"
    if cuda and args.cooldown:
        time_step(step, x0, 1, warmup=0)  # tunes and compiles now, not after the idle gap
        torch.cuda.synchronize()
        time.sleep(args.cooldown)  # every row starts from the same (idle) power state
    with clock_log(x0.device) as clock:
        ms, peak, host_ms = time_step(step, x0, args.iters, graph=args.graph, fresh=fresh)
    tflops = moe_flops(shape, tokens, mode, args.rank) / (ms * 1e-3) / 1e12
    row = dict(ms=round(ms, 3), tflops=tflops, peak_mib=None if peak is None else round(peak, 1))
    row["host_ms"] = None if host_ms is None else round(host_ms, 3)
    row["graph"] = args.graph
    if args.graphed_block:
        row["graphed_block"] = True
        row["graph_pool_mib"] = round(step.pool_bytes / 2**20, 1)
    row["grads"] = args.grads
    row["clock"] = clock.summary()
    if args.sustain:
        with clock_log(x0.device) as clock:
            sustained = time_step(step, x0, args.sustain, graph=args.graph, fresh=fresh)[0]
        row["sustained_ms"] = round(sustained, 3)
        row["sustained_clock"] = clock.summary()
    module = None if backend == compiled.NAME else registry._module(backend)
    saved = getattr(module, "saved_bytes_per_token", None)
    if saved is not None:
        rank = args.rank if mode == "lora" else 0
        problem = _problem(shape, tokens, rank, dtype, device, args.recompute)
        row["saved_bytes_per_token"] = saved(problem, x0.element_size())
    if args.profile:
        row["kernels"] = profile_step(step, x0)
    return row


def print_table(rows: list[dict]) -> None:
    checks = [r for r in rows if "check" in r]
    if checks:
        print("\ncheck vs float64 native_torch (fresh inputs)")
        print(
            f"{'backend':<14}{'mode':<6}{'dtype':<16}{'max rel err':>12}  empty expert grads zero"
        )
        for r in checks:
            print(
                f"{r['check']:<14}{r['mode']:<6}{r['dtype']:<16}{r['max_rel_err']:>12.2e}  "
                f"{r['empty_expert_zero_grad']}"
            )
    timed = [r for r in rows if "check" not in r]
    for r in timed:
        if r.get("kernels"):
            print(
                f"\nkernels of one step: {r['shape']} {r['tokens']} {r['mode']} {r['backend']}"
                f" ({r['ms']:.3f} ms)"
            )
            for name, ms, calls in r["kernels"]:
                print(f"  {ms:8.3f} ms {calls:4d}x  {name}")
    sustained = any("sustained_ms" in r for r in timed)
    print(
        f"\n{'shape':<15}{'tokens':>7} {'mode':<5}{'backend':<14}{'ms':>9}{'TFLOP/s':>9}"
        f"{'peak MiB':>10}{'saved B/token':>15}{'host ms':>9}{'SM MHz':>8}"
        + (f"{'sustained':>11}{'SM MHz':>8}" if sustained else "")
    )
    for r in timed:
        if "skipped" in r:
            print(
                f"{r['shape']:<15}{r['tokens']:>7} {r['mode']:<5}{r['backend']:<14}"
                f"  skipped: {r['skipped']}"
            )
            continue
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        saved = r.get("saved_bytes_per_token", "n/a")
        host = "n/a" if r.get("host_ms") is None else f"{r['host_ms']:.2f}"
        line = (
            f"{r['shape']:<15}{r['tokens']:>7} {r['mode']:<5}{r['backend']:<14}"
            f"{r['ms']:>9.3f}{r['tflops']:>9.2f}{peak:>10}{saved!s:>15}{host:>9}"
            f"{clock_text(r.get('clock')):>8}"
        )
        if "sustained_ms" in r:
            line += f"{r['sustained_ms']:>11.3f}{clock_text(r.get('sustained_clock')):>8}"
        print(line)
    if any(r.get("clock") for r in timed):
        print("SM MHz: the median while timed; * some samples throttled (power, heat)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    p.add_argument("--tokens", default="8192", help="comma-separated token counts")
    p.add_argument("--mode", default="lora,full", help="comma-separated: lora, full")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--backends", default=None, help="comma-separated (default: all available)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float16", "float32"),
        help="default: bfloat16 on GPU, float32 on CPU",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--check", action="store_true", help="check correctness first")
    p.add_argument(
        "--recompute", action="store_true", help="recompute the pre-activation in backward"
    )
    p.add_argument(
        "--graph",
        action="store_true",
        help="time replays of the step captured as a CUDA graph (kernel time without launching)",
    )
    p.add_argument(
        "--graphed-block",
        action="store_true",
        help="time an eager loop over the block wrapped by moelab.train.graphed_call."
        "graphed_block: its forward and backward replayed from CUDA graphs of their own",
    )
    p.add_argument("--check-tokens", type=int, default=512)
    p.add_argument(
        "--grads",
        default="accumulate",
        choices=("accumulate", "fresh"),
        help="add each step's gradients to the last (the anchor's protocol) or drop them "
        "before each step (as zero_grad(set_to_none=True) between optimizer steps)",
    )
    p.add_argument(
        "--cooldown",
        type=float,
        default=0.0,
        help="seconds of idle GPU before each timed row (after its tuning), so that every row "
        "starts from the same power state (GPU only)",
    )
    p.add_argument(
        "--sustain",
        type=int,
        default=0,
        help="then time this many steps back to back (median as sustained_ms): at the power cap, "
        "where a long run spends its time",
    )
    p.add_argument("--profile", action="store_true", help="list the top kernels of each row")
    p.add_argument("--json", default=None, help="write all rows to this file")
