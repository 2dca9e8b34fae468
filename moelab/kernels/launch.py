"""Launching Triton kernels with little host time: after a kernel's first launch for a key
(through the JIT), later launches go to the compiled kernel's launcher directly.

The JIT binds and specialises every argument on every call, and the compiled kernel's runner
builds launch metadata and calls the (empty by default) launch hooks; on the GPU machine's host
that was tens of microseconds per launch, and an eager MoE block step issues about 17 launches
while the GPU waits for the first large one (BENCHMARKS.md, runs 22-29).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from triton import knobs as triton_knobs

if TYPE_CHECKING:
    from triton.runtime.jit import JITFunction

# a launch's grid: its sizes, or a function of its constexprs that gives them
Grid = tuple[int, ...] | Callable[[dict], tuple[int, ...]]


@functools.cache
def setting(name: str, default: str) -> str:
    """An environment setting, read once per process (``setting.cache_clear()`` re-reads): the
    launchers ask on every launch, and ``os.environ`` costs about a microsecond a call."""
    return os.environ.get(name, default)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of ints, as ``triton.cdiv``: on the host that one is a constexpr
    function whose wrapper costs about 1.4 us a call (Triton 3.6 and later), and a block step
    asks about 50 times."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two not below ``n`` (0 for 0), as ``triton.next_power_of_2``
    without its wrapper's host time (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def persistent_programs(device: torch.device, tiles_at_most: int, per_sm: int) -> int:
    """A persistent kernel's grid: ``per_sm`` programs per SM, at most one per tile. The CPU
    interpreter gets 3, so that its tests give programs several tiles each."""
    if device.type != "cuda":
        return min(tiles_at_most, 3)
    return min(tiles_at_most, per_sm * _multiprocessors(device))


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=8)
def capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability, asked of torch once per device (backward passes
    ask on every call)."""
    return torch.cuda.get_device_capability(device)


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return setting("TRITON_INTERPRET", "0") == "1"


class _Direct(NamedTuple):
    """What a compiled kernel's launcher takes besides the grid, stream and arguments."""

    compiled: object  # triton's CompiledKernel
    run: object  # its launcher: (grid x, y, z, stream, function, metadata, hooks..., *args)
    function: int
    metadata: object
    constexprs: tuple  # the launch's constexpr values, in argument order (fixed by the key)


# by launch key, device and argument specialisation (``arg_spec``)
_compiled: dict[tuple, _Direct] = {}
_I32_MAX = 2**31 - 1


def arg_spec(args: tuple) -> tuple:
    """At least as fine as Triton's specialisation of the runtime arguments ``args``: tensors by
    dtype and 16-byte alignment; ints from 2 to the i32 limit by divisibility by 16, as Triton
    specialises them, so a token count that moves reuses the launchers already compiled instead
    of going through the JIT at each new count; other ints (1, which Triton makes a constant,
    0, negative, i64 and u64) by value; floats and bools by type (fp32 and i1 arguments, never
    specialised); descriptors by dtype and box. A plain loop: this runs on every launch, and a
    generator costs a third more."""
    spec = []
    add = spec.append
    for a in args:
        kind = a.__class__
        if kind is int:
            add((a & 15) == 0 if 1 < a <= _I32_MAX else (a,))
        elif kind is float or kind is bool:
            add(kind)
        elif isinstance(a, torch.Tensor):
            add(a.dtype)
            add(a.data_ptr() & 15)
        else:
            add(a.base.dtype)
            add(tuple(a.block_shape))
    return tuple(spec)


def launch(kernel: JITFunction, grid: Grid, args: tuple, kwargs: dict, key: tuple) -> None:
    """``kernel[grid](*args, **kwargs)``; on the GPU, after the first call of ``key`` with
    arguments specialised alike, by the compiled kernel's launcher directly
    (``MOELAB_TRITON_DIRECT=0``: always through the JIT). ``key`` must hold every constexpr in
    ``kwargs``; ``grid`` is a tuple or a function of the constexprs."""
    if interpreting() or setting("MOELAB_TRITON_DIRECT", "1") == "0":
        _check_positional(kernel, args)  # here too, so that the CPU tests see every call site
        kernel[grid](*args, **kwargs)
        return
    device = _current_device()
    spec = _spec(key, device, args)
    direct = _compiled.get(spec)
    if direct is None:
        _check_positional(kernel, args)
        compiled = kernel[grid](*args, **kwargs)
        tail = tuple(kwargs[name] for name in kernel.arg_names[len(args) :])
        # fmt: off
        _compiled[spec] = _Direct(compiled, compiled.run, compiled.function,
                                  compiled.packed_metadata, tail)
        # fmt: on
        return
    size = grid(kwargs) if callable(grid) else grid
    size = (*size, 1, 1)[:3]
    if _launch_hooks_set():  # e.g. a profiler's: Triton's own path calls them
        direct.compiled[size](*args, *direct.constexprs)
        return
    # fmt: off
    direct.run(*size, _raw_stream(device), direct.function, direct.metadata, None, None, None,
               *args, *direct.constexprs)
    # fmt: on


def _check_positional(kernel: JITFunction, args: tuple) -> None:
    """Refuse a launch whose positional ``args`` are not exactly the kernel's runtime parameters:
    a constexpr among them would have its value compiled in while ``arg_spec`` keys ints and
    floats by kind, and a runtime parameter passed by keyword would keep its first value in the
    direct launcher's stored constexprs; either way a later launch would run wrong values."""
    if not inspect.isfunction(getattr(kernel, "fn", None)):
        return  # not a Triton kernel over a Python function (a stand-in): nothing to read
    if _constexpr_positions(kernel) != tuple(range(len(args), _parameter_count(kernel))):
        raise ValueError(
            f"{kernel.__name__}: pass the runtime arguments by position and the constexprs by "
            "keyword"
        )


@functools.cache
def _constexpr_positions(kernel: JITFunction) -> tuple[int, ...]:
    """Positions of the kernel's ``tl.constexpr`` parameters, read from its Python signature
    (the JIT and the interpreter's functions alike)."""
    params = inspect.signature(kernel.fn).parameters.values()
    return tuple(i for i, p in enumerate(params) if "constexpr" in str(p.annotation))


@functools.cache
def _parameter_count(kernel: JITFunction) -> int:
    return len(inspect.signature(kernel.fn).parameters)


def direct_launch(key: tuple, args: tuple) -> _Direct | None:
    """The compiled kernel ``launch`` goes to for ``key`` and ``args`` (None before the first
    launch), for benchmarks of the launch paths."""
    return _compiled.get(_spec(key, _current_device(), args))


def _spec(key: tuple, device: int, args: tuple) -> tuple:
    """What a compiled kernel in ``_compiled`` is kept by: the launch key, the device (Triton
    compiles and loads kernels per device) and the arguments' specialisation."""
    return key, device, arg_spec(args)


def _launch_hooks_set() -> bool:
    """Whether launch hooks are registered (Triton keeps them in chains, empty by default)."""
    runtime = triton_knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True) != []:
            return True
    return False


def _current_device() -> int:
    """The device Triton's own launches use: the current one."""
    return torch.cuda.current_device()


def _raw_stream(device: int) -> int:
    """The raw handle of ``device``'s current CUDA stream (what Triton's launches use)."""
    return torch._C._cuda_getCurrentRawStream(device)
