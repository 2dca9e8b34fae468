"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B, Coder) and the text part of Qwen3-VL-MoE.

A model is ``(Config, params, forward)``; checkpoint-formats.md §2 has the math. Params::

    {"embed": {"weight": [V, H]},
     "layers": [{"input_norm": {"weight"}, "post_norm": {"weight"},
                 "attn": {"q_proj", "k_proj", "v_proj", "o_proj": {"weight", "bias"?},
                          "q_norm": {"weight": [D]}, "k_norm": {"weight": [D]}},
                 "mlp": {"router": {"weight": [E, H]},
                         "experts": {"gate_up": [E, 2I, H], "down": [E, H, I]}}
                        or {"gate_proj", "up_proj", "down_proj"} (dense layers)}, ...],
     "norm": {"weight": [H]},
     "lm_head": {"weight": [V, H]}}   (absent with tied embeddings)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moelab.models import decoder
from moelab.models.hf_config import (
    VERSIONED_KEYS,
    check_sizes,
    config_dtype,
    first_key,
    require,
    rope_config,
    rope_to_hf,
)
from moelab.models.options import ForwardOptions
from moelab.ops.attention import attention
from moelab.ops.linear import linear, swiglu_mlp
from moelab.ops.moe import MoEConfig, RouterStats, moe_block
from moelab.ops.norms import rms_norm
from moelab.ops.rope import RopeConfig, apply_rope

MODEL_TYPES = ("qwen3_moe", "qwen3_vl_moe")


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    rope: RopeConfig
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "qwen3_moe"
    dtype: torch.dtype | None = None
    # the config.json this came from: unknown keys are written back on save
    hf: dict = field(default_factory=dict, compare=False, repr=False)

    def is_sparse(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def decoder_layer(
        self,
        layer: int,
        p: dict,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        document_ids: torch.Tensor | None,
        options: ForwardOptions,
    ) -> tuple[torch.Tensor, RouterStats | None]:
        return _decoder_layer(self, layer, p, h, cos, sin, document_ids, options)

    def final_norm(self, h: torch.Tensor, params: dict) -> torch.Tensor:
        return rms_norm(h, params["norm"]["weight"], self.rms_norm_eps)

    def moe(self, options: ForwardOptions) -> MoEConfig:
        return MoEConfig(
            num_experts=self.num_experts,
            top_k=self.top_k,
            router="softmax_topk",
            router_options={"renormalize": self.norm_topk_prob},
            activation="swiglu",
            **options.moe_fields(),
        )

    @classmethod
    def from_hf(cls, d: dict) -> Config:
        """Parse ``config.json`` (hub/v4 or v5 keys; Qwen3-VL-MoE through ``text_config``)."""
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"not a Qwen3-MoE config: model_type {model_type!r}")
        text = d.get("text_config", {}) if model_type == "qwen3_vl_moe" else d
        where = "config.json text_config" if text is not d else "config.json"
        require(
            text,
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "moe_intermediate_size",
            "num_experts_per_tok",
            where=where,
        )
        num_experts = first_key(text, "num_experts", "num_local_experts")
        if num_experts is None:
            raise ValueError(f"{where} lacks num_experts (or num_local_experts)")
        if text.get("use_sliding_window"):
            raise ValueError("Qwen3-MoE with use_sliding_window=true is not supported")
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        if text.get("decoder_sparse_step", 1) < 1:
            raise ValueError("decoder_sparse_step must be >= 1 (1: every layer is MoE)")
        cfg = cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=first_key(text, "num_key_value_heads", default=heads),
            head_dim=head_dim,
            intermediate_size=text.get("intermediate_size", 0),
            moe_intermediate_size=text["moe_intermediate_size"],
            num_experts=num_experts,
            top_k=text["num_experts_per_tok"],
            rope=rope_config(text, head_dim),
            # Qwen3-VL-MoE has no such key: its router always renormalises
            norm_topk_prob=True if text is not d else bool(text.get("norm_topk_prob", False)),
            decoder_sparse_step=text.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(text.get("mlp_only_layers") or ()),
            rms_norm_eps=first_key(text, "rms_norm_eps", default=1e-6),
            max_position_embeddings=text.get("max_position_embeddings", 40960),
            attention_bias=bool(text.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            model_type=model_type,
            dtype=config_dtype(text) or config_dtype(d),
            hf=d,
        )
        return check_sizes(cfg)

    def to_hf(self) -> dict:
        """A ``config.json`` dict in the hub spelling, keeping the source's other keys."""
        text = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "decoder_sparse_step": self.decoder_sparse_step,
            "mlp_only_layers": list(self.mlp_only_layers),
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            **rope_to_hf(self.rope),
        }
        if self.dtype is not None:
            text["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        if self.model_type == "qwen3_vl_moe":
            source = dict(self.hf.get("text_config", {}))
            out = dict(self.hf)
            out["text_config"] = _merged(source, text)
        else:
            text["norm_topk_prob"] = self.norm_topk_prob
            out = _merged(
                self.hf,
                {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **text},
            )
        out["tie_word_embeddings"] = self.tie_word_embeddings
        return out


def _merged(source: dict, ours: dict) -> dict:
    kept = {
        k: v
        for k, v in source.items()
        if k not in VERSIONED_KEYS and k not in ("num_local_experts",)
    }
    out = {**kept, **ours}
    # rope keys moelab does not model (Qwen3-VL's mrope_section and mrope_interleaved, plain
    # RoPE for text) stay in the rope dicts written back, where Transformers reads them
    source_rope = {**(source.get("rope_scaling") or {}), **(source.get("rope_parameters") or {})}
    for key in ("rope_parameters", "rope_scaling"):
        if out.get(key) is not None:
            extra = {k: v for k, v in source_rope.items() if k not in out[key] and k != "type"}
            out[key] = {**out[key], **extra}
    return out


def init_params(
    cfg: Config,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    std: float = 0.02,
) -> dict:
    """Fresh parameters for training from scratch: N(0, std) weights, unit norms, zero biases.

    On the ``meta`` device this only describes shapes (what the checkpoint loader expects).
    """

    def normal(*shape: int) -> dict:
        w = torch.empty(*shape, dtype=dtype, device=device)
        if w.device.type != "meta":
            w.normal_(0.0, std, generator=generator)
        return {"weight": w}

    def ones(n: int) -> dict:
        return {"weight": torch.ones(n, dtype=dtype, device=device)}

    def proj(out_dim: int, in_dim: int, bias: bool = False) -> dict:
        p = normal(out_dim, in_dim)
        if bias:
            p["bias"] = torch.zeros(out_dim, dtype=dtype, device=device)
        return p

    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.moe_intermediate_size
    layers = []
    for layer in range(cfg.num_layers):
        attn = {
            "q_proj": proj(cfg.num_heads * d, h, cfg.attention_bias),
            "k_proj": proj(cfg.num_kv_heads * d, h, cfg.attention_bias),
            "v_proj": proj(cfg.num_kv_heads * d, h, cfg.attention_bias),
            "o_proj": proj(h, cfg.num_heads * d, cfg.attention_bias),
            "q_norm": ones(d),
            "k_norm": ones(d),
        }
        if cfg.is_sparse(layer):
            mlp = {
                "router": normal(cfg.num_experts, h),
                "experts": {
                    "gate_up": normal(cfg.num_experts, 2 * i, h)["weight"],
                    "down": normal(cfg.num_experts, h, i)["weight"],
                },
            }
        else:
            width = cfg.intermediate_size
            mlp = {
                "gate_proj": proj(width, h),
                "up_proj": proj(width, h),
                "down_proj": proj(h, width),
            }
        layers.append({"input_norm": ones(h), "post_norm": ones(h), "attn": attn, "mlp": mlp})
    params = {"embed": normal(cfg.vocab_size, h), "layers": layers, "norm": ones(h)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal(cfg.vocab_size, h)
    return params


def _attention_block(cfg, p, x_BSH, cos, sin, document_ids, options) -> torch.Tensor:
    b, s, _ = x_BSH.shape
    d, scale, drop = cfg.head_dim, options.lora_scale, options.lora_dropout

    def heads(name: str, n: int, norm: str | None) -> torch.Tensor:
        t = linear(x_BSH, p[name], scale, drop).view(b, s, n, d)
        if norm is not None:  # per-head RMSNorm before RoPE
            t = rms_norm(t, p[norm]["weight"], cfg.rms_norm_eps)
        return t.transpose(1, 2)

    q = apply_rope(heads("q_proj", cfg.num_heads, "q_norm"), cos, sin)
    k = apply_rope(heads("k_proj", cfg.num_kv_heads, "k_norm"), cos, sin)
    v = heads("v_proj", cfg.num_kv_heads, None)
    o = attention(q, k, v, scale=d**-0.5, document_ids_BS=document_ids, impl=options.attention)
    return linear(o.transpose(1, 2).reshape(b, s, cfg.num_heads * d), p["o_proj"], scale, drop)


def _decoder_layer(cfg, layer, p, h, cos, sin, document_ids, options):
    x = rms_norm(h, p["input_norm"]["weight"], cfg.rms_norm_eps)
    h = h + _attention_block(cfg, p["attn"], x, cos, sin, document_ids, options)
    x = rms_norm(h, p["post_norm"]["weight"], cfg.rms_norm_eps)
    if cfg.is_sparse(layer):
        y, stats = moe_block(x, p["mlp"], cfg.moe(options))
        return h + y, stats
    return h + swiglu_mlp(x, p["mlp"], options.lora_scale, options.lora_dropout), None


hidden_states = decoder.hidden_states
forward = decoder.forward
lm_head_weight = decoder.lm_head_weight
