"""A block replayed from its own CUDA graphs inside an eager loop computes what the eager block
computes, step after step, and falls back to the eager call wherever a replay would be wrong."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from moelab.bench.experts import block_config, build_block
from moelab.bench.shapes import SHAPES
from moelab.models import tree
from moelab.ops import MoEConfig, moe_block
from moelab.train.graphed_call import GraphedCall, graphed_block, signature

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
SHAPE = SHAPES["tiny"]  # 8 experts, top-2, H 64, I 32
RANK = 8  # bf16 LoRA factors of 16-byte rows, as the GPU backends need


@pytest.fixture(autouse=True)
def _autograds_accumulation(moelab_setting):
    """The eager twins add weight gradients through autograd, as the graphed block's do: the
    triton backend's in-place add (one rounding, not two) would differ from them in the last
    bit."""
    moelab_setting("MOELAB_TRITON_GRAD_IN_PLACE", "0")


def _block(mode: str, backend: str, device: str, dtype=torch.bfloat16):
    params, _ = build_block(SHAPE, mode, RANK, dtype, device, seed=1)
    return params, block_config(SHAPE, backend, RANK)


def _twin(params: dict) -> dict:
    """The same values in separate tensors, with the same requires_grad."""
    twin = copy.deepcopy(params)
    for (_, a), (_, b) in zip(tree.leaves(params), tree.leaves(twin)):
        assert a.requires_grad == b.requires_grad and a.data_ptr() != b.data_ptr()
    return twin


def _trainable(params: dict) -> list[torch.Tensor]:
    return [t for _, t in tree.leaves(params) if t.requires_grad]


def test_graphed_block_refuses_router_stats_and_a_host_synchronising_backend():
    params, _ = _block("lora", "grouped_mm", "cpu", torch.float32)
    with pytest.raises(ValueError, match="router_stats=False"):
        graphed_block(params, MoEConfig(num_experts=8, top_k=2))
    with pytest.raises(ValueError, match="native_torch"):
        graphed_block(params, block_config(SHAPE, "native_torch", RANK))
    with pytest.raises(ValueError, match="at least one eager call"):
        GraphedCall(lambda x, tensors: x, [], warmup=0)
    with pytest.raises(ValueError, match="keep at least one"):
        graphed_block(params, block_config(SHAPE, "triton", RANK), recordings=0)


def test_a_recording_is_kept_only_for_the_same_signature():
    """What makes the graphs record again: x's shape, dtype or requires_grad, autocast's dtype,
    a tensor's storage or requires_grad; not an in-place update of a tensor's values."""
    x, w = torch.zeros(4, 8), torch.zeros(8, 8, requires_grad=True)
    base = signature(x, [w])
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step
    assert signature(x, [w]) == base
    assert signature(torch.zeros(5, 8), [w]) != base
    assert signature(x.double(), [w]) != base
    assert signature(x.requires_grad_(True), [w]) != base
    x.requires_grad_(False)
    assert signature(x, [w.detach().clone().requires_grad_(True)]) != base  # storage moved
    assert signature(x, [w.detach()]) != base  # same storage, no longer trained
    before = torch.get_autocast_dtype("cuda")
    try:
        torch.set_autocast_dtype("cuda", torch.bfloat16 if before != torch.bfloat16 else torch.half)
        assert signature(x, [w]) != base
    finally:
        torch.set_autocast_dtype("cuda", before)
    assert signature(x, [w]) == base


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_off_cuda_or_without_grad_the_call_is_the_eager_one(grad):
    """Nothing is recorded on the CPU (or without gradients): outputs and gradients are the
    eager block's, bit for bit, and the call holds no memory."""
    params, cfg = _block("lora", "grouped_mm", "cpu", torch.float32)
    twin = _twin(params)
    block = graphed_block(params, cfg)
    x = torch.randn(16, SHAPE.hidden, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    with torch.set_grad_enabled(grad):
        out = block(x)
        ref = moe_block(x_twin, twin, cfg)[0]
    assert torch.equal(out, ref) and block.pool_bytes == 0
    if grad:
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        assert torch.equal(x.grad, x_twin.grad)
        for a, b in zip(_trainable(params), _trainable(twin)):
            assert torch.equal(a.grad, b.grad)


def _steps(block, eager, params, twin, xs, gouts):
    """Step both blocks on the same inputs; gradients add up across steps, as eagerly."""
    for x0, g in zip(xs, gouts):
        x, x_twin = (x0.clone().requires_grad_(True) for _ in range(2))
        out, ref = block(x), eager(x_twin)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, x_twin.grad, rtol=0, atol=0)
    for (path, a), (_, b) in zip(tree.leaves(params), tree.leaves(twin)):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=str(path))


@cuda
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_replays_compute_the_eager_steps(mode, backend):
    """Four steps on fresh inputs (new routing each step): the recording's call and three
    replays give the eager block's outputs, x gradients and accumulated weight gradients."""
    params, cfg = _block(mode, backend, "cuda")
    twin = _twin(params)
    block = graphed_block(params, cfg)
    eager = lambda x: moe_block(x, twin, cfg)[0]  # noqa: E731
    xs = [torch.randn(48, SHAPE.hidden, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    gouts = [torch.randn_like(x) for x in xs]
    _steps(block, eager, params, twin, xs, gouts)
    assert block.pool_bytes > 0


@cuda
def test_the_graphs_read_weights_updated_in_place_and_record_again_when_they_move():
    params, cfg = _block("lora", "triton", "cuda")
    twin = _twin(params)
    block = graphed_block(params, cfg)
    eager = lambda x: moe_block(x, twin, cfg)[0]  # noqa: E731
    xs = [torch.randn(32, SHAPE.hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    _steps(block, eager, params, twin, xs, [torch.randn_like(x) for x in xs])
    with torch.no_grad():  # an optimizer step: in place
        for a, b in zip(_trainable(params), _trainable(twin)):
            a.add_(0.5)
            b.add_(0.5)
    _steps(block, eager, params, twin, xs, [torch.randn_like(x) for x in xs])
    assert block.recorded == 1
    lora = params["experts"]["lora"]
    lora["down_b"].data = lora["down_b"].data * 2  # new storage: the old graphs would miss it
    twin["experts"]["lora"]["down_b"].data *= 2
    _steps(block, eager, params, twin, xs, [torch.randn_like(x) for x in xs])
    assert block.recorded == 2


@cuda
def test_a_new_token_count_records_again_and_outputs_stay_the_callers():
    params, cfg = _block("full", "triton", "cuda")
    twin = _twin(params)
    block = graphed_block(params, cfg)
    eager = lambda x: moe_block(x, twin, cfg)[0]  # noqa: E731
    xs = [torch.randn(t, SHAPE.hidden, device="cuda", dtype=torch.bfloat16) for t in (40, 24, 40)]
    _steps(block, eager, params, twin, xs, [torch.randn_like(x) for x in xs])
    with torch.no_grad():
        kept = block(xs[0].clone().requires_grad_(True))
    x = xs[0].clone().requires_grad_(True)
    first = block(x)
    held = first.detach().clone()
    first.sum().backward()
    block(torch.randn_like(x).requires_grad_(True)).sum().backward()  # a replay on new input
    assert torch.equal(first, held)  # the caller's output is a copy, not the static buffer
    assert torch.equal(kept, held)


@cuda
@pytest.mark.parametrize("kept", [1, 2])
def test_token_counts_in_turn_record_once_each_when_kept(kept, caplog):
    """Token counts 40, 24, 40, 24 (length buckets): with two recordings kept each is recorded
    once and replayed after; with one, every change records again. Either way every step is
    the eager block's. Two calls of different counts may then wait for one backward together:
    each replays into its own buffers (no eager fallback), and the gradients are the eager
    ones."""
    params, cfg = _block("lora", "triton", "cuda")
    twin = _twin(params)
    block = graphed_block(params, cfg, recordings=kept)
    eager = lambda x: moe_block(x, twin, cfg)[0]  # noqa: E731
    xs = [torch.randn(t, SHAPE.hidden, device="cuda", dtype=torch.bfloat16) for t in (40, 24) * 2]
    _steps(block, eager, params, twin, xs, [torch.randn_like(x) for x in xs])
    assert block.recorded == (2 if kept == 2 else 4)
    assert block.pool_bytes > 0
    if kept == 1:
        return
    xs = [x.clone().requires_grad_(True) for x in xs[:2]]
    xt = [x.detach().clone().requires_grad_(True) for x in xs]
    with caplog.at_level(logging.WARNING, logger="moelab"):
        loss = block(xs[0]).sum() + block(xs[1]).square().sum()
    assert "run eagerly" not in caplog.text and block.recorded == 2
    ref = eager(xt[0]).sum() + eager(xt[1]).square().sum()
    loss.backward()
    ref.backward()
    for a, b in zip(xs + _trainable(params), xt + _trainable(twin)):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@cuda
def test_a_second_call_before_the_backward_runs_eagerly(caplog):
    """Two micro-batches' forwards, then one backward of the summed loss: the second call
    cannot reuse the recorded buffers (the first still needs them), so it runs eagerly, and
    both calls' gradients are the eager block's."""
    params, cfg = _block("lora", "triton", "cuda")
    twin = _twin(params)
    block = graphed_block(params, cfg)
    eager = lambda x: moe_block(x, twin, cfg)[0]  # noqa: E731
    warm = torch.randn(32, SHAPE.hidden, device="cuda", dtype=torch.bfloat16)
    _steps(block, eager, params, twin, [warm], [torch.randn_like(warm)])  # recorded
    xs = [torch.randn_like(warm).requires_grad_(True) for _ in range(2)]
    xt = [x.detach().clone().requires_grad_(True) for x in xs]
    with caplog.at_level(logging.WARNING, logger="moelab"):
        loss = (block(xs[0]) * 1.5).sum() + block(xs[1]).square().sum()
    assert "run eagerly" in caplog.text
    ref = (eager(xt[0]) * 1.5).sum() + eager(xt[1]).square().sum()
    loss.backward()
    ref.backward()
    for a, b in zip(xs + _trainable(params), xt + _trainable(twin)):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@cuda
def test_a_backward_after_a_later_call_replaced_its_activations_is_refused():
    params, cfg = _block("lora", "triton", "cuda")
    block = graphed_block(params, cfg)
    x = torch.randn(32, SHAPE.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = block(x)
    g = torch.randn_like(out)
    out.backward(g, retain_graph=True)
    first = x.grad.clone()
    out.backward(g, retain_graph=True)  # no call in between: the same activations
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=0)
    block(torch.randn_like(x).requires_grad_(True)).sum().backward()
    with pytest.raises(RuntimeError, match="replaced by a later call"):
        out.backward(g)
