"""Graph-replayed block step: each of 40 synced steps' time in order, then 10 steps each after
300 ms idle, then 5 replays without a sync: does the step slow down within the anchor's 20-step
window (the power cap), or is there a fixed per-step cost? (BENCHMARKS.md, run 122.) Device
machine: ``python3 scripts/step_sequence.py gpt-oss-20b lora``."""

import sys
import time

import torch

from moelab.bench.experts import block_config, build_block
from moelab.bench.shapes import SHAPES
from moelab.ops import moe_block
from moelab.train.graphs import CapturedStep

shape_name, mode = sys.argv[1], sys.argv[2]
shape = SHAPES[shape_name]
params, _ = build_block(shape, mode, 16, torch.bfloat16, "cuda")
cfg = block_config(shape, "triton", 16)
x0 = torch.randn(8192, shape.hidden, device="cuda", dtype=torch.bfloat16)
g = torch.randn_like(x0)
step = lambda x: moe_block(x, params, cfg)[0].backward(g)  # noqa: E731
for _ in range(3):
    step(x0.detach().requires_grad_(True))
cap = CapturedStep(step)
cap.capture(x0.detach().requires_grad_(True))


def timed():
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    cap(x0)
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e)


torch.cuda.synchronize()
time.sleep(2)
seq = [timed() for _ in range(40)]
rested = []
for _ in range(10):
    time.sleep(0.3)
    rested.append(timed())
# 5 replays back to back, one event pair around them
time.sleep(2)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(5):
    cap(x0)
e.record()
torch.cuda.synchronize()
print(f"== {shape_name} {mode}")
print("back to back, synced:", " ".join(f"{t:.3f}" for t in seq))
print("each after 300 ms idle:", " ".join(f"{t:.3f}" for t in rested))
print(f"5 unsynced replays after 2 s idle: {s.elapsed_time(e) / 5:.3f} per step")
