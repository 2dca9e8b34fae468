"""Pure tensor functions of a Mixture-of-Experts layer.

Shape-suffix legend, used by every module under ``moelab/ops`` and ``moelab/kernels``:

    B batch, S sequence, T tokens, K top-k slots, N = T*K routed rows, E experts,
    H hidden, I expert width, G = 2I (fused gate_up), R LoRA rank, V vocabulary.

So ``x_TH`` is a [tokens, hidden] tensor, ``gate_up_EGH`` the stacked [E, 2I, H] expert weight
and ``offs_E`` the int32 group ends of the expert-sorted rows. Scalars stay plain.

The MoE layer is four stages: ``route -> dispatch -> expert MLP -> combine``. ``route`` lives in
:mod:`moelab.ops.routing`, dispatch and combine in :mod:`moelab.ops.dispatch`, the expert MLP in
the backends under :mod:`moelab.kernels`, reached through :func:`moe_experts`.
"""

from moelab.ops.activations import ACTIVATIONS
from moelab.ops.experts import moe_experts
from moelab.ops.lora import ExpertLoRA
from moelab.ops.moe import MoEConfig, RouterStats, moe_block
from moelab.ops.routing import (
    ROUTER_KINDS,
    Routing,
    expert_counts,
    load_balancing_loss,
    route,
    router_entropy,
    router_z_loss,
)

__all__ = [
    "ACTIVATIONS",
    "ExpertLoRA",
    "MoEConfig",
    "ROUTER_KINDS",
    "RouterStats",
    "Routing",
    "expert_counts",
    "load_balancing_loss",
    "moe_block",
    "moe_experts",
    "route",
    "router_entropy",
    "router_z_loss",
]
