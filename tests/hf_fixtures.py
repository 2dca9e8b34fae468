"""Tiny random checkpoints written by Transformers (a test-only oracle), per checkpoint-formats §7.

Weights are re-randomised after construction (norms 1 + 0.3 N, biases 0.5 N, others 0.08 N):
the library's own init (unit norms, zero biases) would hide whole classes of bugs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

QWEN3_MAIN = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    mlp_only_layers=[1],
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=256,
)


def rerandomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif name.endswith(("bias", "sinks")):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.08 * noise)


def qwen3_model(seed: int = 0, **overrides):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**QWEN3_MAIN, **overrides}))
    rerandomize(model, seed)
    return model.eval()


def save_qwen3(path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    model = qwen3_model(seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def qwen3_vl_model(seed: int = 0):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    # moe_intermediate 24 keeps H != 2I, so the two expert orientations differ in shape
    shared = {k: v for k, v in QWEN3_MAIN.items() if k not in ("rope_theta", "norm_topk_prob")}
    text = dict(
        **{**shared, "moe_intermediate_size": 24, "num_hidden_layers": 2, "mlp_only_layers": []},
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [8, 4, 4],
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=4,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
    )
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(
        Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    )
    rerandomize(model, seed)
    return model.eval()


GPT_OSS_MAIN = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=4,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
)


def gpt_oss_model(seed: int = 0, **overrides):
    """Tiny GPT-OSS; gate_up drawn with std 0.6 so |gate|, |up| pass 7 and the clamps fire."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    model = GptOssForCausalLM(GptOssConfig(**{**GPT_OSS_MAIN, **overrides}))
    rerandomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("experts.gate_up_proj"):
                p.copy_(0.6 * torch.randn(p.shape, generator=g))
    return model.eval()


def load_reference(
    path: Path, dtype: torch.dtype = torch.float32, cls_name: str = "AutoModelForCausalLM"
):
    """The oracle as the spec prescribes: eager attention and eager experts."""
    import transformers

    cls = getattr(transformers, cls_name)
    model = cls.from_pretrained(
        path, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    )
    if "quantization_config" in json.loads((Path(path) / "config.json").read_text()):
        # with a GPU present and no `kernels` package, Transformers dequantises MXFP4 experts to
        # bf16 whatever dtype is asked for; the values are exact in bf16, so this cast restores
        # the asked-for dtype (not done elsewhere: it would undo modules Transformers keeps fp32)
        model.to(dtype)
    return model.eval()


def save_random_mxfp4(root: Path, edit=None) -> Path:
    """A tiny GPT-OSS checkpoint (3 experts, 2 layers) whose MXFP4 expert blocks and scales
    are random bytes, every code and exponent; ``edit(blocks, scales)`` may set chosen bytes of
    each expert tensor (uint8-valued int64 tensors ``[E, R, K/32, 16]`` and ``[E, R, K/32]``).
    Returns the MXFP4 folder, under ``root``."""
    from safetensors.torch import load_file, save_file

    from moelab.checkpoints.gpt_oss import MXFP4_CONFIG

    gpt_oss_model(num_local_experts=3, num_hidden_layers=2).save_pretrained(root / "bf16")
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, t in load_file(root / "bf16" / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, k, rows = t.shape  # v5 orientation [E, K, R]
            blocks = torch.randint(0, 256, (experts, rows, k // 32, 16), generator=g)
            scales = torch.randint(0, 256, (experts, rows, k // 32), generator=g)
            if edit is not None:
                edit(blocks, scales)
            out[f"{name}_blocks"] = blocks.to(torch.uint8)
            out[f"{name}_scales"] = scales.to(torch.uint8)
        else:
            out[name] = t.bfloat16()
    path = root / "mxfp4"
    path.mkdir()
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "bf16" / "config.json").read_text())
    config["quantization_config"] = dict(MXFP4_CONFIG)
    (path / "config.json").write_text(json.dumps(config))
    return path
