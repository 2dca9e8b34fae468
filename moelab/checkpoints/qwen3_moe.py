"""Qwen3-MoE and Qwen3-VL-MoE (text part) hub names (checkpoint-formats.md §2).

Experts load from per-expert tensors (the hub layout and default v5 saves) or from fused
``gate_up_proj`` / ``down_proj`` stacks (v5 ``save_original_format=False``, Qwen3-VL-MoE).
Qwen3-VL-MoE's fused stacks come in two orientations; which one a file holds is read from its
config's provenance, never guessed from shapes (square ones cannot be told apart): the
official release is ``[E, H, 2I]`` / ``[E, I, H]``, Transformers >= 5 writes ``[E, 2I, H]``.
"""

from __future__ import annotations

import re

from moelab.checkpoints.mapping import Target
from moelab.models import tree
from moelab.models.qwen3_moe import Config

GLOBAL_NAMES = {
    ("embed", "weight"): "embed_tokens.weight",
    ("norm", "weight"): "norm.weight",
}
# per-layer param path (after "layers", L) -> hub name after "layers.L."
LAYER_NAMES = {
    ("input_norm", "weight"): "input_layernorm.weight",
    ("post_norm", "weight"): "post_attention_layernorm.weight",
    ("attn", "q_norm", "weight"): "self_attn.q_norm.weight",
    ("attn", "k_norm", "weight"): "self_attn.k_norm.weight",
    ("mlp", "router", "weight"): "mlp.gate.weight",
    **{
        ("attn", p, kind): f"self_attn.{p}.{kind}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        for kind in ("weight", "bias")
    },
    **{("mlp", p, "weight"): f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
}
FUSED_NAMES = {"gate_up": "mlp.experts.gate_up_proj", "down": "mlp.experts.down_proj"}
PER_EXPERT = "mlp.experts.{e}.{proj}.weight"

LAYOUTS = ("per_expert", "fused", "fused_official")
QUANT_METHODS: tuple[str, ...] = ()  # no quantised checkpoint is read
ADAPTER_LAYOUT = "fused"  # unquantised v5 names, as PEFT sees the model
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def _prefix(cfg: Config) -> str:
    return "model.language_model." if cfg.model_type == "qwen3_vl_moe" else "model."


def expert_layout(cfg: Config, names: set[str]) -> str:
    """How the experts of a checkpoint with these tensor names are stored (see module doc)."""
    if not any(n.endswith(FUSED_NAMES["gate_up"]) for n in names):
        return "per_expert"
    if cfg.model_type != "qwen3_vl_moe":
        return "fused"
    version = str(cfg.hf.get("transformers_version", "4"))
    return "fused" if int(version.split(".")[0]) >= 5 else "fused_official"


def save_layouts(cfg: Config) -> tuple[str, ...]:
    """The layouts ``save_pretrained`` can write, those Transformers reads for the model type:
    Qwen3-VL's experts are fused (either orientation), Qwen3-MoE's per expert or fused."""
    return ("fused", "fused_official") if cfg.model_type == "qwen3_vl_moe" else LAYOUTS[:2]


def provenance(layout: str) -> dict:
    """``config.json`` keys that let ``expert_layout`` read a saved Qwen3-VL layout back: the
    fused orientation is told by the writer's Transformers major version, v5 transposing."""
    if layout == "fused_official":
        return {"transformers_version": "4.57.0"}
    return {"transformers_version": "5.0.0"} if layout == "fused" else {}


def save_layout(cfg: Config) -> str:
    """The hub layout: per-expert, except Qwen3-VL-MoE (fused, orientation by provenance)."""
    return (
        expert_layout(cfg, {FUSED_NAMES["gate_up"]})
        if cfg.model_type == "qwen3_vl_moe"
        else ("per_expert")
    )


def targets(cfg: Config, params: dict, layout: str) -> dict[str, Target]:
    """Every hub tensor name of this config and layout -> where it lives in ``params`` (a
    param with no hub name is left out: ``save_pretrained`` refuses it)."""
    prefix, inter = _prefix(cfg), cfg.moe_intermediate_size
    out = {}
    for path, _ in tree.leaves(params):
        if path[0] == "lm_head":
            out["lm_head.weight"] = Target(path)
            continue
        if path[0] != "layers":
            if path in GLOBAL_NAMES:
                out[prefix + GLOBAL_NAMES[path]] = Target(path)
            continue
        layer, rest = path[1], path[2:]
        at = f"{prefix}layers.{layer}."
        if rest[:2] != ("mlp", "experts"):
            if rest in LAYER_NAMES:
                out[at + LAYER_NAMES[rest]] = Target(path)
        elif layout != "per_expert":
            if rest[2] in FUSED_NAMES:  # not an experts dict's "lora" adapters
                out[at + FUSED_NAMES[rest[2]]] = Target(path, transposed=layout == "fused_official")
        elif rest[2] == "gate_up":
            for e in range(cfg.num_experts):
                out[at + PER_EXPERT.format(e=e, proj="gate_proj")] = Target(
                    path, (e, slice(0, inter))
                )
                out[at + PER_EXPERT.format(e=e, proj="up_proj")] = Target(
                    path, (e, slice(inter, 2 * inter))
                )
        elif rest[2] == "down":
            for e in range(cfg.num_experts):
                out[at + PER_EXPERT.format(e=e, proj="down_proj")] = Target(path, (e,))
    return out


def ignored(cfg: Config, name: str) -> bool:
    """Tensors a text model deliberately drops: rotary caches, vision tower, extra layers."""
    if name.endswith("rotary_emb.inv_freq") or name.startswith("model.visual."):
        return True
    match = _LAYER_INDEX.search(name)
    return match is not None and int(match.group(1)) >= cfg.num_layers
