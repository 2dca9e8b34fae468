"""Timing of one piece of GPU (or CPU) work, shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, iters: int, warmup: int = 3, cuda: bool | None = None) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` ones: CUDA events
    when ``cuda`` (default: a GPU is present), else wall time (a smoke run, not a timing)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if not cuda:
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
