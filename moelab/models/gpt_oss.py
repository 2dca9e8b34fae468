"""GPT-OSS (gpt-oss-20b, gpt-oss-120b); checkpoint-formats.md §4 has the math.

Attention with q/k/v/o biases and one learned sink logit per head, sliding-window (even layers
by default) and full layers alternating, YaRN RoPE; RMSNorm with the weight applied in fp32;
router with bias, top-k of the logits then softmax; experts with biases and the clamped
``swiglu_oai`` activation. Params::

    {"embed": {"weight": [V, H]},
     "layers": [{"input_norm": {"weight"}, "post_norm": {"weight"},
                 "attn": {"q_proj", "k_proj", "v_proj", "o_proj": {"weight", "bias"},
                          "sinks": [N]},
                 "mlp": {"router": {"weight": [E, H], "bias": [E]},
                         "experts": {"gate_up": [E, 2I, H], "down": [E, H, I],
                                     "gate_up_bias": [E, 2I], "down_bias": [E, H]}}}, ...],
     "norm": {"weight": [H]}, "lm_head": {"weight": [V, H]}}

``gate_up`` is canonical (gate rows first, then up): the loader de-interleaves the hub layout.
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
from moelab.ops.activations import OAI_ALPHA, OAI_LIMIT
from moelab.ops.attention import attention
from moelab.ops.linear import linear
from moelab.ops.moe import MoEConfig, RouterStats, moe_block
from moelab.ops.norms import rms_norm
from moelab.ops.rope import RopeConfig, apply_rope

MODEL_TYPES = ("gpt_oss",)
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_intermediate_size: int  # the per-expert width, `intermediate_size` in config.json
    num_experts: int
    top_k: int
    rope: RopeConfig
    layer_types: tuple[str, ...]
    sliding_window: int = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    model_type: str = "gpt_oss"
    dtype: torch.dtype | None = None
    hf: dict = field(default_factory=dict, compare=False, repr=False)

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
        return _norm(self, h, params["norm"]["weight"])

    def moe(self, options: ForwardOptions) -> MoEConfig:
        return MoEConfig(
            num_experts=self.num_experts,
            top_k=self.top_k,
            router="topk_softmax",
            activation="swiglu_oai",
            **options.moe_fields(),
        )

    @classmethod
    def from_hf(cls, d: dict) -> Config:
        if d.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"not a GPT-OSS config: model_type {d.get('model_type')!r}")
        require(
            d,
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_experts_per_tok",
        )
        num_experts = first_key(d, "num_local_experts", "num_experts")
        if num_experts is None:
            raise ValueError("config.json lacks num_local_experts")
        limit, alpha = d.get("swiglu_limit", OAI_LIMIT), d.get("swiglu_alpha", OAI_ALPHA)
        if (limit, alpha) != (OAI_LIMIT, OAI_ALPHA):
            raise ValueError(
                f"swiglu_limit={limit}, swiglu_alpha={alpha}: only the released "
                f"{OAI_LIMIT}, {OAI_ALPHA} are supported"
            )
        layers = d["num_hidden_layers"]
        layer_types = tuple(d.get("layer_types") or (LAYER_TYPES[i % 2] for i in range(layers)))
        if len(layer_types) != layers or any(t not in LAYER_TYPES for t in layer_types):
            raise ValueError(f"layer_types must list {layers} of {LAYER_TYPES}, got {layer_types}")
        heads = d["num_attention_heads"]
        # absent keys take GptOssConfig's class defaults, as Transformers loads them; null ones
        # its fallbacks (hidden / heads, and as many kv heads as heads)
        head_dim = d.get("head_dim", DEFAULT_HEAD_DIM) or d["hidden_size"] // heads
        kv_heads = d.get("num_key_value_heads", DEFAULT_KV_HEADS) or heads
        cfg = cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            moe_intermediate_size=d["intermediate_size"],
            num_experts=num_experts,
            top_k=d["num_experts_per_tok"],
            rope=_rope(d, head_dim),
            layer_types=layer_types,
            sliding_window=d.get("sliding_window") or 128,
            rms_norm_eps=first_key(d, "rms_norm_eps", default=1e-5),
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            dtype=config_dtype(d),
            hf=d,
        )
        return check_sizes(cfg)

    def to_hf(self) -> dict:
        kept = {
            k: v
            for k, v in self.hf.items()
            if k not in VERSIONED_KEYS and k not in ("quantization_config", "num_experts")
        }
        out = {
            **kept,
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.moe_intermediate_size,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": True,
            "tie_word_embeddings": self.tie_word_embeddings,
            **rope_to_hf(self.rope),
        }
        if self.dtype is not None:
            out["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        return out


# GptOssConfig's defaults for sizes a config.json may leave out (the released ones)
DEFAULT_HEAD_DIM, DEFAULT_KV_HEADS = 64, 8
# The released rope settings, which Transformers' GptOssConfig also applies when neither
# rope_parameters nor rope_scaling is given (a bare rope_theta keeps YaRN and sets its theta);
# a theta given nowhere is GPT-OSS's own default, not the usual 10000.
DEFAULT_THETA = 150000.0
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "rope_theta": DEFAULT_THETA,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


def _rope(d: dict, head_dim: int) -> RopeConfig:
    if d.get("rope_parameters") is None and d.get("rope_scaling") is None:
        theta = d["rope_theta"] if d.get("rope_theta") is not None else DEFAULT_THETA
        d = {**d, "rope_parameters": {**DEFAULT_ROPE, "rope_theta": theta}}
    return rope_config(d, head_dim, default_theta=DEFAULT_THETA)


def init_params(
    cfg: Config,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    std: float = 0.02,
) -> dict:
    """Fresh parameters: N(0, std) weights, unit norms, zero biases and sinks (meta: shapes)."""

    def normal(*shape: int) -> torch.Tensor:
        w = torch.empty(*shape, dtype=dtype, device=device)
        return w if w.device.type == "meta" else w.normal_(0.0, std, generator=generator)

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    def ones() -> dict:
        return {"weight": torch.ones(h, dtype=dtype, device=device)}

    def proj(out_dim: int, in_dim: int) -> dict:
        return {"weight": normal(out_dim, in_dim), "bias": zeros(out_dim)}

    h, d, i, e = cfg.hidden_size, cfg.head_dim, cfg.moe_intermediate_size, cfg.num_experts
    layers = []
    for _ in range(cfg.num_layers):
        attn = {
            "q_proj": proj(cfg.num_heads * d, h),
            "k_proj": proj(cfg.num_kv_heads * d, h),
            "v_proj": proj(cfg.num_kv_heads * d, h),
            "o_proj": proj(h, cfg.num_heads * d),
            "sinks": zeros(cfg.num_heads),
        }
        mlp = {
            "router": proj(e, h),
            "experts": {
                "gate_up": normal(e, 2 * i, h),
                "down": normal(e, h, i),
                "gate_up_bias": zeros(e, 2 * i),
                "down_bias": zeros(e, h),
            },
        }
        layers.append({"input_norm": ones(), "post_norm": ones(), "attn": attn, "mlp": mlp})
    params = {"embed": {"weight": normal(cfg.vocab_size, h)}, "layers": layers, "norm": ones()}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"weight": normal(cfg.vocab_size, h)}
    return params


def _norm(cfg: Config, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, weight, cfg.rms_norm_eps, weight_in_fp32=True)


def _attention_block(cfg, layer, p, x_BSH, cos, sin, document_ids, options) -> torch.Tensor:
    b, s, _ = x_BSH.shape
    d, scale, drop = cfg.head_dim, options.lora_scale, options.lora_dropout

    def heads(name: str, n: int) -> torch.Tensor:
        return linear(x_BSH, p[name], scale, drop).view(b, s, n, d).transpose(1, 2)

    q = apply_rope(heads("q_proj", cfg.num_heads), cos, sin)
    k = apply_rope(heads("k_proj", cfg.num_kv_heads), cos, sin)
    v = heads("v_proj", cfg.num_kv_heads)
    window = cfg.sliding_window if cfg.layer_types[layer] == "sliding_attention" else None
    o = attention(
        q,
        k,
        v,
        scale=d**-0.5,
        document_ids_BS=document_ids,
        sliding_window=window,
        sinks_N=p["sinks"],
        impl=options.attention,
    )
    return linear(o.transpose(1, 2).reshape(b, s, cfg.num_heads * d), p["o_proj"], scale, drop)


def _decoder_layer(cfg, layer, p, h, cos, sin, document_ids, options):
    x = _norm(cfg, h, p["input_norm"]["weight"])
    h = h + _attention_block(cfg, layer, p["attn"], x, cos, sin, document_ids, options)
    y, stats = moe_block(_norm(cfg, h, p["post_norm"]["weight"]), p["mlp"], cfg.moe(options))
    return h + y, stats


hidden_states = decoder.hidden_states
forward = decoder.forward
lm_head_weight = decoder.lm_head_weight
