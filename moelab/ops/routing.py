"""Routers: router logits -> (weights, expert ids) per token, plus the router losses.

Shape suffixes: see :mod:`moelab.ops`. All routing math runs in fp32 whatever the logits dtype
(fp64 for fp64 logits); gradients flow from ``Routing.weights`` back to the logits.

Data-dependent checks (non-finite logits) need the values on the host. They run by default on
CPU tensors, where they are free, and on request (``validate=True``) elsewhere, so the
accelerator path never waits on the host.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from moelab.kernels import router as fused_router

ROUTER_KINDS = ("softmax_topk", "sigmoid_group_topk", "topk_softmax")


class Routing(NamedTuple):
    """The routing of T tokens to k experts each.

    Attributes:
        weights: ``[T, K]`` float32 combine weights (differentiable; fp64 for fp64 logits).
        experts: ``[T, K]`` int64 expert ids.
    """

    weights: torch.Tensor
    experts: torch.Tensor


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds integer ids (bool, float and complex do not)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def should_validate(validate: bool | None, t: torch.Tensor) -> bool:
    """Resolve the data-check policy: explicit flag, else check only what lives on the CPU."""
    return t.device.type == "cpu" if validate is None else validate


def route(
    router_logits: torch.Tensor,
    kind: str,
    top_k: int,
    *,
    validate: bool | None = None,
    fused: bool = True,
    **options,
) -> Routing:
    """Pick ``top_k`` experts per token and their combine weights.

    Args:
        router_logits: ``[T, E]`` raw router outputs (any float dtype).
        kind: ``"softmax_topk"`` (Qwen3-MoE, Mixtral; option ``renormalize=True``),
            ``"sigmoid_group_topk"`` (DeepSeek-V3, GLM-4.x; options ``n_group=1``,
            ``topk_group=1``, ``correction_bias=None``, ``routed_scaling_factor=1.0``,
            ``renormalize=True``) or ``"topk_softmax"`` (GPT-OSS; no options).
        top_k: experts per token, ``1 <= top_k <= E``.
        validate: check that the logits are finite (default: only on CPU tensors).
        fused: on CUDA, run ``softmax_topk`` and ``topk_softmax`` as one Triton pass each way
            (:mod:`moelab.kernels.router`: weights within float32 rounding; the same picks,
            except where two distinct fp32 logits round to one fp32 probability, where the
            kernel, which ranks logits, keeps the larger logit and torch the lower id; NaN
            logits are not propagated to the weights: ``validate=True`` checks them);
            False keeps torch's ops, the reference models' roundings bit for bit.

    Returns:
        :class:`Routing` with ``weights [T, K]`` float32 and ``experts [T, K]`` int64.
    """
    _check_logits(router_logits, top_k, validate)
    if kind in _OPTIONS and not set(options) <= _OPTIONS[kind]:
        unknown = sorted(set(options) - _OPTIONS[kind])
        allowed = ", ".join(sorted(_OPTIONS[kind])) or "none"
        raise ValueError(f"unknown option(s) {unknown} for router {kind!r}; it takes: {allowed}")
    compute = torch.promote_types(router_logits.dtype, torch.float32)
    fused = fused and fused_router.runs(router_logits, top_k)
    if kind == "softmax_topk":
        return _softmax_topk(router_logits, top_k, compute, fused, **options)
    if kind == "sigmoid_group_topk":
        return _sigmoid_group_topk(router_logits.to(compute), top_k, **options)
    if kind == "topk_softmax":
        return _topk_softmax(router_logits, top_k, compute, fused, **options)
    raise ValueError(f"unknown router kind {kind!r}; expected one of {ROUTER_KINDS}")


def _check_logits(logits: torch.Tensor, top_k: int, validate: bool | None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"router_logits must be a [T, E] tensor, got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"router_logits must be floating point, got {logits.dtype}")
    num_experts = logits.shape[1]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, E={num_experts}], got {top_k!r}")
    if should_validate(validate, logits) and not bool(torch.isfinite(logits).all()):
        raise ValueError("router_logits contain NaN or Inf")


def _softmax_topk(
    logits_TE: torch.Tensor, top_k: int, compute: torch.dtype, fused: bool, renormalize: bool = True
) -> Routing:
    if fused:
        return Routing(*fused_router.topk_route(logits_TE, top_k, renormalize))
    probs_TE = logits_TE.softmax(dim=-1, dtype=compute)
    weights_TK, experts_TK = probs_TE.topk(top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return Routing(weights_TK, experts_TK)


def _sigmoid_group_topk(
    logits_TE: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    renormalize: bool = True,
) -> Routing:
    num_tokens, num_experts = logits_TE.shape
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts E={num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    if n_group > 1 and num_experts // n_group < 2:
        raise ValueError("group-limited routing needs at least 2 experts per group")
    if n_group > 1 and top_k > topk_group * (num_experts // n_group):
        raise ValueError(
            f"top_k={top_k} exceeds the {topk_group * (num_experts // n_group)} experts "
            f"of the {topk_group} selected groups"
        )
    scores_TE = logits_TE.sigmoid()
    # NOTE: the correction bias steers selection only; the weights are the unbiased scores.
    choice_TE = scores_TE.detach()
    if correction_bias is not None:
        if correction_bias.shape != (num_experts,):
            raise ValueError(
                f"correction_bias must have shape [E={num_experts}], "
                f"got {tuple(correction_bias.shape)}"
            )
        choice_TE = choice_TE + correction_bias.detach().to(choice_TE.dtype)
    if n_group > 1:
        grouped = choice_TE.view(num_tokens, n_group, num_experts // n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep_group = group_score.topk(topk_group, dim=-1, sorted=False).indices
        mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_group, True)
        choice_TE = grouped.masked_fill(~mask[..., None], float("-inf")).view(
            num_tokens, num_experts
        )
    # unsorted top-k's, as the reference models pick: their ids in their order (ties too), so
    # the renormalising sum below rounds as theirs does
    experts_TK = choice_TE.topk(top_k, dim=-1, sorted=False).indices
    weights_TK = scores_TE.gather(1, experts_TK)
    if renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(weights_TK * routed_scaling_factor, experts_TK)


def _topk_softmax(
    logits_TE: torch.Tensor, top_k: int, compute: torch.dtype, fused: bool
) -> Routing:
    if fused:
        return Routing(*fused_router.topk_route(logits_TE, top_k, renormalize=True))
    top_logits_TK, experts_TK = logits_TE.topk(top_k, dim=-1)
    return Routing(top_logits_TK.softmax(dim=-1, dtype=compute), experts_TK)


def _keyword_options(router) -> frozenset[str]:
    """The options a router takes through ``route(..., **options)``: its defaulted parameters."""
    params = inspect.signature(router).parameters.values()
    return frozenset(p.name for p in params if p.default is not inspect.Parameter.empty)


_OPTIONS = {
    "softmax_topk": _keyword_options(_softmax_topk),
    "sigmoid_group_topk": _keyword_options(_sigmoid_group_topk),
    "topk_softmax": _keyword_options(_topk_softmax),
}


def expert_counts(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, ``[E]`` int64, counted on device (no host sync).

    ``experts_TK`` may be of any integer dtype (:func:`route` gives int64; ``moe_experts``
    takes others).
    """
    if not is_integer_dtype(experts_TK.dtype):
        raise ValueError(f"expert ids must be an integer tensor, got {experts_TK.dtype}")
    # scatter_add_ wants int64 indices (and int64 ones to add); a no-op for route's ids
    flat_N = experts_TK.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=flat_N.device).scatter_add_(
        0, flat_N, torch.ones_like(flat_N)
    )


def load_balancing_loss(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, counts_E: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss in the Qwen/Mixtral form, fp32.

    ``E * sum_e f_e * P_e`` with ``f_e`` the routed rows of expert e per token (summed over the
    k slots, so a perfectly balanced router scores ``k``) and ``P_e`` the mean router
    probability of expert e. Gradients reach the logits through ``probs_TE`` only.
    ``counts_E``: :func:`expert_counts` of ``experts_TK`` when the caller has them already.
    """
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:  # no tokens, no imbalance: a zero that keeps the graph (not 0/0)
        return probs_TE.float().sum() * 0.0
    if counts_E is None:
        counts_E = expert_counts(experts_TK, num_experts)
    f_E = counts_E.float() / num_tokens
    return num_experts * (f_E * probs_TE.float().mean(dim=0)).sum()


def router_z_loss(router_logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, fp32 (zero for no tokens)."""
    return _token_mean(router_logits_TE.float().logsumexp(dim=-1).square())


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy (nats) of the router distribution, fp32, for metrics (zero for
    no tokens)."""
    p = probs_TE.float()
    return _token_mean(-(p * p.clamp_min(1e-30).log()).sum(dim=-1))


def _token_mean(v_T: torch.Tensor) -> torch.Tensor:
    """The mean over tokens; for no tokens zero (a sum of nothing, still in the graph), where
    ``mean`` gives 0/0."""
    return v_T.mean() if v_T.numel() else v_T.sum()
