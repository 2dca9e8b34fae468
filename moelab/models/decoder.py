"""The decoder skeleton every family shares: embed, positions, the layer loop, the LM head.

A family's Config supplies ``rope``, ``tie_word_embeddings``, its decoder layer
``decoder_layer(layer, params, h, cos, sin, document_ids, options) -> (h, RouterStats | None)``
and ``final_norm(h, params)``; this module does the rest, including activation checkpointing per
layer (``ForwardOptions.checkpoint_layers``). Families export :func:`hidden_states`,
:func:`forward` and :func:`lm_head_weight` as their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moelab.models.options import ForwardOptions
from moelab.ops.moe import RouterStats
from moelab.ops.rope import rope_cos_sin
from moelab.ops.routing import is_integer_dtype

if TYPE_CHECKING:  # the families import this module
    from moelab.models import gpt_oss, qwen3_moe

DEFAULT_OPTIONS = ForwardOptions()


def positions_from_documents(document_ids_BS: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at 0 at every document boundary of a packed row."""
    seq = torch.arange(document_ids_BS.shape[1], device=document_ids_BS.device)
    start_index = torch.where(_document_starts(document_ids_BS), seq, 0).cummax(dim=1).values
    return seq - start_index


def document_runs(document_ids_BS: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` int64: each token's document index within its row, counting from 0.

    A document is a maximal run of equal consecutive ids, the same boundaries
    :func:`positions_from_documents` restarts at: ``[0, 0, 1, 1, 0, 0]`` is three documents.
    """
    return _document_starts(document_ids_BS).cumsum(dim=1) - 1


def _document_starts(document_ids_BS: torch.Tensor) -> torch.Tensor:
    starts = torch.ones_like(document_ids_BS, dtype=torch.bool)
    starts[:, 1:] = document_ids_BS[:, 1:] != document_ids_BS[:, :-1]
    return starts


def _per_row(name: str, t: torch.Tensor, ids_BS: torch.Tensor) -> torch.Tensor:
    """Integer ``t`` as ``[1, S]`` or ``[B, S]`` like ``input_ids`` (``[S]``: one row for all),
    or a ValueError naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if not is_integer_dtype(t.dtype):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    t_BS = t[None] if t.dim() == 1 else t
    batch, seq = ids_BS.shape
    if t_BS.dim() != 2 or t_BS.shape[0] not in (1, batch) or t_BS.shape[1] != seq:
        raise ValueError(
            f"{name} must be [B, S] = {list(ids_BS.shape)} like input_ids (or [S]), "
            f"got {list(t.shape)}"
        )
    return t_BS


def hidden_states(
    cfg: qwen3_moe.Config | gpt_oss.Config,
    params: dict,
    input_ids: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    options: ForwardOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, list[RouterStats]]:
    """Final-normed hidden states ``[B, S, H]`` and the router stats of every MoE layer.

    ``input_ids`` is ``[B, S]`` (or ``[S]``); positions default to ``0..S-1``, restarting per
    document when ``document_ids`` marks packed documents (attention stays inside each).
    ``position_ids`` and ``document_ids``: integer ``[B, S]``, or ``[S]`` / ``[1, S]`` for
    every row (anything else raises a ValueError);
    a document is a maximal run of equal consecutive ids, so an id may come back later in a row
    as another document (:func:`document_runs`).
    """
    ids_BS = input_ids if input_ids.dim() == 2 else input_ids[None]
    if position_ids is not None:
        position_ids = _per_row("position_ids", position_ids, ids_BS)
    if document_ids is not None:
        # every row's own: the positions and the attention mask are built per row
        document_ids = _per_row("document_ids", document_ids, ids_BS).expand_as(ids_BS)
        if position_ids is None:
            position_ids = positions_from_documents(document_ids)
        # attention masks by id equality: as run indices, a reused id ([0, 0, 1, 1, 0, 0]) starts
        # a new document for attention too, where its positions restart
        document_ids = document_runs(document_ids)
    if position_ids is None:
        position_ids = torch.arange(ids_BS.shape[1], device=ids_BS.device)[None]
        position_ids = position_ids.expand_as(ids_BS)
    h = F.embedding(ids_BS, params["embed"]["weight"])
    cos, sin = rope_cos_sin(cfg.rope, position_ids, h.dtype)
    stats = []
    for layer, p in enumerate(params["layers"]):
        args = (layer, p, h, cos, sin, document_ids, options)
        if options.checkpoint_layers and torch.is_grad_enabled():
            # the RNG state is saved for the recompute only when the layer draws random
            # numbers (LoRA dropout): reading the CUDA generator's state synchronises the host
            # fmt: off
            h, layer_stats = checkpoint(cfg.decoder_layer, *args, use_reentrant=False,
                                        preserve_rng_state=options.lora_dropout > 0)
            # fmt: on
        else:
            h, layer_stats = cfg.decoder_layer(*args)
        if layer_stats is not None:
            stats.append(layer_stats)
    return cfg.final_norm(h, params), stats


def lm_head_weight(cfg: qwen3_moe.Config | gpt_oss.Config, params: dict) -> torch.Tensor:
    """The LM head, or the embedding when the config ties them."""
    return params["embed" if cfg.tie_word_embeddings else "lm_head"]["weight"]


def forward(
    cfg: qwen3_moe.Config | gpt_oss.Config,
    params: dict,
    input_ids: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    options: ForwardOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Logits ``[B, S, V]`` in the params' dtype; see :func:`hidden_states` for the args."""
    h, _ = hidden_states(
        cfg,
        params,
        input_ids,
        position_ids=position_ids,
        document_ids=document_ids,
        options=options,
    )
    return F.linear(h, lm_head_weight(cfg, params))
