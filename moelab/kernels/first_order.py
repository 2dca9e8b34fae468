"""Backward passes built from kernels have no backward of their own: a second derivative
through one (a gradient penalty: ``create_graph=True``, then a loss on the gradients) must
raise, never return a result that silently lacks the kernels' second-order terms.

torch's ``once_differentiable`` does not do this on every route. Its error node hangs off the
gradients' detached copies and the incoming gradient only, so ``torch.autograd.grad(penalty,
[weight])`` finds no path to ``weight`` through it: it returns None (``allow_unused=True``),
complains that ``weight`` was not used, or, for ``penalty + loss``, silently returns the loss's
gradient alone. ``first_order_backward`` ties the gradients to every tensor they depend on
(the incoming gradients and the saved tensors that require grad) through a node that raises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


class _Raises(torch.autograd.Function):
    """Passes gradients through; differentiating them raises."""

    @staticmethod
    def forward(ctx, message: str, count: int, *grads_then_inputs: torch.Tensor):
        ctx.message = message
        return grads_then_inputs[:count]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def first_order_backward(what: str, hint: str = "") -> Callable:
    """Decorate an autograd Function's ``backward`` (under ``@staticmethod``): it runs without
    building a graph, and under ``create_graph=True`` its gradients come out tied to the
    incoming gradients and the saved tensors that require grad through a node that raises
    "``what`` has no second derivative ... ``hint``" when differentiated. Without
    ``create_graph`` it costs one check. ``backward`` finds ``ctx.create_graph`` set."""
    message = (
        f"{what} has no second derivative: its backward is built from kernels that have no "
        f"backward of their own{'; ' + hint if hint else ''}"
    )

    def wrap(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def run(ctx, *grad_outputs):
            ctx.create_graph = torch.is_grad_enabled()
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():  # no create_graph: nothing will differentiate them
                return grads
            single = not isinstance(grads, tuple)
            grads = (grads,) if single else grads
            present = [g for g in grads if isinstance(g, torch.Tensor)]
            inputs = [t for t in (*grad_outputs, *ctx.saved_tensors)
                      if isinstance(t, torch.Tensor) and t.requires_grad]  # fmt: skip
            if not present or not inputs:
                return grads[0] if single else grads
            tied = iter(_Raises.apply(message, len(present), *present, *inputs))
            out = tuple(next(tied) if isinstance(g, torch.Tensor) else g for g in grads)
            return out[0] if single else out

        return run

    return wrap
