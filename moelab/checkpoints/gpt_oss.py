"""GPT-OSS hub names (checkpoint-formats.md §4.2).

Experts come as MXFP4 ``*_blocks`` / ``*_scales`` (the hub release) or as bf16 stacks in the
Transformers v5 orientation (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``). Either way
gate and up alternate along the 2I axis on disk; the params hold them gate-first.
"""

from __future__ import annotations

import re

from moelab.checkpoints.mapping import Target
from moelab.models import tree
from moelab.models.gpt_oss import Config

GLOBAL_NAMES = {
    ("embed", "weight"): "model.embed_tokens.weight",
    ("norm", "weight"): "model.norm.weight",
    ("lm_head", "weight"): "lm_head.weight",
}
LAYER_NAMES = {
    ("input_norm", "weight"): "input_layernorm.weight",
    ("post_norm", "weight"): "post_attention_layernorm.weight",
    ("attn", "sinks"): "self_attn.sinks",
    ("mlp", "router", "weight"): "mlp.router.weight",
    ("mlp", "router", "bias"): "mlp.router.bias",
    **{
        ("attn", p, kind): f"self_attn.{p}.{kind}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        for kind in ("weight", "bias")
    },
}
LAYOUTS = ("bf16", "mxfp4")
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
QUANT_METHODS = ("mxfp4",)  # quantization_config.quant_method values loaded
ADAPTER_LAYOUT = "bf16"  # unquantised v5 names, as PEFT sees the model
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def _experts(at: str, layout: str) -> dict[str, Target]:
    """Targets of one layer's experts, with ``path`` relative to the experts dict."""
    targets = {
        f"{at}mlp.experts.gate_up_proj_bias": Target(("gate_up_bias",), interleaved_dim=-1),
        f"{at}mlp.experts.down_proj_bias": Target(("down_bias",)),
    }
    if layout == "mxfp4":  # blocks orientation: [E, 2I, H/32, 16] and [E, H, I/32, 16]
        targets[f"{at}mlp.experts.gate_up_proj_blocks"] = Target(
            ("gate_up",), interleaved_dim=-2, mxfp4_scales=f"{at}mlp.experts.gate_up_proj_scales"
        )
        targets[f"{at}mlp.experts.down_proj_blocks"] = Target(
            ("down",), mxfp4_scales=f"{at}mlp.experts.down_proj_scales"
        )
    else:  # v5 orientation: [E, H, 2I] and [E, I, H]
        targets[f"{at}mlp.experts.gate_up_proj"] = Target(
            ("gate_up",), transposed=True, interleaved_dim=-2
        )
        targets[f"{at}mlp.experts.down_proj"] = Target(("down",), transposed=True)
    return targets


def expert_layout(cfg: Config, names: set[str]) -> str:
    return "mxfp4" if any(n.endswith("gate_up_proj_blocks") for n in names) else "bf16"


def save_layouts(cfg: Config) -> tuple[str, ...]:
    return LAYOUTS


def provenance(layout: str) -> dict:
    return {}


def save_layout(cfg: Config) -> str:
    return "bf16"


def targets(cfg: Config, params: dict, layout: str) -> dict[str, Target]:
    """Every hub tensor name of this config and layout -> where it lives in ``params`` (a
    param with no hub name is left out: ``save_pretrained`` refuses it)."""
    if layout not in LAYOUTS:
        raise ValueError(f"GPT-OSS expert layout must be one of {LAYOUTS}, got {layout!r}")
    out = {}
    for path, _ in tree.leaves(params):
        if path[0] != "layers":
            if path in GLOBAL_NAMES:
                out[GLOBAL_NAMES[path]] = Target(path)
        elif path[2:4] != ("mlp", "experts") and path[2:] in LAYER_NAMES:
            out[f"model.layers.{path[1]}.{LAYER_NAMES[path[2:]]}"] = Target(path)
    for layer in range(len(params["layers"])):
        base = ("layers", layer, "mlp", "experts")
        for name, t in _experts(f"model.layers.{layer}.", layout).items():
            out[name] = Target(
                (*base, *t.path), t.index, t.transposed, t.interleaved_dim, t.mxfp4_scales
            )
    return out


def ignored(cfg: Config, name: str) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True
    match = _LAYER_INDEX.search(name)
    return match is not None and int(match.group(1)) >= cfg.num_layers
