"""Run-time choices a model forward takes, separate from the architecture's config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardOptions:
    """How to run a forward (the architecture itself is the family's Config).

    Attributes:
        backend: expert-MLP backend (``"auto"``, ``"native_torch"``, ``"grouped_mm"``, ...).
        attention: ``"sdpa"`` or ``"eager"`` (reference-exact math, for parity checks).
        lora_scale: ``alpha / rank`` applied to every LoRA adapter in the params.
        lora_dropout: dropout on the inputs of dense LoRA adapters (set it for training only).
        checkpoint_layers: recompute each decoder layer in backward instead of keeping its
            activations (activation checkpointing).
        moe_recompute: the expert MLP keeps only its input and recomputes the pre-activation
            in backward (one more GEMM, ``2 I k`` fewer saved elements per token; ``triton``).
        accumulate: ``"fp32"`` k-sum of expert outputs, or ``"input"`` for the reference
            models' eager numerics (bit-exact parity checks; ``native_torch`` only).
    """

    backend: str | None = "auto"
    attention: str = "sdpa"
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    accumulate: str = "fp32"
    checkpoint_layers: bool = False
    moe_recompute: bool = False

    def moe_fields(self) -> dict:
        """The run-time fields of a family's ``MoEConfig`` (the family adds the architecture)."""
        return dict(
            lora_scale=self.lora_scale,
            lora_dropout=self.lora_dropout,
            backend=self.backend,
            accumulate=self.accumulate,
            recompute=self.moe_recompute,
        )
