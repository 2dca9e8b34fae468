"""Peak resident memory of ``load_pretrained`` on CPU, against the size of the parameters.

``python -m moelab.bench load --gb 2`` writes a synthetic Qwen3-MoE-shaped bf16 checkpoint of
about that size (per-expert tensors, as on the hub) to a temporary folder, then loads it in a
fresh process that resets its peak-RSS counter (``/proc/self/clear_refs``) right before the
load and reads ``VmHWM`` after it. Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from moelab.checkpoints import api
from moelab.checkpoints.safetensors_io import write_checkpoint
from moelab.models import gpt_oss, qwen3_moe, tree

_MEASURE = """
import json, sys, torch, moelab
def kib(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))
torch.set_num_threads(1)
open('/proc/self/clear_refs', 'w').write('5')
before = kib('VmRSS')
model = moelab.load_pretrained(sys.argv[1])
param_bytes = sum(t.numel() * t.element_size() for _, t in moelab.models.tree.leaves(model.params))
print(json.dumps({"param_bytes": param_bytes, "peak_extra_bytes": (kib('VmHWM') - before) * 1024}))
"""


def synthetic_config(family: str, gigabytes: float) -> qwen3_moe.Config | gpt_oss.Config:
    """A Qwen3-MoE-shaped (H 1024, I 512, 64 experts) or GPT-OSS-shaped (H 1024, I 1024, 32
    experts, MXFP4 experts on disk) config with enough layers to reach ``gigabytes`` in bf16."""
    model, _ = api.FAMILIES[family]
    if family == "qwen3_moe":
        hf = dict(
            model_type="qwen3_moe",
            vocab_size=32000,
            hidden_size=1024,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            moe_intermediate_size=512,
            num_experts=64,
            num_experts_per_tok=8,
            norm_topk_prob=True,
        )
    else:
        hf = dict(
            model_type="gpt_oss",
            vocab_size=32000,
            hidden_size=1024,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            intermediate_size=1024,
            num_local_experts=32,
            num_experts_per_tok=4,
        )
    hf.update(torch_dtype="bfloat16", num_hidden_layers=1)
    one = model.init_params(model.Config.from_hf(hf), dtype=torch.bfloat16, device="meta")
    embed = 2 * 2 * 32000 * 1024
    per_layer = tree.count(one) * 2 - embed
    hf["num_hidden_layers"] = max(1, round((gigabytes * 2**30 - embed) / per_layer))
    return model.Config.from_hf(hf)


def write_synthetic(path: Path, cfg: qwen3_moe.Config | gpt_oss.Config) -> None:
    """Random weights, one tensor at a time (the writer holds one shard of 1 GiB); bf16, and
    MXFP4 blocks and scales for GPT-OSS experts as the hub release stores them."""
    model, names = api.FAMILIES[cfg.model_type]
    meta = model.init_params(cfg, dtype=torch.bfloat16, device="meta")
    layout = "mxfp4" if cfg.model_type == "gpt_oss" else "per_expert"
    targets = names.targets(cfg, meta, layout)
    gen = torch.Generator().manual_seed(0)
    config = cfg.to_hf()
    if layout == "mxfp4":
        config["quantization_config"] = dict(names.MXFP4_CONFIG)

    def tensors():
        for name in sorted(targets):
            for stored, shape in targets[name].stored_shapes(name, meta).items():
                if stored.endswith("_blocks"):
                    yield stored, torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
                elif stored.endswith("_scales"):
                    yield stored, torch.randint(118, 128, shape, generator=gen, dtype=torch.uint8)
                else:
                    yield stored, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    write_checkpoint(path, tensors(), config, max_shard_bytes=2**30)


def run(args: argparse.Namespace) -> dict:
    cfg = synthetic_config(args.family, args.gb)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "synthetic"
        write_synthetic(path, cfg)
        on_disk = sum(f.stat().st_size for f in path.iterdir())
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(path)], check=True, capture_output=True, text=True
        )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(
        layers=cfg.num_layers,
        file_bytes=on_disk,
        ratio=row["peak_extra_bytes"] / row["param_bytes"],
    )
    print(json.dumps(row))
    print(
        f"\n{args.family}: parameters {row['param_bytes'] / 2**30:.2f} GiB "
        f"({cfg.num_layers} layers, bf16), "
        f"peak extra RSS while loading {row['peak_extra_bytes'] / 2**30:.2f} GiB: "
        f"{row['ratio']:.2f}x the parameters"
    )
    return row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gb", type=float, default=2.0, help="checkpoint size to synthesise")
    p.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "gpt_oss"])
    p.add_argument("--dir", default=None, help="where to write it (default: the temp folder)")
