"""Bad input to moe_experts and backend selection: clear errors, explicit choices."""

from __future__ import annotations

import logging

import pytest
import torch

from moelab.kernels import available, registry
from moelab.kernels.problem import ExpertProblem
from moelab.ops import ExpertLoRA, Routing, moe_experts

T, H, I, E, K = 5, 16, 8, 4, 2


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(dtype)
    routing = Routing(
        torch.full((T, K), 0.5), torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    )
    gate_up = torch.randn(E, 2 * I, H, generator=g).to(dtype)
    down = torch.randn(E, H, I, generator=g).to(dtype)
    return x, routing, gate_up, down


def _lora(r=8, dtype=torch.float32, **override):
    shapes = dict(gate_up_a=(E, r, H), gate_up_b=(E, 2 * I, r), down_a=(E, r, I), down_b=(E, H, r))
    tensors = {k: torch.zeros(*v, dtype=dtype) for k, v in shapes.items()}
    tensors.update(override)
    return ExpertLoRA(**tensors, scale=1.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(x=a["x"][:, :-1]), r"gate_up must be \[E, 2I, H=15\]"),
        (lambda a: a.update(x=a["x"][0]), r"x must be a \[T, H\] tensor"),
        (lambda a: a.update(down=a["down"][:, :, :-1]), r"down must have shape \[4, 16, 8\]"),
        (lambda a: a.update(gate_up=a["gate_up"][:, :-1]), "must be even"),
        (lambda a: a.update(down=a["down"].double()), "down has dtype torch.float64"),
        (lambda a: a.update(x=a["x"].long()), "floating point"),
        (
            lambda a: a.update(routing=Routing(a["routing"][0][:3], a["routing"][1][:3])),
            "routing covers 3 tokens",
        ),
        (
            lambda a: a.update(routing=Routing(a["routing"][0], a["routing"][1].float())),
            "integer ids",
        ),
        (
            lambda a: a.update(routing=Routing(a["routing"][0], a["routing"][1] + 3)),
            r"expert ids must be in \[0, 4\), got range \[3, 6\]",
        ),
        (
            lambda a: a.update(routing=Routing(a["routing"][0], a["routing"][1] - 1)),
            "expert ids must be in",
        ),
        (
            lambda a: a.update(
                routing=Routing(a["routing"][0], a["routing"][1][:, :1].repeat(1, 2))
            ),
            "must be distinct",
        ),
        (
            lambda a: a.update(routing=Routing(a["routing"][0][:, :0], a["routing"][1][:, :0])),
            "at least one expert per token",
        ),
        (
            lambda a: a.update(
                routing=Routing(torch.ones(T, 5), torch.zeros(T, 5, dtype=torch.long))
            ),
            "top_k=5 exceeds the number of experts E=4",
        ),
        (lambda a: a.update(routing=(a["routing"][0],)), "routing must be a Routing"),
        (lambda a: a.update(activation="gelu"), "unknown activation"),
        (lambda a: a.update(gate_up_bias=torch.zeros(E, I)), r"gate_up_bias must have shape"),
        (lambda a: a.update(lora=_lora(gate_up_a=torch.zeros(E, 8, H + 1))), r"lora.gate_up_a"),
        (
            lambda a: a.update(lora=_lora(down_b=torch.zeros(E, H, 8).double())),
            "lora.down_b has dtype",
        ),
        (lambda a: a.update(backend="cutlass"), "unknown expert backend 'cutlass'"),
    ],
)
def test_bad_input_raises_value_error(change, message):
    x, routing, gate_up, down = _inputs()
    args = dict(
        x=x,
        routing=routing,
        gate_up=gate_up,
        down=down,
        activation="swiglu",
        gate_up_bias=None,
        lora=None,
        backend="native_torch",
    )
    change(args)
    with pytest.raises(ValueError, match=message):
        moe_experts(
            args.pop("x"), args.pop("routing"), args.pop("gate_up"), args.pop("down"), **args
        )


def _problem(hidden=16, inter=8, dtype=torch.bfloat16, rank=0, experts=4, rank_max=0):
    return ExpertProblem(
        device=torch.device("cpu"),
        dtype=dtype,
        num_tokens=4,
        top_k=2,
        num_experts=experts,
        hidden=hidden,
        inter=inter,
        lora_rank=rank,
        has_bias=False,
        activation="swiglu",
        lora_rank_max=rank_max,
    )


def test_available_backends_on_this_machine():
    names = available()
    assert "native_torch" in names and "grouped_mm" in names
    assert "triton" in names  # CUDA, or the CPU interpreter the test session switches on
    assert set(names) <= set(registry.BACKENDS)


def test_selection_order_argument_env_auto(monkeypatch):
    problem = _problem()
    assert registry.resolve(None, problem).NAME == "grouped_mm"  # auto: fastest that runs
    monkeypatch.setenv("MOELAB_MOE_BACKEND", "native_torch")
    assert registry.resolve(None, problem).NAME == "native_torch"
    assert registry.resolve("grouped_mm", problem).NAME == "grouped_mm"  # argument wins
    monkeypatch.setenv("MOELAB_MOE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="from MOELAB_MOE_BACKEND"):
        registry.resolve(None, problem)


def test_resolution_is_kept_per_request_and_logged_again_after_forget(monkeypatch, caplog):
    """Each block call resolves its backend: the answer is kept per (request, environment,
    problem), so the backends' checks run once, the log line stays once, and
    ``forget_logged`` (a new run in the process) logs and resolves afresh."""
    calls = []
    check = registry.unsupported_reason
    monkeypatch.setattr(registry, "unsupported_reason", lambda *a: calls.append(a) or check(*a))
    registry.forget_logged()
    problem = _problem()
    with caplog.at_level(logging.INFO, logger="moelab"):
        names = {registry.resolve(None, problem).NAME for _ in range(3)}
        assert names == {"grouped_mm"} and len(calls) == 2  # triton (CPU: skipped), grouped_mm
        assert caplog.text.count("expert backend grouped_mm") == 1
        monkeypatch.setenv("MOELAB_MOE_BACKEND", "native_torch")
        assert registry.resolve(None, problem).NAME == "native_torch"  # the variable is read
        monkeypatch.delenv("MOELAB_MOE_BACKEND")
        registry.forget_logged()
        assert registry.resolve(None, problem).NAME == "grouped_mm"
    assert len(calls) == 5 and caplog.text.count("expert backend grouped_mm") == 2


@pytest.mark.parametrize(
    "problem, message",
    [
        (_problem(hidden=12), "H=12 is not a multiple of 8"),
        (_problem(inter=6, dtype=torch.float32), "I=6 is not a multiple of 4"),
        (_problem(rank=4), "r=4 is not a multiple of 8"),
        (_problem(rank=8, rank_max=20), "the larger r=20 is not a multiple of 8"),
        (_problem(dtype=torch.float64), "bf16, fp16 or fp32"),
        (_problem(experts=2000), "at most 1023 groups"),
    ],
)
def test_grouped_mm_refuses_what_it_cannot_run_and_auto_skips_it(problem, message):
    with pytest.raises(ValueError, match=message):
        registry.resolve("grouped_mm", problem)
    assert registry.resolve("auto", problem).NAME == "native_torch"


def test_misaligned_bf16_call_falls_back_to_native(caplog):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, generator=g).bfloat16()
    routing = Routing(torch.ones(3, 1), torch.tensor([[0], [1], [1]]))
    gate_up, down = torch.randn(2, 12, 12).bfloat16(), torch.randn(2, 12, 6).bfloat16()
    with caplog.at_level(logging.INFO, logger="moelab"):
        out = moe_experts(x, routing, gate_up, down)
    assert out.shape == (3, 12)
    assert "native_torch" in caplog.text and "grouped_mm: grouped_mm needs 16-byte" in caplog.text
    with pytest.raises(ValueError, match="cannot run this call: grouped_mm needs 16-byte strides"):
        moe_experts(x, routing, gate_up, down, backend="grouped_mm")


def test_triton_bounds_the_larger_lora_rank(monkeypatch):
    """Separate gate and up adapters double gate_up's rank: the kernels' rank blocks are sized
    by the larger rank, which the bound must see (the smaller alone passed 256 through)."""
    from moelab.kernels import triton as tr

    monkeypatch.setattr(tr.kl, "interpreting", lambda: True)  # a CPU problem, also on a GPU host

    assert tr.unsupported_reason(_problem(rank=128, rank_max=128)) is None
    assert "256 exceeds 128" in tr.unsupported_reason(_problem(rank=128, rank_max=256))
    lora = _lora(8, gate_up_a=torch.zeros(E, 16, H), gate_up_b=torch.zeros(E, 2 * I, 16))
    assert (lora.rank, lora.rank_max) == (8, 16)
