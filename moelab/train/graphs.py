"""A training step captured once as a CUDA graph and replayed: one launch for the whole step.

A moelab step makes no host synchronisation, so the host could run ahead of the GPU; but it
launches a few thousand kernels (LoRA adapters, norms, the expert kernels' launchers), and at
real width and one sequence per step that launching takes about as long as the GPU's work.
Replaying a captured graph costs the host one call. The step's shapes must not change between
calls (a new input shape captures again), its optimizer must be capturable
(``build_optimizer(..., capturable=True)``), and everything that tunes or measures itself
(Triton autotuning, the triton backend's measured choices) must have run before the capture:
the first call runs the step once eagerly on the capture stream for that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CapturedStep:
    """``step(batch)`` for one fixed-shape batch tensor, replayed from a CUDA graph."""

    def __init__(self, step: Callable[[torch.Tensor], None]):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: torch.Tensor | None = None

    def capture(self, batch: torch.Tensor) -> None:
        """Run the step once eagerly (a real step: the optimizer moves), then record it (which
        runs nothing)."""
        if not batch.is_cuda:
            raise ValueError(f"CUDA graphs need a CUDA batch, got {batch.device}")
        self.graph = self.static_batch = None  # the old graph's memory goes back first
        stream = torch.cuda.Stream(batch.device)
        stream.wait_stream(torch.cuda.current_stream(batch.device))
        self.static_batch = batch.detach().clone().requires_grad_(batch.requires_grad)
        with torch.cuda.stream(stream):
            # library handles and workspaces are made per stream, lazily: not during capture
            self.step(self.static_batch)
        self.static_batch.grad = None  # recorded fresh, not accumulated replay after replay
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self.step(self.static_batch)
        torch.cuda.current_stream(batch.device).wait_stream(stream)
        self.graph = graph

    def __call__(self, batch: torch.Tensor) -> None:
        """One step on ``batch``: a replay, or, for a new shape, the capture's eager step."""
        if self.graph is None or batch.shape != self.static_batch.shape:
            self.capture(batch)  # its eager step has trained on this batch: no replay
            return
        with torch.no_grad():
            self.static_batch.copy_(batch)
        self.graph.replay()
