"""AdamW with parameter groups, warmup + cosine schedule, and fp32 masters for bf16 params."""

from __future__ import annotations

import math

import torch

from moelab.models import tree
from moelab.train.config import OptimConfig


class MasterWeights:
    """The optimizer's view of the trainable params: the params themselves when they are
    fp32, else fp32 copies that gradients are copied into and results copied back from.
    Frozen params never get a master, a gradient buffer or optimizer state."""

    def __init__(self, trainable: list[tuple[tree.Path, torch.Tensor]]):
        self.params = [t for _, t in trainable]
        self.paths = [p for p, _ in trainable]
        self.masters = [
            t if t.dtype == torch.float32 else t.detach().float().requires_grad_(True)
            for t in self.params
        ]

    def grads_to_masters(self) -> None:
        """Move the params' gradients into their fp32 masters', adding to what is there: called
        after each micro-batch, the micro-batches sum in fp32, not in the params' dtype (a bf16
        ``.grad`` rounds at every add). The optimizer's ``zero_grad`` clears the masters'."""
        for p, m in zip(self.params, self.masters):
            if m is not p and p.grad is not None:
                if m.grad is None:
                    m.grad = p.grad.float()
                else:
                    m.grad.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)


def _decays(path: tree.Path, master: torch.Tensor) -> bool:
    # NOTE: a bias is told by its name, not its rank: GPT-OSS's stacked expert biases
    # (gate_up_bias [E, 2I], down_bias [E, H]) are 2-D, one bias row per expert
    return master.dim() >= 2 and path[0] != "embed" and not str(path[-1]).endswith("bias")


def param_groups(masters: MasterWeights, weight_decay: float) -> list[dict]:
    """Decay matrices (LoRA factors included); never norms, biases, 1-D tensors or embeddings."""
    decay, no_decay = [], []
    for path, m in zip(masters.paths, masters.masters):
        (decay if _decays(path, m) else no_decay).append(m)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    masters: MasterWeights, cfg: OptimConfig, capturable: bool = False
) -> torch.optim.AdamW:
    """AdamW over the masters; ``capturable`` keeps its step counts on the GPU so that a CUDA
    graph can record the update (:mod:`moelab.train.graphs`)."""
    # on CUDA one fused kernel updates every tensor (the default launches several per tensor
    # group, which at LoRA's many small factors costs more than the arithmetic)
    fused = all(m.is_cuda for m in masters.masters) or None
    return torch.optim.AdamW(
        param_groups(masters, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=fused,
        capturable=capturable,
    )


# How the update runs, not what it has learned: a resumed run keeps its own (torch's
# load_state_dict takes every group option from the checkpoint, so an eager run's checkpoint
# made a graphed run's AdamW non-capturable and its capture failed, run 62)
_EXECUTION_OPTIONS = ("capturable", "fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """``optimizer.load_state_dict(saved)``, keeping this run's execution options and putting
    the step counts where they then belong: on the parameter's device for a capturable or fused
    update, else on the CPU."""
    own = [{k: g[k] for k in _EXECUTION_OPTIONS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, options in zip(optimizer.param_groups, own, strict=True):
        group.update(options)
        on_device = group.get("capturable") or group.get("fused")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                where = p.device if on_device else torch.device("cpu")
                state["step"] = state["step"].to(where)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps, cfg.warmup_steps, cfg.min_lr_ratio),
    )
