"""MoE block shapes of real models, for benchmarks (see performance.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockShape:
    hidden: int
    inter: int
    num_experts: int
    top_k: int
    router: str
    activation: str
    biases: bool  # expert and router biases (GPT-OSS)


SHAPES = {
    "qwen3-30b-a3b": BlockShape(2048, 768, 128, 8, "softmax_topk", "swiglu", biases=False),
    "gpt-oss-20b": BlockShape(2880, 2880, 32, 4, "topk_softmax", "swiglu_oai", biases=True),
    "tiny": BlockShape(64, 32, 8, 2, "softmax_topk", "swiglu", biases=False),
}


def moe_flops(shape: BlockShape, tokens: int, mode: str, rank: int) -> float:
    """Forward+backward FLOPs of the expert MLP by the convention of kernel-notes.md."""
    rows = tokens * shape.top_k
    h, i = shape.hidden, shape.inter
    if mode == "full":
        return 18.0 * rows * h * i
    return 12.0 * rows * h * i + 6.0 * rows * rank * (2 * h + 3 * i)
