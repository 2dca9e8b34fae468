"""Which expert-MLP backend runs a call.

Selection: explicit argument > ``MOELAB_MOE_BACKEND`` > ``auto``. ``auto`` takes the first
backend of :data:`AUTO_ORDER` that can run the problem (fastest first); an explicit request for a
backend that cannot run it raises ValueError with the reason. The environment variable is read
here, at selection time, and nowhere else. The choice is logged once per distinct outcome.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

from moelab.kernels.problem import ExpertProblem

log = logging.getLogger("moelab")

BACKENDS = ("native_torch", "grouped_mm", "triton")
AUTO_ORDER = ("triton", "grouped_mm", "native_torch")
ENV_VAR = "MOELAB_MOE_BACKEND"
_logged: set[tuple[str, str]] = set()


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"moelab.kernels.{name}")


def machine_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine at all, or None if it can."""
    try:
        module = _module(name)
    except ModuleNotFoundError as e:  # the backend or a package it needs is missing
        return f"cannot import it ({e})"
    check = getattr(module, "machine_reason", None)
    return check() if check is not None else None


def available() -> list[str]:
    """Names of the backends that can run on this machine (for some shapes)."""
    return [name for name in BACKENDS if machine_reason(name) is None]


def unsupported_reason(name: str, problem: ExpertProblem) -> str | None:
    """Why backend ``name`` cannot run ``problem``, or None if it can."""
    reason = machine_reason(name)
    return reason if reason is not None else _module(name).unsupported_reason(problem)


def resolve(backend: str | None, problem: ExpertProblem) -> ModuleType:
    """The backend module that runs ``problem``; see the module docstring for the order."""
    name, why = _resolve(backend, os.environ.get(ENV_VAR), problem)
    _log_once(name, why)
    return _module(name)


# Every block call resolves (a few tens of microseconds of host time while the GPU waits for the
# step's first kernel, BENCHMARKS.md run 88); the answer depends only on the request, the
# environment variable and the problem, as long as what this machine can run stays the same.
@functools.lru_cache(maxsize=256)
def _resolve(backend: str | None, env: str | None, problem: ExpertProblem) -> tuple[str, str]:
    """``(backend name, why it was chosen)``; raises ValueError as :func:`resolve` documents."""
    requested = backend or env or "auto"
    source = "argument" if backend else (ENV_VAR if env else "default")
    if requested == "auto":
        skipped = []
        for name in AUTO_ORDER:
            reason = unsupported_reason(name, problem)
            if reason is None:
                auto_check = getattr(_module(name), "auto_reason", None)
                reason = auto_check(problem) if auto_check is not None else None
            if reason is None:
                return name, f"auto ({source}); skipped: {'; '.join(skipped) or 'none'}"
            skipped.append(f"{name}: {reason}")
        raise ValueError(f"no expert backend can run this problem: {'; '.join(skipped)}")
    if requested not in BACKENDS:
        raise ValueError(
            f"unknown expert backend {requested!r} (from {source}); "
            f"expected 'auto' or one of {BACKENDS}"
        )
    reason = unsupported_reason(requested, problem)
    if reason is not None:
        raise ValueError(f"expert backend {requested!r} cannot run this call: {reason}")
    return requested, f"requested by {source}"


def forget_logged() -> None:
    """Log the next choices again (a new run in the same process, e.g. a Hydra sweep job) and
    resolve them afresh."""
    _logged.clear()
    _resolve.cache_clear()


def _log_once(name: str, why: str) -> None:
    if (name, why) not in _logged:
        _logged.add((name, why))
        log.info("moelab: expert backend %s (%s)", name, why)
