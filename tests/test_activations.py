"""Hand-written activation backward against autograd, in float64, clamp regions included."""

from __future__ import annotations

import pytest
import torch

from moelab.ops.activations import OAI_LIMIT, activation_backward, activation_forward


def _h_with_clamped_values(rows: int, inter: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, 2 * inter, generator=g, dtype=torch.float64) * 6
    h[0, :inter] = OAI_LIMIT + 1.0  # gate above the clamp: no gradient
    h[1, inter:] = -OAI_LIMIT - 2.0  # up below the clamp: no gradient
    h[2, inter:] = OAI_LIMIT + 3.0  # up above the clamp: no gradient
    return h


@pytest.mark.parametrize("activation", ["swiglu", "swiglu_oai"])
def test_backward_matches_autograd(activation):
    h = _h_with_clamped_values(6, 5).requires_grad_(True)
    dact = torch.randn(6, 5, dtype=torch.float64)
    (expected,) = torch.autograd.grad(activation_forward(h, activation), h, dact)
    torch.testing.assert_close(activation_backward(h.detach(), dact, activation), expected)


def test_swiglu_oai_hand_values():
    h = torch.tensor([[1.0, 10.0, 0.5, -9.0]], dtype=torch.float64)  # gates 1, 10; ups .5, -9
    out = activation_forward(h, "swiglu_oai")
    sig = torch.sigmoid(torch.tensor([1.702, 1.702 * 7.0], dtype=torch.float64))
    expected = torch.stack([(0.5 + 1) * 1.0 * sig[0], (-7.0 + 1) * 7.0 * sig[1]])
    torch.testing.assert_close(out[0], expected)
    dh = activation_backward(h, torch.ones(1, 2, dtype=torch.float64), "swiglu_oai")
    assert dh[0, 1] == 0 and dh[0, 3] == 0  # clamped gate, clamped up


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        activation_forward(torch.zeros(1, 4), "gelu")
