"""Tuning the triton backend's launches on this machine, once: the autotuner's configuration per
launch key, and choices between kernels timed against each other, both kept on disk
(:class:`moelab.kernels.measured.MeasuredChoices`) so that later processes skip the work.

``MOELAB_TRITON_AUTOTUNE=0`` turns both off (CI, reproducibility): every launch takes its fixed
configuration and every choice its default.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch
import triton

from moelab.kernels import launch as kl
from moelab.kernels.measured import MeasuredChoices

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


def config_name(config: triton.Config) -> str:
    """A Triton configuration as text: its constexprs, warps and stages, in a fixed order."""
    return ",".join(f"{k}={v}" for k, v in sorted(config.all_kwargs().items()))


def run_tuned(
    plain, tuned: Callable, key: tuple, grid, args: tuple, flags: dict,
    derived: Callable[[dict], dict] = lambda config: {},
    prepare: Callable[[dict], None] | None = None, device: torch.device | None = None,
) -> None:  # fmt: skip
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
            kernel[grid](*args, **flags)
            tuned_now.append(True)
            log.info(
                "moelab: triton tuning for %s took %.1f s (then kept on disk)",
                key[:4],
                time.perf_counter() - t0,
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


def measured_choice(
    store: MeasuredChoices, what: str, key: tuple, run: Callable, device: torch.device,
    kernels: tuple, candidates: tuple = (),
):  # fmt: skip
    """``store``'s choice for ``key`` on this machine; on first use the fastest of
    ``candidates`` (default: all it allows) by ``run(candidate)``, logged once, kept on disk
    (scoped by the sources of the Triton ``kernels`` it chooses between, see ``scope``)."""

    def measure():
        choice = fastest(run, candidates or store.allowed)
        log.info("moelab: triton %s for %s measured: %s", what, key, choice)
        return choice

    return store.get(scope(device, kernels), repr(key), measure)


@functools.lru_cache(maxsize=8)
def scope(device: torch.device, kernels: tuple) -> str:
    """What a measured choice depends on besides the problem: the GPU, the compilers and the
    kernels' sources (Triton's hashes of them and the functions they call)."""
    name = torch.cuda.get_device_name(device)
    hashes = "/".join(k.cache_key[:12] for k in kernels)
    return f"{name} | triton {triton.__version__} | torch {torch.__version__} | kernels {hashes}"


def fastest(run: Callable, choices: tuple, reps: int = 5, rounds: int = 3):
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
