"""Kernel timeline of one block step replayed from a CUDA graph: each kernel's duration and the
idle gap before it (the GPU's own timestamps, via the profiler), triton backend, 8192 tokens
(BENCHMARKS.md, run 121). Device machine: ``python3 scripts/graph_gaps.py gpt-oss-20b lora``."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from moelab.bench.experts import captured_block_step
from moelab.bench.timing import median_ms

shape_name, mode = sys.argv[1], sys.argv[2]
cap, x0 = captured_block_step(shape_name, mode)
median = median_ms(lambda: cap(x0), 20, warmup=0)
print(f"== {shape_name} {mode}: graph step median {median:.3f} ms")
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        cap(x0)
    torch.cuda.synchronize()
kernels = sorted(
    (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
    key=lambda e: e.time_range.start,
)
# the last of the 3 replays: split at the largest gap boundaries by counting kernels per replay
n = len(kernels) // 3
last = kernels[-n:]
busy = sum(k.time_range.elapsed_us() for k in last) / 1e3
span = (last[-1].time_range.end - last[0].time_range.start) / 1e3
print(f"kernels per step {n}, busy {busy:.3f} ms, span {span:.3f} ms, gaps {span - busy:.3f} ms")
prev_end = None
for k in last:
    gap = 0.0 if prev_end is None else (k.time_range.start - prev_end) / 1e3
    print(f"  gap {gap * 1e3:6.1f} us  {k.time_range.elapsed_us():8.1f} us  {k.name[:70]}")
    prev_end = k.time_range.end
