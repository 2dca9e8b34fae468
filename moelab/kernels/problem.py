"""The description of one expert-MLP call that backends judge their support on."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertProblem:
    device: torch.device
    dtype: torch.dtype
    num_tokens: int
    top_k: int
    num_experts: int
    hidden: int
    inter: int
    lora_rank: int  # 0 without LoRA; the smaller of the up and down adapters' ranks
    has_bias: bool
    activation: str
    accumulate: str = "fp32"
    recompute: bool = False  # recompute the pre-activation in backward instead of keeping it
    lora_rank_max: int = 0  # the larger rank where the two differ (separate gate/up adapters)

    @property
    def lora_rank_largest(self) -> int:
        return max(self.lora_rank, self.lora_rank_max)

    @property
    def lora_z_width(self) -> int:
        """Columns of the two rank-r products kept per routed row (z1 and z2)."""
        return self.lora_rank + self.lora_rank_largest
