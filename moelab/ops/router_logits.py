"""The router's linear layer, handing its input on to the experts, so that the two gradients of
that input (through the router and through the experts) are summed by the router's backward
product itself.

Left to autograd, ``dlogits W`` is a product of its own, added to the experts' gradient of x in
a separate elementwise pass: 0.037 ms together at Qwen3-30B-A3B, 8192 tokens, LoRA, of a 3.1 ms
block step, 0.052 ms at GPT-OSS-20B (BENCHMARKS.md, runs 154 and 156). Here x's gradient is
``dx_experts + dlogits W`` in one pass, rounded once (``moelab.kernels.add_product`` on the GPU
in half precision, else ``addmm``). The experts' gradient is only read, never overwritten:
autograd may hand one gradient tensor to several inputs (an addition's backward does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.kernels import add_product as ap


class _RouterLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, weight_EH, bias_E):
        ctx.save_for_backward(x_TH, weight_EH)
        ctx.set_materialize_grads(False)  # a missing gradient stays None, not a zero tensor
        return F.linear(x_TH, weight_EH, bias_E), x_TH.view_as(x_TH)

    @staticmethod
    def backward(ctx, dlogits_TE, dx_TH):
        x_TH, weight_EH = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        if dlogits_TE is None:  # the logits did not reach the loss
            return dx_TH if need_x else None, None, None
        dx = dw = db = None
        if need_x:
            if dx_TH is None:
                dx = dlogits_TE @ weight_EH
            elif not torch.is_grad_enabled() and ap.runs(dx_TH, dlogits_TE, weight_EH):
                dx = ap.add_product(dx_TH, dlogits_TE, weight_EH)
            else:  # also a backward that builds a graph (create_graph): addmm has a backward
                dx = torch.addmm(dx_TH, dlogits_TE, weight_EH)
        if need_w:
            dw = dlogits_TE.t() @ x_TH
        if need_b:
            db = dlogits_TE.sum(0)
        return dx, dw, db


def router_logits(
    x_TH: torch.Tensor, weight_EH: torch.Tensor, bias_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x W^T + b, x)``: the router logits ``[T, E]`` and x for the experts, whose gradient
    this layer's backward adds its own to (same dtypes). A router in another dtype than x (fp32
    weights of DeepSeek/GLM checkpoints with bf16 activations) runs on x cast to its dtype, and x
    is handed on as it is: its two gradients are then summed by autograd."""
    if x_TH.dtype != weight_EH.dtype:
        return F.linear(x_TH.to(weight_EH.dtype), weight_EH, bias_E), x_TH
    return _RouterLinear.apply(x_TH, weight_EH, bias_E)
