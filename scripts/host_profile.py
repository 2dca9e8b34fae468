"""Where the host's time goes while it issues one MoE block step (forward + backward).

Run on the GPU machine: ``python3 scripts/host_profile.py --backend triton --tokens 8192``.
Prints the host milliseconds per step (the GPU idle at each step's start, so nothing waits on
it), the Python functions that take them (cProfile) and the torch ops and launches per step
(torch.profiler, CPU side), then where the GPU sits idle inside a step: the gaps between its
kernels, each with the kernel that ended the wait (the host was still issuing it); full tables
and a Chrome trace go to ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from moelab.bench.experts import block_config, build_block
from moelab.bench.shapes import SHAPES
from moelab.ops import moe_block


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--mode", default="lora")
    p.add_argument("--backend", default="triton")
    p.add_argument("--out", default="/tmp/host_profile")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    rank = 16 if args.mode == "lora" else 0
    params, _ = build_block(shape, args.mode, 16, torch.bfloat16, "cuda")
    cfg = block_config(shape, args.backend, rank)
    x0 = torch.randn(args.tokens, shape.hidden, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x0)

    def step() -> None:
        moe_block(x0.detach().requires_grad_(True), params, cfg)[0].backward(grad)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    host = []
    for _ in range(20):
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    tag = f"{args.shape} {args.tokens} {args.mode} {args.backend}"
    print(f"host ms per step, {tag}: median {statistics.median(host):.3f} min {min(host):.3f}")
    print(host_timeline(step))
    if args.backend == "triton":
        print(launch_costs(step))

    prof = cProfile.Profile()
    for _ in range(10):
        prof.enable()
        step()
        prof.disable()
        torch.cuda.synchronize()
    for order, top in (("tottime", 30), ("cumulative", 45)):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(top)
        text = buf.getvalue()
        (out / f"cprofile_{args.backend}_{args.tokens}_{order}.txt").write_text(text)
        print(f"--- cProfile by {order} (10 steps) ---")
        print("\n".join(text.splitlines()[: top + 12]))

    with profile(activities=[ProfilerActivity.CPU]) as tp:
        for _ in range(5):
            step()
            torch.cuda.synchronize()
    table = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    (out / f"torch_ops_{args.backend}_{args.tokens}.txt").write_text(table)
    print(f"--- torch ops, CPU side (5 steps) ---\n{table}")

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
        for _ in range(3):
            step()
            torch.cuda.synchronize()
            time.sleep(0.01)  # marks the step boundary in the trace: no gap inside is as long
    trace = out / f"trace_{args.backend}_{args.tokens}.json"
    tp.export_chrome_trace(str(trace))
    print(gpu_gaps(json.loads(trace.read_text())))


# the stages whose host entry and exit times the timeline reports (module, attribute)
_MARKED = [
    ("moelab.ops.moe", "router_logits"),
    ("moelab.ops.moe", "route"),
    ("moelab.ops.moe", "moe_experts"),
    ("moelab.kernels.triton", "dispatch_tiles"),
    ("moelab.kernels.triton", "lora_products"),
    ("moelab.kernels.triton", "up_projection"),
    ("moelab.kernels.triton", "down_projection"),
    ("moelab.kernels.triton", "combine_rows"),
    ("moelab.kernels.triton", "down_backward"),
    ("moelab.kernels.triton", "router_grad"),
    ("moelab.kernels.triton_grads", "lora_down_grads"),
    ("moelab.kernels.triton", "up_backward"),
    ("moelab.kernels.triton_grads", "lora_up_grads"),
]


def host_timeline(step, steps: int = 20) -> str:
    """When the host enters and leaves each marked stage, in ms from the step's start (median
    over ``steps`` unprofiled steps, the GPU idle at each start): how long the GPU waits for
    its first large kernel, without a profiler's own cost."""
    marks: dict[str, list[float]] = {}
    seen: dict[str, int] = {}  # calls of each stage in the current step
    originals = []
    t0 = [0.0]

    def mark(event: str) -> None:
        seen[event] = seen.get(event, 0) + 1
        key = event if seen[event] == 1 else f"{event} #{seen[event]}"
        marks.setdefault(key, []).append(time.perf_counter() - t0[0])

    def wrap(name, fn):
        def timed(*a, **k):
            mark(f"{name} enter")
            try:
                return fn(*a, **k)
            finally:
                mark(f"{name} exit")

        return timed

    for module_name, attr in _MARKED:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr)
        originals.append((module, attr, fn))
        setattr(module, attr, wrap(attr, fn))
    try:
        for _ in range(steps):
            torch.cuda.synchronize()
            seen.clear()
            t0[0] = time.perf_counter()
            step()
            mark("step end")
        torch.cuda.synchronize()
    finally:
        for module, attr, fn in originals:
            setattr(module, attr, fn)
    rows = sorted((statistics.median(v), k) for k, v in marks.items())
    lines = ["--- host timeline, ms from the step's start (median of unprofiled steps) ---"]
    lines += [f"{ms * 1e3:8.3f}  {name}" for ms, name in rows]
    return "\n".join(lines)


def launch_costs(step, repeats: int = 100) -> str:
    """Host microseconds per launch of each Triton launch of one step, three ways: through
    the JIT (``kernel[grid](...)``), through the compiled kernel's runner
    (``compiled[grid](...)``) and as the backend launches (``launch.launch``: the argument
    specialisation, then the compiled kernel's launcher directly). Each launch is repeated
    ``repeats`` times back to back (same arguments: same results) and the queue drained
    between kinds."""
    from moelab.kernels import launch as kl

    recorded = []
    launch = kl.launch

    def record(kernel, grid, args, kwargs, key):
        recorded.append((kernel, grid, args, kwargs, key))
        launch(kernel, grid, args, kwargs, key)

    kl.launch = record
    try:
        step()
    finally:
        kl.launch = launch
    torch.cuda.synchronize()

    def per_launch(fn, *a, **kw) -> float:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(*a, **kw)
        us = (time.perf_counter() - t0) * 1e6 / repeats
        torch.cuda.synchronize()
        return us

    lines = ["--- host us per launch: JIT / compiled runner / as launched (specialisation + "
             "launcher) ---"]  # fmt: skip
    for kernel, grid, args, kwargs, key in recorded:
        direct = kl.direct_launch(key, args)
        size = grid(kwargs) if callable(grid) else grid
        size = (*size, 1, 1)[:3]
        jit = per_launch(kernel[grid], *args, **kwargs)
        run = per_launch(direct.compiled[size], *args, *direct.constexprs)
        ours = per_launch(kl.launch, kernel, grid, args, kwargs, key)
        lines.append(f"{jit:7.1f} {run:7.1f} {ours:7.1f}  {kernel.__name__} {str(key[:2])[:40]}")
    return "\n".join(lines)


def gpu_gaps(trace: dict, min_us: float = 5.0) -> str:
    """The GPU's busy and idle time in the last profiled step, and its idle gaps over
    ``min_us`` in order, each named by the kernel that ended it."""
    kernels = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in trace["traceEvents"]
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e
    )
    # steps are 10 ms apart (see above); the last step starts after the last such gap
    gaps = [i for i in range(1, len(kernels)) if kernels[i][0] - kernels[i - 1][1] > 5000]
    last = kernels[gaps[-1] if gaps else 0 :]
    busy = sum(end - start for start, end, _ in last)
    span = last[-1][1] - last[0][0]
    lines = [f"--- GPU in one step: {len(last)} kernels, span {span / 1e3:.3f} ms, "
             f"busy {busy / 1e3:.3f} ms, idle {(span - busy) / 1e3:.3f} ms ---"]  # fmt: skip
    for (_, prev_end, prev), (start, _, name) in zip(last, last[1:]):
        if start - prev_end > min_us:
            lines.append(f"{start - prev_end:8.1f} us idle before {name[:70]} (after {prev[:40]})")
    lines.append("--- kernels (us) ---")
    lines += [f"{end - start:8.1f}  {name[:100]}" for start, end, name in last]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
