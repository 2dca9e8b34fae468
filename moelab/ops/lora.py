"""Per-expert LoRA adapters for the stacked expert weights (Split-LoRA).

A projection with frozen base ``W [E, out, in]`` computes, per expert e on its rows X_e,
``X_e W_e^T + scale * (X_e A_e^T) B_e^T`` and never forms ``W + scale * B A``; see
kernel-notes.md for the backward. Shapes follow PEFT's per-expert orientation (design.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# The keys adapters sit under in a params tree: a linear's "lora_a" and "lora_b", an experts
# dict's "lora" subtree.
ADAPTER_KEYS = ("lora", "lora_a", "lora_b")


def is_adapter(path: tuple) -> bool:
    """Whether a params path leads to a LoRA adapter tensor."""
    return any(key in ADAPTER_KEYS for key in path)


class ExpertLoRA(NamedTuple):
    """LoRA adapters for both expert projections.

    Attributes:
        gate_up_a: ``[E, R, H]``; the one A shared by gate and up (Transformers v5 convention).
        gate_up_b: ``[E, 2I, R]``.
        down_a: ``[E, R, I]``.
        down_b: ``[E, H, R]``.
        scale: ``alpha / rank``.
    """

    gate_up_a: torch.Tensor
    gate_up_b: torch.Tensor
    down_a: torch.Tensor
    down_b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        """The smaller of the two ranks (separate gate/up adapters double gate_up's)."""
        return min(self.gate_up_a.shape[1], self.down_a.shape[1])

    @property
    def rank_max(self) -> int:
        """The larger of the two ranks."""
        return max(self.gate_up_a.shape[1], self.down_a.shape[1])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate_up_a, self.gate_up_b, self.down_a, self.down_b

    def check(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> None:
        """Raise ValueError unless the adapters fit experts of shape (E, H, I) in ``dtype``."""
        r1, r2 = self.gate_up_a.shape[1], self.down_a.shape[1]
        expected = {
            "gate_up_a": (num_experts, r1, hidden),
            "gate_up_b": (num_experts, 2 * inter, r1),
            "down_a": (num_experts, r2, inter),
            "down_b": (num_experts, hidden, r2),
        }
        for name, shape in expected.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"lora.{name} must have shape {list(shape)}, got {got}")
            if t.dtype != dtype:
                raise ValueError(f"lora.{name} has dtype {t.dtype}, expected {dtype} like x")
        if min(r1, r2) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {min(r1, r2)}")
        if not isinstance(self.scale, (int, float)):
            raise ValueError(f"lora.scale must be a float, got {type(self.scale).__name__}")


def expert_lora_from_params(params: dict, scale: float) -> ExpertLoRA:
    """An :class:`ExpertLoRA` from a params dict, fused or with separate gate and up adapters.

    Fused: ``gate_up_a, gate_up_b, down_a, down_b``. Separate: ``gate_a [E, R, H]``,
    ``gate_b [E, I, R]``, ``up_a``, ``up_b`` (and the down pair), combined into one rank-2R
    adapter whose B is block-diagonal, so gate and up keep independent updates.
    """
    if "gate_up_a" in params:
        return ExpertLoRA(
            params["gate_up_a"], params["gate_up_b"], params["down_a"], params["down_b"], scale
        )
    gate_b, up_b = params["gate_b"], params["up_b"]
    # each B beside zeros as wide as the other's rank (the two ranks may differ)
    gate_zeros = gate_b.new_zeros(*gate_b.shape[:2], up_b.shape[2])
    up_zeros = up_b.new_zeros(*up_b.shape[:2], gate_b.shape[2])
    b = torch.cat(
        [torch.cat([gate_b, gate_zeros], dim=2), torch.cat([up_zeros, up_b], dim=2)], dim=1
    )
    a = torch.cat([params["gate_a"], params["up_a"]], dim=1)
    return ExpertLoRA(a, b, params["down_a"], params["down_b"], scale)


def init_expert_lora(
    num_experts: int,
    hidden: int,
    inter: int,
    rank: int,
    alpha: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> ExpertLoRA:
    """Fresh adapters in the PEFT convention: A ~ Kaiming-uniform, B = 0 (starts at the base)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")

    def a(fan_in: int) -> torch.Tensor:
        bound = (1.0 / fan_in) ** 0.5  # kaiming_uniform with a=sqrt(5), as nn.Linear and PEFT
        t = torch.empty(num_experts, rank, fan_in, dtype=torch.float32, device=device)
        return t.uniform_(-bound, bound, generator=generator).to(dtype)

    zeros = dict(dtype=dtype, device=device)
    return ExpertLoRA(
        gate_up_a=a(hidden),
        gate_up_b=torch.zeros(num_experts, 2 * inter, rank, **zeros),
        down_a=a(inter),
        down_b=torch.zeros(num_experts, hidden, rank, **zeros),
        scale=alpha / rank,
    )
