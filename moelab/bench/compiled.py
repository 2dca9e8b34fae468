"""A plain-PyTorch MoE block on torch's grouped GEMM, for ``torch.compile`` to optimise.

The baseline a researcher writes without custom kernels: sort the (token, slot) rows by
expert, gather, grouped GEMMs with Split-LoRA as separate rank-r grouped GEMMs, SwiGLU, weight,
scatter-add back. Autograd differentiates it; ``torch.compile`` fuses what it can. It is timed
beside moelab's backends by ``python -m moelab.bench experts --backends compiled_grouped_mm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.bench.shapes import BlockShape
from moelab.kernels import grouped_mm
from moelab.ops import route
from moelab.ops.activations import activation_forward

NAME = "compiled_grouped_mm"


def _gmm(a_MK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return grouped_mm._grouped_mm_op()(a_MK, w_ENK.transpose(1, 2), offs=offs_E)


def _lora(a_MK, w_ENK, lora_a, lora_b, scale: float, offs_E) -> torch.Tensor:
    y = _gmm(a_MK, w_ENK, offs_E)
    if lora_a is not None:
        y = y + scale * _gmm(_gmm(a_MK, lora_a, offs_E), lora_b, offs_E)
    return y


def block(x_TH: torch.Tensor, params: dict, shape: BlockShape, scale: float) -> torch.Tensor:
    router, ex = params["router"], params["experts"]
    lora = ex.get("lora", {})
    logits = F.linear(x_TH, router["weight"], router.get("bias"))
    # torch's router ops (not moelab's Triton router), all of it for torch.compile to fuse
    routing = route(logits, shape.router, shape.top_k, fused=False)
    experts_N = routing.experts.reshape(-1)
    order_N = experts_N.argsort(stable=True)
    counts_E = torch.zeros(shape.num_experts, device=x_TH.device, dtype=torch.int32)
    counts_E.scatter_add_(0, experts_N.int(), torch.ones_like(experts_N, dtype=torch.int32))
    offs_E = counts_E.cumsum(0, dtype=torch.int32)
    token_N = order_N // shape.top_k
    expert_sorted = experts_N[order_N]
    # gathers by index_select, whose gradient is an index_add: indexing's (x[idx]) is an
    # index_put that sorts the indices, the suspect (not measured) of the bias gradients' cost
    # that made GPT-OSS full fine-tune 2.5-5x its LoRA row in runs 41 and 46
    h = _lora(
        x_TH.index_select(0, token_N), ex["gate_up"], lora.get("gate_up_a"),
        lora.get("gate_up_b"), scale, offs_E,
    )  # fmt: skip
    if "gate_up_bias" in ex:
        h = h + ex["gate_up_bias"].index_select(0, expert_sorted)
    y = _lora(
        activation_forward(h, shape.activation),
        ex["down"],
        lora.get("down_a"),
        lora.get("down_b"),
        scale,
        offs_E,
    )
    if "down_bias" in ex:
        y = y + ex["down_bias"].index_select(0, expert_sorted)
    w_N = routing.weights.reshape(-1)[order_N].to(y.dtype)
    out = torch.zeros_like(x_TH, dtype=torch.float32)
    return out.index_add_(0, token_N, (y * w_N[:, None]).float()).to(x_TH.dtype)
