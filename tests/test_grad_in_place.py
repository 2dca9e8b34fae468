"""The triton backend adds a full fine-tune's expert weight gradients and the LoRA factors'
gradients into existing ``.grad`` tensors itself (``tg.adds_in_place``), exactly where autograd
would add them in place."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE, TOLERANCE, rel_err
from test_experts import CASES, LORA_NAMES, make_problem, routing_of, run_reference

from moelab.kernels import triton_grads as tg
from moelab.kernels import triton_tuning as tuning
from moelab.ops import moe_experts

IN_PLACE_CASES = [c for c in CASES if c.name in ("basic", "T=1", "k=1", "empty experts",
                                                 "all tokens on one expert",
                                                 "T below a tile, wide H")]  # fmt: skip


@pytest.fixture
def added(monkeypatch):
    """The weights whose gradient the backend added in place, in call order."""
    weights: list[torch.Tensor] = []
    real = tg.add_weight_grad

    def counted(grad, a, b, offs):
        weights.append(grad)
        real(grad, a, b, offs)

    monkeypatch.setattr(tg, "add_weight_grad", counted)
    return weights


@pytest.fixture
def factors_added(monkeypatch):
    """The outputs that ``tg.expert_grad`` added into, in call order (LoRA factors' ``.grad``)."""
    outs: list[torch.Tensor] = []
    real = tg.expert_grad

    def counted(*args, add=False, **kwargs):
        if add:
            outs.append(args[3])
        return real(*args, add=add, **kwargs)

    monkeypatch.setattr(tg, "expert_grad", counted)
    return outs


def _forward(p: dict) -> torch.Tensor:
    # fmt: off
    return moe_experts(p["x"], routing_of(p), p["gate_up"], p["down"],
                       gate_up_bias=p["gate_up_bias"], down_bias=p["down_bias"],
                       activation=p["activation"], lora=p["lora"], backend="triton")
    # fmt: on


def _old_grad(like: torch.Tensor, ref_grad: torch.Tensor) -> torch.Tensor:
    """An earlier gradient of the reference's size (so that the new one is not lost in it)."""
    size = float(ref_grad.norm()) / ref_grad.numel() ** 0.5
    return (torch.randn(ref_grad.shape, dtype=torch.float64) * size).to(like)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no prefetch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["full", "full_oai_bias", "all_trainable"])
@pytest.mark.parametrize("case", IN_PLACE_CASES, ids=lambda c: c.name)
def test_added_in_place_matches_reference(added, monkeypatch, case, variant, dtype, prefetch):
    """Two backward passes: the first finds no ``.grad`` (autograd's path), the second one
    there (added in place); each ends at the old gradient plus the float64 one. The fixed
    configuration, with and without the next tile's old values loaded ahead."""
    monkeypatch.setitem(tg._ADD_FIXED, "PREFETCH", prefetch)
    p = make_problem(case, variant, dtype, seed=21)
    _, ref = run_reference(p, routing_of(p).experts)
    gate_up, down = p["gate_up"], p["down"]
    _forward(p).backward(p["dout"])
    assert added == []
    tol = TOLERANCE[dtype]
    assert rel_err(gate_up.grad, ref["gate_up"]) <= tol
    old_gate_up, old_down = (_old_grad(p[name], ref[name]) for name in ("gate_up", "down"))
    gate_up.grad, down.grad = old_gate_up.clone(), old_down.clone()
    x_grad = p["x"].grad.clone()
    _forward(p).backward(p["dout"])
    assert [w is gate_up.grad for w in added] == [False, True]  # down's first, then gate_up's
    for name, old in (("gate_up", old_gate_up), ("down", old_down)):
        grad = p[name].grad
        assert rel_err(grad.double() - old.double(), ref[name]) <= tol, name
        if case.name == "empty experts":
            assert torch.equal(grad[list(case.cold)], old[list(case.cold)]), name
    assert rel_err(p["x"].grad - x_grad, ref["x"]) <= tol  # x's gradient still accumulates


def test_only_where_autograd_would_add_in_place(added, moelab_setting):
    """Not under ``torch.autograd.grad``, ``create_graph``, with a hook, nor with the setting
    off; a bad setting is refused."""
    case = next(c for c in CASES if c.name == "basic")
    p = make_problem(case, "full", torch.float32, seed=22)
    gate_up, down = p["gate_up"], p["down"]
    gate_up.grad, down.grad = torch.zeros_like(gate_up), torch.zeros_like(down)

    (dw1,) = torch.autograd.grad(_forward(p), [gate_up], p["dout"])
    assert added == [] and dw1.abs().sum() > 0 and gate_up.grad.abs().sum() == 0

    _forward(p).backward(p["dout"], create_graph=True)
    assert added == []
    gate_up.grad, down.grad = torch.zeros_like(gate_up), torch.zeros_like(down)

    seen = []
    handle = gate_up.register_hook(lambda g: seen.append(g))
    _forward(p).backward(p["dout"])
    handle.remove()
    assert added == [down.grad] and len(seen) == 1
    torch.testing.assert_close(gate_up.grad, dw1, rtol=0, atol=0)

    added.clear()
    moelab_setting("MOELAB_TRITON_GRAD_IN_PLACE", "0")
    _forward(p).backward(p["dout"])
    assert added == []
    moelab_setting("MOELAB_TRITON_GRAD_IN_PLACE", "yes")
    with pytest.raises(ValueError, match="MOELAB_TRITON_GRAD_IN_PLACE='yes'"):
        _forward(p).backward(p["dout"])


def test_non_contiguous_grad_keeps_autograds_path(added):
    case = next(c for c in CASES if c.name == "basic")
    p = make_problem(case, "full", torch.float32, seed=23)
    down = p["down"]
    down.grad = torch.zeros(down.shape[::-1], device=TEST_DEVICE).transpose(0, 2)
    _forward(p).backward(p["dout"])
    assert down.grad not in added and added == []


@pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_added_in_place_inside_a_cuda_graph(added):
    """Forward and backward recorded with ``.grad`` already there (a captured training step
    with gradient accumulation), replayed twice: the same bits as two eager steps."""
    case = next(c for c in CASES if c.name == "empty experts")
    p = make_problem(case, "full", torch.bfloat16, seed=24)
    gate_up, down = p["gate_up"], p["down"]
    _forward(p).backward(p["dout"])  # .grad exists from here on
    start = gate_up.grad.clone(), down.grad.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _forward(p).backward(p["dout"])  # warm-up on the recording's stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    added.clear()
    with torch.cuda.graph(graph):
        _forward(p).backward(p["dout"])
    assert [w is gate_up.grad for w in added] == [False, True]
    for grad, old in zip((gate_up.grad, down.grad), start):
        grad.copy_(old)
    graph.replay()
    graph.replay()
    replayed = gate_up.grad.clone(), down.grad.clone()
    for grad, old in zip((gate_up.grad, down.grad), start):
        grad.copy_(old)
    for _ in range(2):
        _forward(p).backward(p["dout"])
    assert torch.equal(replayed[0], gate_up.grad) and torch.equal(replayed[1], down.grad)
    assert not torch.equal(replayed[0], start[0])


def _factors(p: dict) -> dict[str, torch.Tensor]:
    return dict(zip(LORA_NAMES, p["lora"].tensors()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["lora", "all_trainable"])
@pytest.mark.parametrize("case", IN_PLACE_CASES, ids=lambda c: c.name)
def test_lora_factors_added_in_place_match_reference(factors_added, case, variant, dtype):
    """As for the weights: the first backward finds no ``.grad`` (autograd's path), the second
    finds earlier gradients there and adds each factor's into its own, once rounded; each ends
    at the old gradient plus the float64 one, an empty expert's rows untouched."""
    p = make_problem(case, variant, dtype, seed=25)
    _, ref = run_reference(p, routing_of(p).experts)
    factors = _factors(p)
    _forward(p).backward(p["dout"])
    assert factors_added == []
    tol = TOLERANCE[dtype]
    olds = {}
    for name, factor in factors.items():
        assert rel_err(factor.grad, ref[name]) <= tol, name
        olds[name] = _old_grad(factor, ref[name])
        factor.grad = olds[name].clone()
    x_grad = p["x"].grad.clone()
    _forward(p).backward(p["dout"])
    assert {id(g) for g in factors_added} == {id(f.grad) for f in factors.values()}
    assert len(factors_added) == 4
    for name, factor in factors.items():
        assert rel_err(factor.grad.double() - olds[name].double(), ref[name]) <= tol, name
        if case.name == "empty experts":
            cold = list(case.cold)
            assert torch.equal(factor.grad[cold], olds[name][cold]), name
    assert rel_err(p["x"].grad - x_grad, ref["x"]) <= tol


def test_lora_factors_only_where_autograd_would_add_in_place(factors_added, moelab_setting):
    """Not under ``torch.autograd.grad``, nor ``create_graph``, nor for a factor with a hook
    (the others still are), nor with the setting off."""
    case = next(c for c in CASES if c.name == "basic")
    p = make_problem(case, "lora", torch.float32, seed=26)
    factors = _factors(p)
    for factor in factors.values():
        factor.grad = torch.zeros_like(factor)

    (da1,) = torch.autograd.grad(_forward(p), [factors["lora_a1"]], p["dout"])
    assert factors_added == [] and da1.abs().sum() > 0

    _forward(p).backward(p["dout"], create_graph=True)
    assert factors_added == []
    for factor in factors.values():
        factor.grad = torch.zeros_like(factor)

    seen = []
    handle = factors["lora_b2"].register_hook(lambda g: seen.append(g))
    _forward(p).backward(p["dout"])
    handle.remove()
    assert len(seen) == 1 and len(factors_added) == 3
    assert all(g is not factors["lora_b2"].grad for g in factors_added)
    torch.testing.assert_close(factors["lora_a1"].grad, da1, rtol=0, atol=0)

    factors_added.clear()
    moelab_setting("MOELAB_TRITON_GRAD_IN_PLACE", "0")
    _forward(p).backward(p["dout"])
    assert factors_added == []


@pytest.fixture
def cold_tuning(moelab_setting, monkeypatch, tmp_path):
    """Autotuning on, from an empty cache, wherever the kernels run: on the CPU interpreter each
    candidate runs three times and is given the same time (Triton's benchmark needs CUDA)."""
    moelab_setting("MOELAB_TRITON_COMPILE_THREADS", "1")
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "autotune_enabled", lambda: True)
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "scope", lambda device, kernels: f"test {device}")
    if TEST_DEVICE.type != "cuda":

        def bench(kernel_call, quantiles):
            for _ in range(3):
                kernel_call()
            return [1.0] * len(quantiles)

        monkeypatch.setattr(tuning, "bench", bench)
    # the autotuned kernels are made once per process, with the benchmark of their day
    factories = (tg._expert_grad_kernel, tg._weight_add_kernel)
    for factory in factories:
        factory.cache_clear()
    yield
    for factory in factories:
        factory.cache_clear()


@pytest.mark.parametrize("kernel", ["LoRA factor", "expert weight"])
def test_a_tuned_in_place_add_adds_once(cold_tuning, kernel):
    """Tuning an in-place add runs every candidate on the real ``.grad``; each run is undone, so
    the tuned launch leaves old + new, and the next launch (the stored choice) old + 2 new."""
    dtype = torch.bfloat16
    counts = torch.tensor([40, 0, 72, 16])
    rows, experts, a_dim, b_dim = int(counts.sum()), 4, 32, 48
    offs_E = counts.cumsum(0).to(TEST_DEVICE, torch.int32)
    a = (torch.randn(rows, a_dim) * 0.5).to(TEST_DEVICE, dtype)
    b = (torch.randn(rows, b_dim) * 0.5).to(TEST_DEVICE, dtype)
    old = torch.randn(experts, a_dim, b_dim).to(TEST_DEVICE, dtype)
    new = torch.zeros(experts, a_dim, b_dim, dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts.tolist()):
        new[e] = a[start : start + n].double().cpu().t() @ b[start : start + n].double().cpu()
        start += n
    grad = old.clone()

    def add() -> None:
        if kernel == "LoRA factor":
            tg.expert_grad(a, b, offs_E, grad, grad.stride(), 1.0, add=True)
        else:
            tg.add_weight_grad(grad, a, b, offs_E)

    for times in (1, 2):
        add()
        added = grad.double().cpu() - old.double().cpu()
        assert rel_err(added, times * new) <= TOLERANCE[dtype], times
        assert torch.equal(grad[1], old[1])  # the empty expert's
