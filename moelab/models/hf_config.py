"""Reading Hugging Face ``config.json`` dicts: both the hub/v4 and the Transformers v5 spellings.

See checkpoint-formats.md §1.2 for the key normalisation this implements.
"""

from __future__ import annotations

from typing import Any

import torch

from moelab.ops.rope import RopeConfig


def require(d: dict, *keys: str, where: str = "config.json") -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{where} lacks required keys: {', '.join(missing)}")


def check_sizes(cfg: Any) -> Any:
    """``cfg`` (a family's Config) if its sizes can make a model, else a ValueError naming the
    first that cannot: a size that is not an int >= 1, top-k outside the experts, heads not
    grouping into kv heads, a norm epsilon that is not positive."""
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "moe_intermediate_size", "num_experts", "top_k"):  # fmt: skip
        value = getattr(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} must be an integer >= 1")
    if cfg.top_k > cfg.num_experts:
        raise ValueError(f"top-k {cfg.top_k} exceeds the {cfg.num_experts} experts")
    if cfg.num_heads % cfg.num_kv_heads:
        heads, kv = cfg.num_heads, cfg.num_kv_heads
        raise ValueError(f"{heads} attention heads do not group into {kv} kv heads")
    if not (isinstance(cfg.rms_norm_eps, (int, float)) and cfg.rms_norm_eps > 0):
        raise ValueError(f"rms_norm_eps={cfg.rms_norm_eps} must be > 0")
    return cfg


def first_key(d: dict, *names: str, default: Any = None) -> Any:
    """The value of the first of ``names`` present in ``d`` (aliases across versions)."""
    for name in names:
        if name in d and d[name] is not None:
            return d[name]
    return default


def rope_config(d: dict, head_dim: int, default_theta: float = 10000.0) -> RopeConfig:
    """Rotary settings from ``rope_parameters`` (v5) or ``rope_theta`` + ``rope_scaling`` (v4)."""
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = first_key(
        merged, "rope_theta", default=first_key(d, "rope_theta", default=default_theta)
    )
    kind = first_key(merged, "rope_type", "type", default="default")
    partial = first_key(
        merged, "partial_rotary_factor", default=d.get("partial_rotary_factor", 1.0)
    )
    rotary_dim = int(head_dim * partial)
    if kind == "default":
        return RopeConfig(theta=float(theta), rotary_dim=rotary_dim)
    if kind != "yarn":
        raise ValueError(f"unsupported rope type {kind!r} in config.json (default and yarn are)")
    max_pos = d.get("max_position_embeddings")
    original = first_key(merged, "original_max_position_embeddings", default=max_pos)
    factor = first_key(merged, "factor", default=None)
    if factor is None:
        if max_pos is None or original is None:
            raise ValueError("yarn rope needs factor or max/original_max_position_embeddings")
        factor = max_pos / original
    return RopeConfig(
        theta=float(theta),
        rotary_dim=rotary_dim,
        kind="yarn",
        factor=float(factor),
        original_max_position=int(original),
        beta_fast=float(first_key(merged, "beta_fast", default=32.0)),
        beta_slow=float(first_key(merged, "beta_slow", default=1.0)),
        mscale=first_key(merged, "mscale"),
        mscale_all_dim=first_key(merged, "mscale_all_dim"),
        attention_factor=first_key(merged, "attention_factor"),
        truncate=bool(first_key(merged, "truncate", default=True)),
    )


def rope_to_hf(rope: RopeConfig) -> dict:
    """v4-style ``rope_theta`` / ``rope_scaling`` keys, which v4 and v5 loaders both read, and
    the v5 ``rope_parameters`` (a v5 class may otherwise fill in its own default rope)."""
    if rope.kind == "default":
        return {
            "rope_theta": rope.theta,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope.theta},
        }
    scaling = {
        "rope_type": "yarn",
        "factor": rope.factor,
        "original_max_position_embeddings": rope.original_max_position,
        "beta_fast": rope.beta_fast,
        "beta_slow": rope.beta_slow,
        "truncate": rope.truncate,
    }
    for key in ("mscale", "mscale_all_dim", "attention_factor"):
        if getattr(rope, key) is not None:
            scaling[key] = getattr(rope, key)
    return {
        "rope_theta": rope.theta,
        "rope_scaling": scaling,
        "rope_parameters": {**scaling, "rope_theta": rope.theta},
    }


# keys whose spelling differs between versions: dropped before a config is written back
VERSIONED_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype")


def config_dtype(d: dict) -> torch.dtype | None:
    name = first_key(d, "dtype", "torch_dtype")
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config.json names an unknown dtype {name!r}")
    return dtype
