"""Timing of one piece of GPU (or CPU) work, shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(
    fn: Callable[[], object],
    iters: int,
    warmup: int = 3,
    cuda: bool | None = None,
    repeat: int = 1,
) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` timings after ``warmup`` calls: CUDA events
    when ``cuda`` (default: a GPU is present), else wall time (a smoke run, not a timing).

    Each timing spans ``repeat`` back-to-back calls, divided by ``repeat``: one launch between
    two events also counts the host's cost of issuing it while the GPU waits, so a kernel's own
    time needs the queue kept full (BENCHMARKS.md, run 24: ~0.1 ms per Triton launch).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if not cuda:
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / repeat)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / repeat)
    return statistics.median(times)
