"""Tuning the triton backend's launches on this machine, once: the autotuner's configuration per
launch key, and choices between kernels timed against each other, both kept on disk
(:class:`moelab.kernels.measured.MeasuredChoices`) so that later processes skip the work.

``MOELAB_TRITON_AUTOTUNE=0`` turns both off (CI, reproducibility): every launch takes its fixed
configuration and every choice its default. A first tuning compiles every candidate
configuration before timing it; those compiles run in ``MOELAB_TRITON_COMPILE_THREADS`` threads
(default: one per CPU; 1: one by one, as Triton's tuner alone does), and each candidate is then
timed for ``TUNE_REP_MS``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
import triton
import triton.testing

from moelab.kernels import launch as kl
from moelab.kernels.measured import Choice, MeasuredChoices

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

log = logging.getLogger("moelab")


def autotune_enabled() -> bool:
    return not kl.interpreting() and kl.setting("MOELAB_TRITON_AUTOTUNE", "1") != "0"


def measures(a: torch.Tensor) -> bool:
    """Whether launch choices are timed here (else each takes its default)."""
    return autotune_enabled() and a.is_cuda


# The plain kernel's keyword arguments per launch key: the flags, the configuration the
# autotuner chose and what its heuristics derive from it, merged once. After the first call of a
# key, launches go straight to the plain kernel with them: Triton's autotuner and heuristics
# wrappers rebuild their keys from all ~60 arguments on every call, about 100 of the ~175 us the
# host spent per launch (run 22), and the eager block step was bound by the host, not the GPU.
_chosen: dict[tuple, dict] = {}
# The configuration tuned per launch key on this machine, kept on disk: Triton's own results
# cache skips configurations with a pre-hook, and every GEMM configuration has one (the TMA
# boxes), so without this each process tuned every shape again.
TUNED_CONFIGS = "triton_tuned_configs.json"


def rows_bucket(rows: int) -> int:
    """The row count that tuning keys and measured choices hold: the next power of two. A
    choice made at one row count serves every count of its bucket, so a run whose token count
    changes from batch to batch tunes once per bucket, not once per count (tuning costs seconds
    per launch; the best configuration moves little within a factor of two)."""
    return kl.next_power_of_2(rows)


def config_name(config: triton.Config) -> str:
    """A Triton configuration as text: its constexprs, warps and stages, in a fixed order."""
    return ",".join(f"{k}={v}" for k, v in sorted(config.all_kwargs().items()))


def run_tuned(
    plain: JITFunction,
    tuned: Callable[[], Autotuner],
    key: tuple,
    grid: kl.Grid,
    args: tuple,
    flags: dict,
    derived: Callable[[dict], dict] = lambda config: {},
    prepare: Callable[[dict], None] | None = None,
    device: torch.device | None = None,
) -> None:
    """Launch ``plain`` with the configuration the autotuned ``tuned()`` chose for ``key``
    (``derived(config)``: the constexprs its heuristics would add). The first call of a key in
    a process takes the choice stored on disk for ``device`` (scope: GPU, versions, ``plain``'s
    source), else tunes, its cost logged once, and stores it; without ``device``, nothing is
    stored. ``key`` must determine ``flags``. ``prepare(kwargs)`` runs before each later launch,
    as the configurations' pre-hook runs before the tuner's (the TMA descriptors' boxes)."""
    kwargs = _chosen.get(key)
    if kwargs is None:
        kernel = tuned()
        configs = {config_name(c): c for c in kernel.configs}
        tuned_now = []

        def tune() -> str:
            t0 = time.perf_counter()
            compiled = compile_candidates(kernel, grid, args, flags)
            t1 = time.perf_counter()
            # the key here decides when to tune: the tuner's own key may be coarser (the
            # in-place weight gradient's holds no row count), and its cached choice for another
            # row bucket would be stored under this key untimed
            kernel.cache.clear()
            kernel[grid](*args, **flags)
            tuned_now.append(True)
            log.info(
                "moelab: triton tuning for %s took %.1f s (%s; then kept on disk)",
                key[:4],
                time.perf_counter() - t0,
                f"{compiled} candidates compiled in parallel in {t1 - t0:.1f} s"
                if compiled
                else "candidates compiled one by one",
            )
            return config_name(kernel.best_config)

        if device is None:
            name = tune()
        else:
            store = MeasuredChoices(TUNED_CONFIGS, tuple(configs))
            name = store.get(scope(device, (plain,)), repr(key), tune)
        config = configs[name].all_kwargs()
        kwargs = _chosen[key] = dict(flags, **config, **derived(config))
        if tuned_now:  # the tuner launched this call
            return
    if prepare is not None:
        prepare(kwargs)
    kl.launch(plain, grid, args, kwargs, key)


# Triton's benchmark of one candidate configuration, in ms: its defaults (25 warm-up, 100 timed)
# made timing about half of a first tuning once the compiles ran in parallel (run 59), at ~10
# candidates per launch; the candidates have run once before (compile) and then while Triton
# estimates their time, and 20 ms is still 8 runs of the slowest 8192-token GEMM (GPT-OSS's up
# projection, 2.3 ms).
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 20


def bench(kernel_call: Callable, quantiles: tuple) -> list[float]:
    """The autotuners' ``do_bench``: Triton's benchmark over ``TUNE_REP_MS``."""
    return triton.testing.do_bench(
        kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles
    )


def compile_threads() -> int:
    value = kl.setting("MOELAB_TRITON_COMPILE_THREADS", "")
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MOELAB_TRITON_COMPILE_THREADS={value!r}: expected a positive integer")
    return int(value)


def compile_candidates(tuned: Autotuner, grid: kl.Grid, args: tuple, flags: dict) -> int:
    """Compile the autotuned kernel's candidate configurations for this launch in parallel
    threads, so that its tuner, which compiles each just before timing it, finds them compiled;
    returns how many (0: left to the tuner). Compiling, not timing, is most of a first tuning
    (minutes per shape on a fresh cache, BENCHMARKS.md run 51), and Triton's compiler releases
    the GIL for most of its work. A candidate that fails to compile is left to the tuner, which
    skips it as before. Each candidate's pre-hook runs first, as the tuner runs it before each
    launch: it sizes the TMA descriptors' boxes, which are part of the compiled signature."""
    threads = compile_threads()
    tuned.nargs = named = dict(zip(tuned.arg_names, args))
    try:
        candidates = tuned.prune_configs(flags)
    finally:
        tuned.nargs = None
    if threads < 2 or len(candidates) < 2:
        return 0
    workers = min(threads, len(candidates))
    with (
        ThreadPoolExecutor(workers) as pool,
        triton.AsyncCompileMode(pool, ignore_errors=True),
    ):
        for config in candidates:
            meta = dict(flags, **config.all_kwargs())
            if config.pre_hook is not None:
                config.pre_hook(dict(named, **meta))
            tuned.fn.warmup(*args, grid=grid, **meta)
    return len(candidates)


def measured_choice(
    store: MeasuredChoices,
    what: str,
    key: tuple,
    run: Callable[[Choice], object],
    device: torch.device,
    kernels: tuple[JITFunction, ...],
    candidates: tuple[Choice, ...] = (),
) -> Choice:
    """``store``'s choice for ``key`` on this machine; on first use the fastest of
    ``candidates`` (default: all it allows) by ``run(candidate)``, logged once, kept on disk
    (scoped by the sources of the Triton ``kernels`` it chooses between, see ``scope``)."""

    def measure():
        choice = fastest(run, candidates or store.allowed)
        log.info("moelab: triton %s for %s measured: %s", what, key, choice)
        return choice

    def lookup() -> Choice:
        return store.get(scope(device, kernels), repr(key), measure)

    return store.remembered((key, device, kernels), lookup)


@functools.lru_cache(maxsize=8)
def scope(device: torch.device, kernels: tuple) -> str:
    """What a measured choice depends on besides the problem: the GPU, the compilers and the
    kernels' sources (Triton's hashes of them and the functions they call)."""
    name = torch.cuda.get_device_name(device)
    hashes = "/".join(k.cache_key[:12] for k in kernels)
    return f"{name} | triton {triton.__version__} | torch {torch.__version__} | kernels {hashes}"


def fastest(
    run: Callable[[Choice], object], choices: tuple[Choice, ...], reps: int = 5, rounds: int = 3
) -> Choice:
    """The choice whose ``run(choice)`` takes least GPU time: each tuned and warmed first, then
    timed in alternating rounds (best round each), so clock drift favours none."""
    for choice in choices:
        run(choice)
    times = {choice: float("inf") for choice in choices}
    for _ in range(rounds):
        for choice in choices:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                run(choice)
            end.record()
            end.synchronize()
            times[choice] = min(times[choice], start.elapsed_time(end))
    return min(times, key=times.get)
