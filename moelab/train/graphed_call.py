"""One differentiable call replayed from two CUDA graphs, inside an ordinary eager loop.

``block = graphed_block(params, cfg)`` then ``out = block(x)`` and later ``out.backward(...)``
(or any loss built on ``out``), as with ``moe_block(x, params, cfg)[0]``. The block's forward is
recorded once as one graph and its backward as another; each call copies ``x`` in and replays
the forward, and autograd replays the backward. The host then issues two replays instead of the
block's few dozen launches: an eager training loop gets the block's GPU time without its
launching (BENCHMARKS.md: the eager block step waits 0.5-0.9 ms on the host before its first
large kernel, and some hosts take longer to issue the step than the GPU takes to run it). At
Qwen3-30B-A3B width, 8192 tokens, LoRA: 4.00 ms eager, 3.29 graphed, 3.17 for the whole step
from one graph (run 124).

What it keeps, and what it falls back on:

- Results are the eager call's: the same kernels run on the same inputs. The output and the
  gradient of ``x`` are copies, so the next replay never overwrites a tensor the caller holds;
  parameter gradients go to autograd, which adds them into ``.grad`` as it would eagerly.
- The recorded activations of one call live in the graphs' buffers until its backward. A call
  made while an earlier one still waits for its backward (two forwards, then one loss) runs
  eagerly instead, so both stay correct; a backward whose activations a later call has replaced
  (``retain_graph`` and a second backward after a new call) is refused.
- A new shape, dtype or ``requires_grad`` of ``x``, a change of autocast, a tensor of
  ``params`` that now requires grad or not, or one whose storage moved (``p.data = ...``)
  records the graphs again (:func:`signature`). In-place
  updates (an optimizer step) need nothing: the graphs read the same memory.
- ``recordings`` (default 1) keeps that many signatures' graphs, least recently used dropped
  first, so that a loop over a few token counts (length buckets) records each once instead of
  at every change. Calls of two different signatures may also wait for their backwards
  together: each has its own buffers. A dropped recording's memory goes back once no call of it
  waits for its backward; one made before a tensor's storage moved is not used again and holds
  the old storage until it is dropped.
- Off CUDA, with gradients disabled, or inside another capture (``trainer.cuda_graph``) the call
  runs eagerly. The backend must not synchronise with the host (``triton`` and, on sm_90 and
  sm_100, ``grouped_mm`` do not; ``native_torch`` does and is refused; torch's ``grouped_mm``
  on other GPUs falls back to a loop that does, and the recording fails with that said).
- Memory: the recorded activations and gradients stay allocated between steps (``pool_bytes``,
  summed over the recordings kept).
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from moelab.models.tree import leaves, map_leaves
from moelab.ops import MoEConfig, moe_block

log = logging.getLogger("moelab")


class _Recording:
    """The two graphs of one input signature, their static tensors, and which call owns them."""

    def __init__(self, key: tuple, trainable: list[torch.Tensor]):
        self.key = key
        self.trainable = trainable
        self.static_x: torch.Tensor | None = None
        self.stand_ins: list[torch.Tensor] = []  # what the graphs read the tensors through
        self.static_outs: tuple[torch.Tensor, ...] = ()
        self.static_gouts: tuple[torch.Tensor, ...] = ()
        self.static_grads: tuple[torch.Tensor | None, ...] = ()
        self.forward: torch.cuda.CUDAGraph | None = None
        self.backward: torch.cuda.CUDAGraph | None = None
        self.replays = 0  # forward replays so far: which call the static activations belong to
        self._owner: weakref.ref | None = None  # the call whose backward has not run yet
        self.pool_bytes = 0

    def busy(self) -> bool:
        """Whether a replayed call's activations still wait for its backward."""
        return self._owner is not None and self._owner() is not None

    def claim(self) -> _Claim:
        claim = _Claim()
        self._owner = weakref.ref(claim)
        self.replays += 1
        return claim

    def release(self) -> None:
        self._owner = None


class _Claim:
    """Held by one replayed call's autograd node: while it lives and its backward has not run,
    the static activations are that call's (autograd dropping the node drops the claim)."""


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rec: _Recording, x: torch.Tensor, *trainable: torch.Tensor):
        rec.static_x.copy_(x)
        rec.forward.replay()
        ctx.rec, ctx.claim, ctx.replay = rec, rec.claim(), rec.replays
        outs = tuple(o.clone() for o in rec.static_outs)
        ctx.mark_non_differentiable(*(o for o in outs if not o.is_floating_point()))
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gouts: torch.Tensor):
        rec: _Recording = ctx.rec
        if rec.replays != ctx.replay:
            raise RuntimeError(
                "graphed call: this call's recorded activations were replaced by a later call "
                "(a second backward with retain_graph after a new call); run the eager function "
                "for that"
            )
        for static, g in zip(rec.static_gouts, gouts):
            if static is not None:
                static.copy_(g)
        rec.backward.replay()
        rec.release()
        grads = iter(rec.static_grads)
        dx = next(grads) if rec.static_x.requires_grad else None
        # x's gradient flows on into ops that may keep it or add into it in place: a copy.
        # A leaf's goes to autograd's accumulation, which copies or adds it; a view's is a copy.
        out = [None, None if dx is None else dx.clone()]
        for t, g in zip(rec.trainable, grads):
            out.append(g if g is None or t.is_leaf else g.clone())
        return tuple(out)


class GraphedCall:
    """``fn(x, tensors)`` replayed from CUDA graphs (see the module docstring): ``tensors``
    are every tensor ``fn`` reads besides ``x``, and it must read them from its argument, not
    from elsewhere (the recording passes stand-ins; see ``_record``). Those that require grad
    get gradients."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor | tuple[torch.Tensor, ...]],
        tensors: Sequence[torch.Tensor],
        warmup: int = 2,
        recordings: int = 1,
    ):
        if warmup < 1:
            raise ValueError(
                f"warmup={warmup}: at least one eager call must run before the recording "
                "(the backends tune and make their workspaces there)"
            )
        if recordings < 1:
            raise ValueError(f"recordings={recordings}: keep at least one")
        self.fn = fn
        self.tensors = list(tensors)
        self.warmup = warmup
        self.recordings = recordings
        self._recs: OrderedDict[tuple, _Recording] = OrderedDict()  # least recently used first
        self.recorded = 0  # recordings made so far (a new signature, or one dropped earlier)
        self._single = True  # fn returned one tensor, not a tuple (set by the recording)
        self._warned = False

    @property
    def pool_bytes(self) -> int:
        """Device memory the recordings kept hold between calls (0 before the first)."""
        return sum(rec.pool_bytes for rec in self._recs.values())

    def __call__(self, x: torch.Tensor):
        if not x.is_cuda or not torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
            return self.fn(x, self.tensors)
        trainable = [t for t in self.tensors if t.requires_grad]
        if not (x.requires_grad or trainable):
            return self.fn(x, self.tensors)  # nothing to differentiate: no backward to record
        key = signature(x, self.tensors)
        rec = self._recs.get(key)
        if rec is None:
            rec = self._record(x, key, trainable)
        elif rec.busy():
            if not self._warned:
                log.warning(
                    "graphed call: called again before the last call's backward; such calls run "
                    "eagerly (correct, not replayed)"
                )
                self._warned = True
            return self.fn(x, self.tensors)
        self._recs.move_to_end(key)
        outs = _Replay.apply(rec, x, *rec.trainable)
        return outs[0] if self._single else outs

    def _record(self, x: torch.Tensor, key: tuple, trainable: list[torch.Tensor]) -> _Recording:
        while len(self._recs) >= self.recordings:  # the dropped ones' memory goes back first
            self._recs.popitem(last=False)
        device = x.device
        rec = _Recording(key, trainable)
        static_x = x.detach().clone().requires_grad_(x.requires_grad)
        # The recording reads the tensors through new leaves over the same memory: autograd
        # keeps a leaf's gradient node, and the stream it was made on, while any graph through
        # it lives (the caller's last output), and a backward recorded on another stream would
        # then wait on that one, which a capture refuses.
        rec.stand_ins = [t.detach().requires_grad_(t.requires_grad) for t in self.tensors]
        inputs = ([static_x] if x.requires_grad else []) + [
            t for t in rec.stand_ins if t.requires_grad
        ]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            # the backends tune, measure and make their per-stream workspaces here, not in
            # the recording; autograd.grad leaves every .grad alone
            for _ in range(self.warmup):
                outs = self._outputs(static_x, rec.stand_ins)
                _grads(outs, inputs)
            del outs
        # the graphs' private pool keeps every block they use, freed or not: count it as reserved
        # memory, from after the warm-ups' cached blocks are returned
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(device)
        try:
            self._capture(rec, static_x, inputs, stream)
        except RuntimeError as e:
            raise RuntimeError(
                f"graphed call: recording the call as CUDA graphs failed ({e}); the function must "
                "not synchronise with the host (native_torch does, and so does torch's grouped_mm "
                "on GPUs other than sm_90 and sm_100, where it falls back to a loop)"
            ) from e
        finally:
            torch.cuda.current_stream(device).wait_stream(stream)
        rec.static_x = static_x
        held = [static_x, *(g for g in rec.static_gouts if g is not None)]
        rec.pool_bytes = (
            torch.cuda.memory_reserved(device)
            - before
            + sum(t.numel() * t.element_size() for t in held)
        )
        self._recs[key] = rec
        self.recorded += 1
        log.info(
            "graphed call: recorded forward and backward for x %s %s (%d trainable tensors), "
            "%.0f MiB held between calls",
            tuple(x.shape),
            x.dtype,
            len(trainable),
            rec.pool_bytes / 2**20,
        )
        return rec

    def _capture(
        self,
        rec: _Recording,
        static_x: torch.Tensor,
        inputs: list[torch.Tensor],
        stream: torch.cuda.Stream,
    ) -> None:
        pool = torch.cuda.graph_pool_handle()
        rec.forward = torch.cuda.CUDAGraph()
        with torch.cuda.graph(rec.forward, pool=pool, stream=stream):
            static_outs = self._outputs(static_x, rec.stand_ins)
        differentiable = [o for o in static_outs if o.requires_grad]
        if not differentiable:
            raise RuntimeError("no output of fn requires grad")
        gouts = tuple(torch.empty_like(o) if o.requires_grad else None for o in static_outs)
        rec.static_gouts = gouts
        rec.backward = torch.cuda.CUDAGraph()
        with torch.cuda.graph(rec.backward, pool=pool, stream=stream):
            rec.static_grads = torch.autograd.grad(
                differentiable, inputs, [g for g in gouts if g is not None], allow_unused=True
            )
        rec.static_outs = tuple(o.detach() for o in static_outs)

    def _outputs(self, x: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.fn(x, tensors)
        self._single = isinstance(out, torch.Tensor)
        outs = (out,) if self._single else tuple(out)
        if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
            raise TypeError(
                f"graphed call: fn must return a tensor or a tuple of tensors, got {type(out)}"
            )
        return outs


def signature(x: torch.Tensor, tensors: Sequence[torch.Tensor]) -> tuple:
    """What a recording is only good for: ``x``'s shape, dtype, device and ``requires_grad``,
    autocast's state, and each tensor's storage and ``requires_grad`` (an in-place update keeps
    them; ``p.data = ...`` does not)."""
    return (
        x.shape,
        x.dtype,
        x.device,
        x.requires_grad,
        torch.is_autocast_enabled("cuda"),
        torch.get_autocast_dtype("cuda"),
        tuple((t.data_ptr(), t.requires_grad) for t in tensors),
    )


def _grads(outs: tuple[torch.Tensor, ...], inputs: list[torch.Tensor]) -> None:
    differentiable = [o for o in outs if o.requires_grad]
    if differentiable and inputs:
        torch.autograd.grad(
            differentiable, inputs, [torch.ones_like(o) for o in differentiable], allow_unused=True
        )


def graphed_block(
    params: dict, cfg: MoEConfig, warmup: int = 2, recordings: int = 1
) -> GraphedCall:
    """``x -> moe_block(x, params, cfg)[0]`` replayed from CUDA graphs (``cfg.router_stats``
    off: the statistics would be recorded too, and the trainer's blocks that use them run under
    ``trainer.cuda_graph`` instead); ``recordings`` signatures kept (see the module)."""
    if cfg.router_stats:
        raise ValueError(
            "graphed_block returns the block's output only: build it with "
            "MoEConfig(router_stats=False)"
        )
    if cfg.backend == "native_torch":
        raise ValueError(
            "graphed_block: backend 'native_torch' reads the expert counts on the host, which a "
            "CUDA graph cannot record; use 'triton', 'grouped_mm' or 'auto'"
        )
    tensors = [t for _, t in leaves(params)]

    def block(x: torch.Tensor, given: list[torch.Tensor]) -> torch.Tensor:
        it = iter(given)
        return moe_block(x, map_leaves(lambda path, t: next(it), params), cfg)[0]

    return GraphedCall(block, tensors, warmup, recordings)
