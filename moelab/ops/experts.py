"""The expert-MLP stage: checks the call at the boundary, then hands it to a backend.

Shape suffixes: see :mod:`moelab.ops`. The contract every backend keeps is in design.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moelab.kernels import registry
from moelab.kernels.problem import ExpertProblem
from moelab.ops.activations import ACTIVATIONS
from moelab.ops.lora import ExpertLoRA
from moelab.ops.routing import Routing, is_integer_dtype, should_validate

ACCUMULATE = ("fp32", "input")


def moe_experts(
    x: torch.Tensor,
    routing: Routing | Sequence[torch.Tensor],
    gate_up: torch.Tensor,
    down: torch.Tensor,
    *,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str = "swiglu",
    lora: ExpertLoRA | None = None,
    backend: str | None = "auto",
    accumulate: str = "fp32",
    recompute: bool = False,
    validate: bool | None = None,
) -> torch.Tensor:
    """Run each token through its k experts and sum the outputs with the routing weights.

    Args:
        x: ``[T, H]`` tokens.
        routing: ``(weights [T, K] float, experts [T, K] int)``, e.g. from :func:`route`.
        gate_up: ``[E, 2I, H]`` stacked gate (rows ``< I``) and up (rows ``>= I``) weights.
        down: ``[E, H, I]``.
        gate_up_bias: optional ``[E, 2I]``; down_bias: optional ``[E, H]`` (GPT-OSS).
        activation: ``"swiglu"`` or ``"swiglu_oai"`` (GPT-OSS clamped SwiGLU).
        lora: optional :class:`ExpertLoRA` (Split-LoRA: the merged weight is never formed).
        backend: ``"auto"``, ``"native_torch"``, ``"grouped_mm"`` or ``"triton"``; ``None``
            or ``"auto"`` defers to ``MOELAB_MOE_BACKEND``, then to automatic choice.
        accumulate: ``"fp32"`` sums the k expert outputs in fp32 in slot order (every backend);
            ``"input"`` reproduces the reference models' eager path bit for bit: each expert's
            output times its weight (in the weights' dtype) is rounded to x's dtype and added
            into an x-dtype sum in ascending expert order (``native_torch`` only).
        recompute: keep only x for backward and recompute the pre-activation ``[T*K, 2I]``
            there (one more up projection; ``triton`` only, same bits as keeping it).
        validate: check expert ids are in ``[0, E)`` and distinct within each token, which
            every backend assumes (needs the values on the host; default: only for CPU
            tensors).

    Returns:
        ``[T, H]`` in x's dtype.
    """
    weights_TK, experts_TK = _check_routing(routing)
    num_experts = _check_experts(x, gate_up, down, gate_up_bias, down_bias, activation)
    if weights_TK.shape[0] != x.shape[0]:
        raise ValueError(f"routing covers {weights_TK.shape[0]} tokens but x has {x.shape[0]} rows")
    if weights_TK.shape[1] < 1:
        raise ValueError("routing must pick at least one expert per token (k >= 1), got k=0")
    if weights_TK.shape[1] > num_experts:
        raise ValueError(
            f"top_k={weights_TK.shape[1]} exceeds the number of experts E={num_experts}"
        )
    if weights_TK.device != x.device or experts_TK.device != x.device:
        raise ValueError(f"routing tensors must be on {x.device} like x")
    if should_validate(validate, experts_TK) and experts_TK.numel():
        low, high = int(experts_TK.min()), int(experts_TK.max())
        if low < 0 or high >= num_experts:
            raise ValueError(f"expert ids must be in [0, {num_experts}), got range [{low}, {high}]")
        sorted_TK = experts_TK.sort(dim=1).values
        if bool((sorted_TK[:, 1:] == sorted_TK[:, :-1]).any()):
            raise ValueError("a token's k expert ids must be distinct (as top-k routing gives)")
    if lora is not None:
        if not isinstance(lora, ExpertLoRA):
            raise ValueError(f"lora must be an ExpertLoRA, got {type(lora).__name__}")
        lora.check(num_experts, x.shape[1], down.shape[2], x.dtype)
        if any(t.device != x.device for t in lora.tensors()):
            raise ValueError(f"LoRA tensors must be on {x.device} like x")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"unknown accumulate {accumulate!r}; expected one of {ACCUMULATE}")
    problem = ExpertProblem(
        device=x.device,
        dtype=x.dtype,
        num_tokens=x.shape[0],
        top_k=weights_TK.shape[1],
        num_experts=num_experts,
        hidden=x.shape[1],
        inter=down.shape[2],
        lora_rank=lora.rank if lora is not None else 0,
        lora_rank_max=lora.rank_max if lora is not None else 0,
        has_bias=gate_up_bias is not None or down_bias is not None,
        activation=activation,
        accumulate=accumulate,
        recompute=recompute,
    )
    impl = registry.resolve(None if backend == "auto" else backend, problem)
    if accumulate == "fp32":
        # Routing weights travel in fp32 (fp64 beside fp64 tokens, for reference evaluations).
        weights_TK = weights_TK.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return impl.experts_mlp(
        x,
        weights_TK,
        experts_TK.long(),
        gate_up,
        down,
        gate_up_bias,
        down_bias,
        activation,
        lora,
        accumulate,
        **({"recompute": True} if recompute else {}),
    )


def _check_routing(routing) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(routing, Sequence) or len(routing) != 2:
        raise ValueError("routing must be a Routing(weights [T, K], experts [T, K])")
    weights_TK, experts_TK = routing
    if not isinstance(weights_TK, torch.Tensor) or weights_TK.dim() != 2:
        raise ValueError("routing.weights must be a [T, K] tensor")
    if not weights_TK.is_floating_point():
        raise ValueError(f"routing.weights must be floating point, got {weights_TK.dtype}")
    if not isinstance(experts_TK, torch.Tensor) or experts_TK.shape != weights_TK.shape:
        raise ValueError(
            f"routing.experts must be a tensor shaped like weights {list(weights_TK.shape)}"
        )
    if not is_integer_dtype(experts_TK.dtype):
        raise ValueError(f"routing.experts must hold integer ids, got {experts_TK.dtype}")
    return weights_TK, experts_TK


def _check_experts(x, gate_up, down, gate_up_bias, down_bias, activation) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("x must be a [T, H] tensor")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    hidden = x.shape[1]
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 3 or gate_up.shape[2] != hidden:
        raise ValueError(f"gate_up must be [E, 2I, H={hidden}], got {_shape(gate_up)}")
    num_experts, two_inter = gate_up.shape[:2]
    if two_inter % 2:
        raise ValueError(f"gate_up's middle dim is 2I and must be even, got {two_inter}")
    inter = two_inter // 2
    expected = {
        "gate_up": (gate_up, (num_experts, two_inter, hidden)),
        "down": (down, (num_experts, hidden, inter)),
        "gate_up_bias": (gate_up_bias, (num_experts, two_inter)),
        "down_bias": (down_bias, (num_experts, hidden)),
    }
    for name, (t, shape) in expected.items():
        if t is None and name.endswith("_bias"):
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {_shape(t)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {x.dtype} like x")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected {x.device} like x")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return num_experts


def _shape(t) -> object:
    return list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
