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
    lora_rank: int  # 0 without LoRA
    has_bias: bool
    activation: str
    accumulate: str = "fp32"
    recompute: bool = False  # recompute the pre-activation in backward instead of keeping it
