"""Backends of the expert MLP, one module each, one contract (design.md).

``native_torch`` (loop over experts, the reference), ``grouped_mm`` (torch grouped GEMM) and
``triton`` (fused kernels). :func:`available` names those that run here; :mod:`registry` picks.
"""

from moelab.kernels.registry import BACKENDS, available

__all__ = ["BACKENDS", "available"]
