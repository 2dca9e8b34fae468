"""Graph-replayed block step: each of 40 synced steps' time in order, then 10 steps each after
300 ms idle, then 5 replays without a sync: does the step slow down within the anchor's 20-step
window (the power cap), or is there a fixed per-step cost? (BENCHMARKS.md, run 122.) Device
machine: ``python3 scripts/step_sequence.py gpt-oss-20b lora``."""

import sys
import time

import torch

from moelab.bench.experts import captured_block_step
from moelab.bench.timing import median_ms

shape_name, mode = sys.argv[1], sys.argv[2]
cap, x0 = captured_block_step(shape_name, mode)


def timed(repeat: int = 1) -> float:
    """One event-timed span of ``repeat`` replays back to back, per replay."""
    return median_ms(lambda: cap(x0), 1, warmup=0, repeat=repeat)


torch.cuda.synchronize()
time.sleep(2)
seq = [timed() for _ in range(40)]
rested = []
for _ in range(10):
    time.sleep(0.3)
    rested.append(timed())
time.sleep(2)
unsynced = timed(repeat=5)
print(f"== {shape_name} {mode}")
print("back to back, synced:", " ".join(f"{t:.3f}" for t in seq))
print("each after 300 ms idle:", " ".join(f"{t:.3f}" for t in rested))
print(f"5 unsynced replays after 2 s idle: {unsynced:.3f} per step")
