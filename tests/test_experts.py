"""Every expert backend against the float64 reference: output and every gradient.

Shapes name the edge they cover. Routing comes from real router logits, so the gradient to the
logits (through the routing weights) is checked too, and so is the gradient to the routing
weights themselves. Renormalised weights are trivial at k = 1 (all 1) and with a hot expert (~1
and ~0), so those problems (and T = 1) run again with random positive weights as a leaf.
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
from moelab.ops.routing import Routing

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
    "full": ("swiglu", False, False, True),  # Qwen3 full training
    "full_oai_bias": ("swiglu_oai", True, False, True),
    "all_trainable": ("swiglu_oai", True, True, True),
}


def leaf_weights_matter(case: Case) -> bool:
    """Whether the case also runs with leaf routing weights: where the router's renormalised
    ones are trivial (all 1 at k = 1, ~1 and ~0 with a hot expert), which would hide a weight
    applied twice or not at all, and at T = 1."""
    return case.top_k == 1 or case.hot is not None or case.tokens == 1


def make_problem(
    case: Case, variant: str, dtype: torch.dtype, seed: int = 0, leaf_weights: bool = False
) -> dict:
    """Random leaves drawn on the CPU (the same numbers wherever the tests run), then placed on
    ``TEST_DEVICE``. ``leaf_weights``: the routing weights are a trainable leaf of random
    positive values (not summing to 1), the logits only pick the experts."""
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
        logits=logits.to(TEST_DEVICE).requires_grad_(not leaf_weights),
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
    # drawn last, so the other leaves are the same numbers as without; fp32 as route() gives
    drawn = 0.25 + torch.rand(case.tokens, case.top_k, generator=g)
    p["weights"] = drawn.to(TEST_DEVICE).requires_grad_(True) if leaf_weights else None
    return p


LORA_NAMES = ("lora_a1", "lora_b1", "lora_a2", "lora_b2")


def trainables(p: dict) -> dict[str, torch.Tensor]:
    named = dict(
        x=p["x"],
        logits=p["logits"],
        weights=p.get("weights"),
        gate_up=p["gate_up"],
        down=p["down"],
        gate_up_bias=p["gate_up_bias"],
        down_bias=p["down_bias"],
    )
    if p["lora"] is not None:
        named.update(zip(LORA_NAMES, p["lora"][:4]))
    return {k: v for k, v in named.items() if v is not None and v.requires_grad}


def routing_of(p: dict) -> Routing:
    routing = route(p["logits"], "softmax_topk", p["case"].top_k)
    if p.get("weights") is not None:
        routing = Routing(p["weights"], routing.experts)
    return routing


def run_backend(
    p: dict, backend: str, recompute: bool = False, weights_grad: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients to ``trainables(p)``; ``weights_grad``: also to the routing weights
    when they are computed from the logits (what the backend returns for them, before the
    router's backward)."""
    routing = routing_of(p)
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
    if weights_grad and "weights" not in named:
        named["weights"] = routing.weights
    grads = torch.autograd.grad(out, list(named.values()), p["dout"])
    return out, dict(zip(named, grads))


def _reference_out(p: dict, weights: torch.Tensor, experts_TK: torch.Tensor, leaves: dict):
    """``reference_experts`` on the problem's tensors in float64, ``leaves`` standing in for
    the tensors they name."""

    def get(name):
        return leaves.get(name, None if p.get(name) is None else p[name].detach().double())

    lora = None
    if p["lora"] is not None:
        tensors = (leaves.get(n, t.detach().double()) for n, t in zip(LORA_NAMES, p["lora"]))
        lora = ExpertLoRA(*tensors, p["lora"].scale)
    # fmt: off
    return reference_experts(get("x"), weights, experts_TK, get("gate_up"), get("down"),
                             get("gate_up_bias"), get("down_bias"), p["activation"], lora)
    # fmt: on


def run_reference(
    p: dict, experts_TK: torch.Tensor, weights_grad: bool = False
) -> tuple[torch.Tensor, dict]:
    """Float64 leaves copied from the problem; routing weights recomputed in float64 (unless
    they are a leaf). ``weights_grad`` as in :func:`run_backend`."""
    named = trainables(p)
    leaves = {k: v.detach().double().requires_grad_(True) for k, v in named.items()}
    if p.get("weights") is not None:
        weights = leaves["weights"]
    else:
        logits = leaves.get("logits", p["logits"].detach().double())
        probs = logits.softmax(dim=-1).gather(1, experts_TK)
        weights = probs / probs.sum(dim=-1, keepdim=True)
    inputs = dict(leaves)
    if weights_grad and "weights" not in inputs:
        inputs["weights"] = weights
    out = _reference_out(p, weights, experts_TK, leaves)
    grads = torch.autograd.grad(out, list(inputs.values()), p["dout"].double())
    return out, dict(zip(inputs, grads))


def weights_grad_scale(p: dict, experts_TK: torch.Tensor) -> torch.Tensor:
    """``||dout_t|| ||y_tj||`` per (token, slot), y_tj the float64 output of token t's j-th
    expert: the size of dL/dw_tj = <dout_t, y_tj> before any cancellation."""
    num_tokens, top_k = experts_TK.shape
    slots = torch.eye(top_k, dtype=torch.float64, device=experts_TK.device)
    with torch.no_grad():
        y_TKH = torch.stack(
            [
                _reference_out(p, slots[j].expand(num_tokens, top_k), experts_TK, {})
                for j in range(top_k)
            ],
            dim=1,
        )
    return p["dout"].double().norm(dim=-1, keepdim=True) * y_TKH.norm(dim=-1)


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


# (case, leaf routing weights): every case routed by its logits, and again with leaf weights
# where the router's are trivial
MATRIX = [pytest.param(c, False, id=c.name) for c in CASES] + [
    pytest.param(c, True, id=f"{c.name}, leaf weights") for c in CASES if leaf_weights_matter(c)
]
# gradients with the expert as their first dim: an expert that receives no token gets exact zeros
PER_EXPERT = ("gate_up", "down", "gate_up_bias", "down_bias") + LORA_NAMES


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case, leaf_weights", MATRIX)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, dtype, case, leaf_weights, variant):
    p = make_problem(case, variant, dtype, leaf_weights=leaf_weights)
    _skip_unsupported(backend, p)
    out, grads = run_backend(p, backend, weights_grad=True)
    experts_TK = routing_of(p).experts
    ref_out, ref_grads = run_reference(p, experts_TK, weights_grad=True)
    assert out.dtype == dtype and out.shape == p["x"].shape
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref_out) <= tol
    inputs = trainables(p)
    assert set(grads) == set(inputs) | {"weights"}
    for name, grad in grads.items():
        # the routing weights are fp32 whether a leaf or computed by route()
        assert grad.dtype == (inputs[name].dtype if name in inputs else torch.float32), name
        # every trainable tensor is reached (a silently missing gradient is the classic bug);
        # the logits gradient alone may be ~0 (at k = 1, or with a hot expert)
        assert name == "logits" or grad.abs().sum() > 0, f"{name} got an all-zero gradient"

    dw, ref_dw = grads.pop("weights").double(), ref_grads["weights"]
    dw_err = (dw - ref_dw).norm().item()
    if case.tokens < LOGITS_GRAD_MIN_TOKENS[dtype]:
        # bf16, few tokens: dL/dw_tj = <dout_t, y_tj> can cancel far below its terms while its
        # rounding error scales with them (T = 1 reached relative error 0.09 over 30 seeds), so
        # the tolerance applies at their scale, ||dout_t|| ||y_tj|| (errors stayed below 0.2
        # of it over 30 seeds; at seed 0 a zero gradient exceeds it 2.9-fold or more)
        assert dw_err <= tol * weights_grad_scale(p, experts_TK).norm().item()
    else:
        assert dw_err <= tol * ref_dw.norm().item()
    if "logits" in grads and (
        case.top_k == 1 or case.hot is not None or case.tokens < LOGITS_GRAD_MIN_TOKENS[dtype]
    ):
        # A relative bound fails where the softmax's Jacobian cancels: at k = 1 the true
        # gradient is 0, with a hot expert (others' weights ~e^-30) ~1e-12, and a backend's is
        # rounding noise (on the GPU native_torch fp32 gave exact zeros where float64 had
        # +-1.5e-12); in bf16 a token's few dL/dweights, each rounded, nearly cancel (one token
        # reached relative error 0.19). But per token the logits gradient is J dL/dweights,
        # J = diag(w) - w w^T (the softmax over the chosen logits), symmetric with eigenvalues
        # in [0, 1/2] (Gershgorin: row j's magnitudes sum to 2 w_j (1 - w_j)): its error is at
        # most half the weights gradient's, plus J's fp32 rounding. An inequality, not a fitted
        # tolerance: it is tight at w = (1/2, 1/2) (T = 1 reached 0.98 of it over 20 seeds), and
        # at seed 0 a zero gradient exceeds it 39-fold or more on T = 1 and T = 3.
        err = (grads.pop("logits").double() - ref_grads["logits"]).norm().item()
        assert err <= 0.5 * dw_err + TOLERANCE[torch.float32] * ref_dw.norm().item()
    for name, grad in grads.items():
        limit = LOGITS_GRAD_TOLERANCE[dtype] if name == "logits" else tol
        assert rel_err(grad, ref_grads[name]) <= limit, name
    empty = set(range(case.experts)) - set(experts_TK.unique().tolist())
    assert set(case.cold) <= empty
    if case.hot is not None and case.top_k == 1:
        assert empty == set(range(case.experts)) - {case.hot}
    for name in PER_EXPERT:
        if name in grads:
            for e in sorted(empty):
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
