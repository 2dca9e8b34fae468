"""Dispatch invariants and the fixed-order combine."""

from __future__ import annotations

import torch

from moelab.ops.dispatch import combine, dispatch, scatter_to_slots


def test_dispatch_invariants():
    g = torch.Generator().manual_seed(0)
    num_experts, tokens, k = 7, 33, 3
    experts = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)])
    experts[experts == 4] = 0  # expert 4 receives nothing
    plan = dispatch(experts, num_experts)
    n = tokens * k
    flat = experts.reshape(-1)
    # order is a permutation and sorts by expert, stably
    assert sorted(plan.order_N.tolist()) == list(range(n))
    assert torch.equal(plan.expert_N, flat[plan.order_N])
    assert (plan.expert_N[1:] >= plan.expert_N[:-1]).all()
    for e in range(num_experts):
        rows = plan.order_N[plan.expert_N == e]
        assert (rows[1:] > rows[:-1]).all()  # stable: original order within an expert
    assert torch.equal(plan.token_N, plan.order_N // k)
    # offsets are group ends: counts sum to N, the last offset is N, empty experts repeat
    counts = torch.bincount(flat, minlength=num_experts)
    assert plan.offs_E.dtype == torch.int32
    assert torch.equal(plan.offs_E.long(), counts.cumsum(0))
    assert plan.offs_E[-1] == n and plan.offs_E[4] == plan.offs_E[3]
    # slot is the inverse permutation
    assert torch.equal(plan.order_N[plan.slot_TK.reshape(-1)], torch.arange(n))


def test_combine_is_the_weighted_k_sum_and_scatter_inverts():
    g = torch.Generator().manual_seed(1)
    experts = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1]])
    plan = dispatch(experts, 3)
    rows = torch.randn(8, 5, generator=g, dtype=torch.float64)
    weights = torch.rand(4, 2, generator=g, dtype=torch.float64)
    out = combine(rows, plan, weights)
    weighted = [sum(weights[t, j] * rows[plan.slot_TK[t, j]] for j in range(2)) for t in range(4)]
    torch.testing.assert_close(out, torch.stack(weighted))
    plain = [rows[plan.slot_TK[t, 0]] + rows[plan.slot_TK[t, 1]] for t in range(4)]
    torch.testing.assert_close(combine(rows, plan), torch.stack(plain))
    # a per-row value returns to its (token, slot): the sorted expert ids give back the routing
    assert torch.equal(scatter_to_slots(plan.expert_N, plan), experts)
