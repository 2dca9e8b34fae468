"""Probes around one training step: its host synchronisations, a profiler table of it, and the
longest sequence whose step fits in a memory budget. A runner has ``step(ids)`` and ``vocab``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # train_step imports this module
    from moelab.bench.train_step import MoelabSystem, TransformersSystem


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_syncs(step: Callable[[], object]) -> list[str]:
    """Where one (untimed) ``step()`` synchronises with the host, as CUDA's sync debug mode sees
    it (``.item()``, ``nonzero``, device-to-host copies, ...): one ``file:line`` per sync."""
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    torch.cuda.synchronize()
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def profile_step(
    runner: MoelabSystem | TransformersSystem,
    seq: int,
    device: torch.device,
    path: str,
    rows: int = 40,
) -> None:
    """One step under the torch profiler: the ``rows`` costliest ops by device time, to a file."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, runner.vocab, (1, seq), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        runner.step(ids)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70))


def longest_fitting(fits: Callable[[int], bool], start: int, stop: int, resolution: int) -> int:
    """Largest ``seq`` (0 if none) with ``fits(seq)``, assuming fits is monotone: ``start``
    doubled up to ``stop`` until a miss, then bisected to a multiple of ``resolution``."""
    best, miss, seq = 0, None, start
    while seq <= stop:
        if not fits(seq):
            miss = seq
            break
        best, seq = seq, seq * 2
    while best and miss is not None and miss - best > resolution:
        mid = (best + miss) // 2 // resolution * resolution
        best, miss = (mid, miss) if fits(mid) else (best, mid)
    return best


def longest_sequence(
    runner: MoelabSystem | TransformersSystem,
    budget_gb: float,
    device: torch.device,
    start: int = 4096,
    stop: int = 262144,
    resolution: int = 4096,
) -> int:
    """Longest sequence whose step fits in ``budget_gb`` (CUDA): ``start`` doubled until a step
    runs out of memory, then bisected between the last fit and the first miss to ``resolution``.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * 2**30 / total), index)

    def fits(seq: int) -> bool:
        try:
            torch.cuda.empty_cache()
            runner.step(torch.randint(0, runner.vocab, (1, seq), device=device))
            sync(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False

    try:
        return longest_fitting(fits, start, stop, resolution)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        torch.cuda.empty_cache()
