"""Every expert backend against the float64 reference: output and every gradient.

Shapes name the edge they cover. Routing comes from real router logits, so the gradient to the
logits (through the routing weights) is checked too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import LOGITS_GRAD_MIN_TOKENS, LOGITS_GRAD_TOLERANCE, TEST_DEVICE, TOLERANCE, rel_err
from reference import reference_experts

from moelab.kernels import grouped_mm
from moelab.kernels.problem import ExpertProblem
from moelab.kernels.registry import unsupported_reason
from moelab.ops import ExpertLoRA, moe_experts, route

BACKENDS = ["native_torch", "grouped_mm", "triton"]
DTYPES = [torch.float32, torch.bfloat16]


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int = 24
    hidden: int = 16
    inter: int = 8
    experts: int = 6
    top_k: int = 2
    cold: tuple[int, ...] = ()  # experts that receive no token
    hot: int | None = None  # expert every token picks
    rank: int = 8


CASES = [
    Case("basic"),
    Case("T=1", tokens=1),
    Case("k=1", top_k=1),
    Case("E=1", experts=1, top_k=1),
    Case("k=E, prime E", experts=5, top_k=5),
    Case("empty experts", experts=8, cold=(0, 3, 4, 7)),
    Case("all tokens on one expert", experts=4, top_k=1, hot=2),
    Case("one hot expert, k=2", tokens=40, experts=6, hot=5),
    Case("T below a tile, wide H", tokens=3, hidden=64, inter=24, experts=3),
]

# variant -> (activation, biases, lora, base weights trainable)
VARIANTS = {
    "lora": ("swiglu", False, True, False),
    "full_oai_bias": ("swiglu_oai", True, False, True),
    "all_trainable": ("swiglu_oai", True, True, True),
}


def make_problem(case: Case, variant: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random leaves drawn on the CPU (the same numbers wherever the tests run), then placed on
    ``TEST_DEVICE``."""
    activation, biases, lora, base_trainable = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    e, h, i, r = case.experts, case.hidden, case.inter, case.rank

    def leaf(*shape, std=1.0, dt=dtype, grad=True):
        drawn = torch.randn(*shape, generator=g) * std
        return drawn.to(TEST_DEVICE, dt).requires_grad_(grad)

    logits = torch.randn(case.tokens, e, generator=g)
    logits[:, list(case.cold)] = -30.0
    if case.hot is not None:
        logits[:, case.hot] = 30.0
    # fp32: |h| ~ 4 at H = 16, so the GPT-OSS clamps at 7 trigger often. bf16: the clamp's
    # gradient is a step, and an h rounded across 7 flips it, so keep |h| ~ 1 there; the clamp
    # gradients are covered exactly in fp32 and in test_activations.py.
    x_std = 1.0 if dtype == torch.float32 else 0.25
    p = dict(
        case=case,
        activation=activation,
        x=leaf(case.tokens, h, std=x_std),
        logits=logits.to(TEST_DEVICE).requires_grad_(True),
        gate_up=leaf(e, 2 * i, h, grad=base_trainable),
        down=leaf(e, h, i, std=h**-0.5, grad=base_trainable),
        gate_up_bias=leaf(e, 2 * i, grad=base_trainable) if biases else None,
        down_bias=leaf(e, h, grad=base_trainable) if biases else None,
        lora=None,
    )
    if lora:
        p["lora"] = ExpertLoRA(
            leaf(e, r, h, std=0.3),
            leaf(e, 2 * i, r, std=0.3),
            leaf(e, r, i, std=0.3),
            leaf(e, h, r, std=0.3),
            0.5,
        )
    p["dout"] = torch.randn(case.tokens, h, generator=g).to(TEST_DEVICE, dtype)
    return p


def trainables(p: dict) -> dict[str, torch.Tensor]:
    named = dict(
        x=p["x"],
        logits=p["logits"],
        gate_up=p["gate_up"],
        down=p["down"],
        gate_up_bias=p["gate_up_bias"],
        down_bias=p["down_bias"],
    )
    if p["lora"] is not None:
        named.update(zip(("lora_a1", "lora_b1", "lora_a2", "lora_b2"), p["lora"][:4]))
    return {k: v for k, v in named.items() if v is not None and v.requires_grad}


def run_backend(
    p: dict, backend: str, recompute: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    routing = route(p["logits"], "softmax_topk", p["case"].top_k)
    out = moe_experts(
        p["x"],
        routing,
        p["gate_up"],
        p["down"],
        gate_up_bias=p["gate_up_bias"],
        down_bias=p["down_bias"],
        activation=p["activation"],
        lora=p["lora"],
        backend=backend,
        recompute=recompute,
    )
    named = trainables(p)
    grads = torch.autograd.grad(out, list(named.values()), p["dout"])
    return out, dict(zip(named, grads))


def run_reference(p: dict, experts_TK: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Float64 leaves copied from the problem; routing weights recomputed in float64."""
    named = trainables(p)
    leaves = {k: v.detach().double().requires_grad_(True) for k, v in named.items()}

    def get(name):
        return leaves.get(name, None if p.get(name) is None else p[name].detach().double())

    probs = get("logits").softmax(dim=-1).gather(1, experts_TK)
    weights = probs / probs.sum(dim=-1, keepdim=True)
    lora = None
    if p["lora"] is not None:
        names = ("lora_a1", "lora_b1", "lora_a2", "lora_b2")
        lora = ExpertLoRA(
            *(leaves.get(n, t.detach().double()) for n, t in zip(names, p["lora"])), p["lora"].scale
        )
    out = reference_experts(
        get("x"),
        weights,
        experts_TK,
        get("gate_up"),
        get("down"),
        get("gate_up_bias"),
        get("down_bias"),
        p["activation"],
        lora,
    )
    grads = torch.autograd.grad(out, list(leaves.values()), p["dout"].double())
    return out, dict(zip(leaves, grads))


def _skip_unsupported(backend: str, p: dict) -> None:
    c = p["case"]
    problem = ExpertProblem(
        device=TEST_DEVICE,
        dtype=p["x"].dtype,
        num_tokens=c.tokens,
        top_k=c.top_k,
        num_experts=c.experts,
        hidden=c.hidden,
        inter=c.inter,
        lora_rank=c.rank if p["lora"] is not None else 0,
        has_bias=p["down_bias"] is not None,
        activation=p["activation"],
    )
    reason = unsupported_reason(backend, problem)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, dtype, case, variant):
    p = make_problem(case, variant, dtype)
    _skip_unsupported(backend, p)
    out, grads = run_backend(p, backend)
    experts_TK = route(p["logits"], "softmax_topk", case.top_k).experts
    ref_out, ref_grads = run_reference(p, experts_TK)
    assert out.dtype == dtype and out.shape == p["x"].shape
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref_out) <= tol
    if case.top_k == 1 or case.hot is not None:
        # one renormalised weight is 1 (k = 1) or rounds to 1 (a hot logit 30 above the rest:
        # the others' weights are ~e^-30, so the true logits gradient is ~1e-12): what a backend
        # returns is rounding noise of the renormalisation. On the GPU a native_torch fp32 run
        # returned exact zeros where float64 had +-1.5e-12 (relative error 0.71).
        assert grads.pop("logits").abs().max() < 1e-3
    elif case.tokens < LOGITS_GRAD_MIN_TOKENS[dtype]:
        assert torch.isfinite(grads.pop("logits")).all()
    for name, grad in grads.items():
        assert grad.dtype == trainables(p)[name].dtype, name
        limit = LOGITS_GRAD_TOLERANCE[dtype] if name == "logits" else tol
        assert rel_err(grad, ref_grads[name]) <= limit, name
        # every trainable tensor is reached (a silently missing gradient is the classic bug)
        assert grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
        if name in grads:
            for e in case.cold:
                assert torch.equal(grads[name][e], torch.zeros_like(grads[name][e])), (name, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, dtype):
    p = make_problem(Case("basic", tokens=64, experts=8, top_k=3), "all_trainable", dtype, seed=3)
    _skip_unsupported(backend, p)
    out1, grads1 = run_backend(p, backend)
    out2, grads2 = run_backend(p, backend)
    assert torch.equal(out1, out2)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_with_zero_b_equals_base(backend, dtype):
    p = make_problem(Case("basic"), "lora", dtype, seed=4)
    _skip_unsupported(backend, p)
    routing = route(p["logits"], "softmax_topk", 2)
    a1, b1, a2, b2, _ = p["lora"]
    zero_lora = ExpertLoRA(a1, torch.zeros_like(b1), a2, torch.zeros_like(b2), 0.5)
    base = moe_experts(p["x"], routing, p["gate_up"], p["down"], backend=backend)
    with_lora = moe_experts(
        p["x"], routing, p["gate_up"], p["down"], lora=zero_lora, backend=backend
    )
    assert torch.equal(base, with_lora)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_lora_equals_merged_weights(backend):
    p = make_problem(Case("basic"), "lora", torch.float32, seed=5)
    _skip_unsupported(backend, p)
    routing = route(p["logits"], "softmax_topk", 2)
    a1, b1, a2, b2, s = p["lora"]
    split = moe_experts(p["x"], routing, p["gate_up"], p["down"], lora=p["lora"], backend=backend)
    merged = moe_experts(
        p["x"], routing, p["gate_up"] + s * b1 @ a1, p["down"] + s * b2 @ a2, backend=backend
    )
    assert rel_err(split, merged) <= 1e-5


@pytest.mark.parametrize("variant, expected", [("lora", 4), ("full_oai_bias", 3)])
def test_grouped_mm_weight_gradient_products(monkeypatch, variant, expected):
    """A frozen base weight gets no weight-gradient GEMM: LoRA mode runs only the 4 rank-r
    ones (dA, dB per projection); full mode runs dW1, dW2 and the gate_up bias row sums."""
    calls = []
    original = grouped_mm._gmm_wgrad

    def counting(a, b, offs):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b, offs)

    monkeypatch.setattr(grouped_mm, "_gmm_wgrad", counting)
    p = make_problem(Case("basic"), variant, torch.float32)
    _skip_unsupported("grouped_mm", p)
    run_backend(p, "grouped_mm")
    assert len(calls) == expected, calls
