"""The MoE block: router -> routed experts (+ optional shared expert), with router statistics.

Parameters are a plain dict (design.md, "Parameters are data")::

    {"router":  {"weight": [E, H], "bias": [E]?, "correction_bias": [E]?},
     "experts": {"gate_up": [E, 2I, H], "down": [E, H, I], "gate_up_bias": [E, 2I]?,
                 "down_bias": [E, H]?,
                 "lora": {"gate_up_a", "gate_up_b", "down_a", "down_b"}  (or separate gate/up,
                          see :func:`moelab.ops.lora.expert_lora_from_params`)?},
     "shared":  {"gate_proj": {"weight": [S, H]}, "up_proj": ..., "down_proj": ...}?,
     "shared_gate": {"weight": [1, H]}?}

The shared expert is a dense :func:`moelab.ops.linear.swiglu_mlp` (its linears may carry LoRA);
with ``shared_gate`` its output is scaled by ``sigmoid(x w^T)`` (Qwen2-MoE style).

The router runs in the dtype of its weight (fp32 for DeepSeek/GLM checkpoints, bf16 for Qwen),
so the selection matches the reference models; routing math itself is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from moelab.ops.experts import moe_experts
from moelab.ops.linear import linear, swiglu_mlp
from moelab.ops.lora import expert_lora_from_params
from moelab.ops.router_logits import router_logits
from moelab.ops.routing import (
    expert_counts,
    load_balancing_loss,
    route,
    router_entropy,
    router_z_loss,
)


@dataclass(frozen=True)
class MoEConfig:
    """Static description of a MoE block.

    ``router_options`` are passed to :func:`moelab.ops.route` (``renormalize``, ``n_group``,
    ``topk_group``, ``routed_scaling_factor``); a correction bias comes from the params.
    """

    num_experts: int
    top_k: int
    router: str = "softmax_topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    activation: str = "swiglu"
    lora_scale: float = 1.0
    lora_dropout: float = 0.0  # on the inputs of dense (shared-expert) adapters
    backend: str | None = "auto"
    accumulate: str = "fp32"  # "input": the reference models' eager numerics (moe_experts)
    recompute: bool = False  # recompute the expert pre-activation in backward (moe_experts)
    # the balance and z losses, counts and entropy; off, the block launches nothing for them
    # (about 25 small kernels) and returns None in their place
    router_stats: bool = True


class RouterStats(NamedTuple):
    """Router statistics of one block call (fp32 scalars and ``[E]`` int64 counts)."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    counts: torch.Tensor
    entropy: torch.Tensor


def moe_block(
    x: torch.Tensor, params: dict, cfg: MoEConfig
) -> tuple[torch.Tensor, RouterStats | None]:
    """Apply the MoE block to ``x [..., H]``; returns the output (same shape) and router stats
    (None unless ``cfg.router_stats``)."""
    x_TH = x.reshape(-1, x.shape[-1])
    router = params["router"]
    # x_TH from here on: the router's backward adds its x gradient to the experts' in one pass
    logits_TE, x_TH = router_logits(x_TH, router["weight"], router.get("bias"))
    options = dict(cfg.router_options)
    if router.get("correction_bias") is not None:
        options["correction_bias"] = router["correction_bias"]
    # "input" accumulation reproduces the reference models' eager numerics: torch's router ops
    routing = route(logits_TE, cfg.router, cfg.top_k, fused=cfg.accumulate == "fp32", **options)

    if cfg.accumulate == "input":
        # the reference models weigh expert outputs in the router logits' dtype
        routing = type(routing)(routing.weights.to(logits_TE.dtype), routing.experts)
    experts = params["experts"]
    lora = None
    if experts.get("lora") is not None:
        lora = expert_lora_from_params(experts["lora"], cfg.lora_scale)
    out_TH = moe_experts(
        x_TH,
        routing,
        experts["gate_up"],
        experts["down"],
        gate_up_bias=experts.get("gate_up_bias"),
        down_bias=experts.get("down_bias"),
        activation=cfg.activation,
        lora=lora,
        backend=cfg.backend,
        accumulate=cfg.accumulate,
        recompute=cfg.recompute,
    )
    if params.get("shared") is not None:
        shared_TH = swiglu_mlp(x_TH, params["shared"], cfg.lora_scale, cfg.lora_dropout)
        if params.get("shared_gate") is not None:
            shared_TH = shared_TH * torch.sigmoid(linear(x_TH, params["shared_gate"]))
        out_TH = out_TH + shared_TH

    if not cfg.router_stats:
        return out_TH.view(x.shape), None
    probs_TE = _router_probs(logits_TE, cfg.router)
    counts_E = expert_counts(routing.experts, cfg.num_experts)
    stats = RouterStats(
        aux_loss=load_balancing_loss(probs_TE, routing.experts, counts_E),
        z_loss=router_z_loss(logits_TE),
        counts=counts_E,
        entropy=router_entropy(probs_TE.detach()),
    )
    return out_TH.view(x.shape), stats


def _router_probs(logits_TE: torch.Tensor, kind: str) -> torch.Tensor:
    """A distribution over experts per token, for the balance loss and entropy metrics."""
    if kind == "sigmoid_group_topk":
        scores_TE = logits_TE.float().sigmoid()
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    return logits_TE.float().softmax(dim=-1)
