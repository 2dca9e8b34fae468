"""The fused LM-head cross-entropy against a float64 evaluation of the plain formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from moelab.train.loss import chunked_cross_entropy


def _reference(h, w, y):
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    loss = F.cross_entropy(h64 @ w64.t(), y, ignore_index=-100, reduction="sum")
    return (loss, *torch.autograd.grad(loss, [h64, w64]))


def _check_against_float64(chunk, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(45, 24, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(100, 24, generator=g) * 0.3).to(device, dtype).requires_grad_(True)
    y = torch.randint(0, 100, (45,), generator=g).to(device)
    y[[0, 13, 44]] = -100  # ignored positions, one at each chunk edge
    loss, count = chunked_cross_entropy(h, w, y, chunk=chunk)
    ref_loss, ref_h, ref_w = _reference(h, w, y)
    assert count.item() == 42 and loss.dtype == torch.float32
    (2.5 * loss).backward()  # the saved gradients are scaled by the incoming one
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel_err(h.grad, 2.5 * ref_h) <= tol
    assert rel_err(w.grad, 2.5 * ref_w) <= tol
    assert h.grad[[0, 13, 44]].abs().max() == 0  # ignored tokens send no gradient


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_and_gradients_match_float64(chunk, dtype):
    _check_against_float64(chunk, dtype)


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_place_kernel_matches_float64(chunk, dtype, monkeypatch):
    """The CUDA path: logits turned into their gradient in place by the Triton kernel (on CPU
    under Triton's interpreter)."""
    from moelab.train import loss as loss_module

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(loss_module, "_in_place_kernel", lambda h: True)
    _check_against_float64(chunk, dtype, device)


def test_in_place_kernel_on_a_long_vocabulary_row():
    """Rows longer than the kernel's column block (several online-softmax steps), a label in
    the last partial block and an ignored row."""
    from moelab.kernels.cross_entropy import softmax_xent_grad_

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 9001, generator=g) * 4).to(device)
    labels = torch.tensor([9000, 17, -100], device=device)
    ref_loss = F.cross_entropy(logits.double(), labels, reduction="none", ignore_index=-100)
    ref_grad = torch.softmax(logits.double(), dim=-1)
    ref_grad[[0, 1], labels[:2]] -= 1
    loss = softmax_xent_grad_(logits, labels)
    assert rel_err(loss, ref_loss) <= 1e-6
    assert rel_err(logits, ref_grad) <= 1e-6


def test_frozen_head_gets_no_gradient_and_no_grad_mode_matches():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g)
    y = torch.randint(0, 30, (10,), generator=g)
    loss, _ = chunked_cross_entropy(h, w, y, chunk=3)
    loss.backward()
    assert w.grad is None and h.grad is not None
    with torch.no_grad():
        again, _ = chunked_cross_entropy(h, w, y)
    assert torch.allclose(again, loss.detach(), rtol=1e-6)
    assert abs(loss.item() - F.cross_entropy(h @ w.t(), y, reduction="sum").item()) < 1e-4


def test_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match="rows but labels"):
        chunked_cross_entropy(
            torch.randn(4, 3), torch.randn(5, 3), torch.zeros(3, dtype=torch.long)
        )
