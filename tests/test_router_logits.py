"""The router's linear layer that hands x on to the experts: values and first and second
derivatives against torch's numerical checks, x's two gradients summed in one pass (the Triton
``add_product`` or ``addmm``), and the experts' gradient left as it was when autograd shares it."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE
from torch.profiler import ProfilerActivity, profile

from moelab.kernels import add_product as ap
from moelab.ops.router_logits import router_logits

_ADD_PRODUCT = ap.add_product  # the pass itself, before a test wraps the module's name


def _inputs(dtype, bias=True, tokens=7, hidden=5, experts=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(TEST_DEVICE, dtype).requires_grad_(True)

    return rand(tokens, hidden), rand(experts, hidden), rand(experts) if bias else None


def _loss(uses: str):
    """A loss over the logits, the handed-on x, or both (nonlinear in each)."""

    def loss(x, w, b):
        logits, x_out = router_logits(x, w, b)
        total = x.new_zeros(())
        if "logits" in uses:
            total = total + logits.sin().sum()
        if "x" in uses:
            total = total + (x_out * x_out.cos()).sum()
        return total

    return loss


@pytest.mark.parametrize("uses", ["logits+x", "logits", "x"])
@pytest.mark.parametrize("bias", [True, False])
def test_first_and_second_derivatives_match_numerical(uses, bias):
    inputs = tuple(t for t in _inputs(torch.float64, bias) if t is not None)
    loss = _loss(uses)
    fn = (lambda x, w, b: loss(x, w, b)) if bias else (lambda x, w: loss(x, w, None))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("frozen", ["x", "weight"])
def test_frozen_input_gets_no_gradient(frozen):
    x, w, b = _inputs(torch.float64)
    (x if frozen == "x" else w).requires_grad_(False)
    _loss("logits+x")(x, w, b).backward()
    ref_x, ref_w, ref_b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    ref_logits = torch.nn.functional.linear(ref_x, ref_w, ref_b)
    (ref_logits.sin().sum() + (ref_x * ref_x.cos()).sum()).backward()
    assert (x.grad is None) == (frozen == "x") and (w.grad is None) == (frozen == "weight")
    for got, want in ((x.grad, ref_x.grad), (w.grad, ref_w.grad), (b.grad, ref_b.grad)):
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dtype, kernel",
    [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, False)],
    ids=["bf16 add_product", "bf16 addmm", "fp32 addmm"],
)
def test_x_gradient_is_one_pass_over_the_experts_gradient(monkeypatch, dtype, kernel):
    """In the model's dtype x's gradient is ``dx_experts + dlogits W`` within one rounding of
    its float64 value, made by one op (the Triton pass where it runs, else addmm): no product
    and addition apart."""
    monkeypatch.setattr(ap, "runs", lambda *tensors: kernel)
    calls = []
    monkeypatch.setattr(ap, "add_product", lambda *a: calls.append(1) or _ADD_PRODUCT(*a))
    x, w, b = _inputs(dtype, tokens=70, hidden=40, experts=8)
    w.requires_grad_(False), b.requires_grad_(False)  # x's gradient alone: no other product
    dlogits = torch.randn(70, 8, generator=torch.Generator().manual_seed(1)).to(TEST_DEVICE, dtype)
    dx_experts = torch.randn(70, 40, generator=torch.Generator().manual_seed(2))
    dx_experts = dx_experts.to(TEST_DEVICE, dtype)
    logits, x_out = router_logits(x, w, b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # the host's aten ops
        torch.autograd.backward((logits, x_out), (dlogits, dx_experts))
    ops = {e.key for e in prof.key_averages()}
    assert not {"aten::add", "aten::add_", "aten::mm"} & ops, ops
    assert calls == ([1] if kernel else []) and ("aten::addmm" in ops) != kernel
    want = dx_experts.double() + dlogits.double() @ w.detach().double()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(x.grad.double(), want, rtol=2 * eps, atol=2 * eps * 8)


@pytest.mark.parametrize("inner", [1, 8, 40, 128, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_product_kernel_rounds_the_float64_sum_once(dtype, inner):
    """``c + a b`` against float64: within one rounding of the exact value, at row and column
    counts that leave partial tiles, an inner dimension from 1 to past one block, c read
    through transposed strides; c itself unchanged."""
    g = torch.Generator().manual_seed(inner)
    rows, cols = 70, 136
    c = torch.randn(cols, rows, generator=g).to(TEST_DEVICE, dtype).t()  # strides (1, rows)
    a = torch.randn(rows, inner, generator=g).to(TEST_DEVICE, dtype)
    b = (torch.randn(inner, cols, generator=g) / inner**0.5).to(TEST_DEVICE, dtype)
    before = c.clone()
    got = _ADD_PRODUCT(c, a, b)
    assert got.dtype == dtype and got.is_contiguous() and torch.equal(c, before)
    want = c.double() + a.double() @ b.double()
    eps = torch.finfo(dtype).eps
    # one rounding of the fp32 sum: half an ulp, plus fp32's own error, far smaller
    assert ((got.double() - want).abs() <= eps * want.abs() / 2 + 1e-6).all()


def test_add_product_runs_on_cuda_half_precision_with_a_short_inner_dimension():
    c = torch.empty(4, 8, dtype=torch.bfloat16)
    a, b = torch.empty(4, 3, dtype=torch.bfloat16), torch.empty(3, 8, dtype=torch.bfloat16)
    assert not ap.runs(c, a, b)  # CPU tensors: torch's path (tests call the kernel directly)
    if TEST_DEVICE.type == "cuda":
        cuda = [x.to(TEST_DEVICE) for x in (c, a, b)]
        assert ap.runs(*cuda)
        assert not ap.runs(cuda[0].float(), cuda[1].float(), cuda[2].float())
        wide = torch.empty(4, ap.MAX_INNER + 1, dtype=torch.bfloat16, device=TEST_DEVICE)
        assert not ap.runs(cuda[0], wide, wide.t())


def test_shared_gradient_of_the_handed_on_x_is_not_overwritten():
    """An addition's backward hands one gradient tensor to both its inputs: the router's backward
    must not add into it, or the other input's gradient would change too."""
    x, w, b = _inputs(torch.float32)
    other = torch.randn_like(x).requires_grad_(True)
    logits, x_out = router_logits(x, w, b)
    upstream = torch.randn_like(x)
    ((x_out + other) * upstream).sum().backward(retain_graph=True)  # logits unused
    torch.testing.assert_close(other.grad, upstream, rtol=0, atol=0)
    other.grad = None
    dlogits = torch.randn_like(logits)
    torch.autograd.backward((logits, x_out + other), (dlogits, upstream))
    torch.testing.assert_close(other.grad, upstream, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, upstream + upstream + dlogits @ w.detach())


def test_router_in_another_dtype_runs_on_cast_x():
    """fp32 router weights with bf16 activations (DeepSeek/GLM checkpoints): fp32 logits of the
    cast x, and x handed on unchanged; its gradient sums both paths."""
    x = torch.randn(6, 4).to(TEST_DEVICE, torch.bfloat16).requires_grad_(True)
    w = torch.randn(3, 4, device=TEST_DEVICE, requires_grad=True)
    logits, x_out = router_logits(x, w)
    assert logits.dtype == torch.float32 and x_out is x
    torch.testing.assert_close(logits, x.detach().float() @ w.detach().t())
    dlogits = torch.randn_like(logits)
    torch.autograd.backward((logits, x_out), (dlogits, torch.ones_like(x)))
    want = (1 + dlogits @ w.detach()).to(torch.bfloat16)
    torch.testing.assert_close(x.grad, want, rtol=1e-2, atol=1e-2)
