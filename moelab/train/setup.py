"""Building what a run needs from its config: device, dtype, model, adapters, data."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.checkpoints import api
from moelab.kernels import registry
from moelab.kernels.problem import ExpertProblem
from moelab.models.model import Model
from moelab.ops.lora import expert_lora_from_params
from moelab.train import data as data_mod
from moelab.train.config import RunConfig
from moelab.train.lora import AdapterLayout, without_adapters

log = logging.getLogger("moelab")


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def build_model(cfg: RunConfig, dtype: torch.dtype, device: torch.device) -> Model:
    """Load ``model.path``, or initialise ``model.arch`` from the seed."""
    if cfg.model.path is not None:
        return api.load_pretrained(cfg.model.path, dtype=dtype, device=device)
    family, _ = api.FAMILIES[cfg.model.family]
    model_cfg = family.Config.from_hf({"model_type": cfg.model.family, **cfg.model.arch})
    gen = torch.Generator(device=device).manual_seed(cfg.trainer.seed)
    params = family.init_params(model_cfg, dtype=dtype, device=device, generator=gen)
    return Model(family, model_cfg, params)


def adapter_layout(model: Model) -> AdapterLayout:
    """The family's PEFT adapter naming (unquantised Transformers v5 layout)."""
    _, names = api.FAMILIES[model.config.model_type]
    targets = names.targets(model.config, model.params, names.ADAPTER_LAYOUT)
    return AdapterLayout(
        names={t.path: name for name, t in targets.items() if not t.index},
        interleaved_gate_up=any(
            t.interleaved_dim is not None and t.path[-1] == "gate_up" for t in targets.values()
        ),
    )


@dataclass
class Data:
    train: data_mod.BatchStream
    eval: list[data_mod.Batch]
    tokenizer: object
    train_tokens: int
    micro_batch_tokens: int  # whole rows of seq_len, as many as fit trainer.micro_batch_tokens


def build_data(cfg: RunConfig, model: Model) -> Data:
    d = cfg.data
    if d.tokenizer == "byte":
        tokenizer = data_mod.ByteTokenizer()
    else:
        tokenizer = data_mod.ModelTokenizer(cfg.model.path, model.config.hf.get("eos_token_id"))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}"
        )
    if d.source == "stdlib":
        docs = data_mod.stdlib_documents(d.max_bytes)
    else:
        docs = data_mod.file_documents(d.path, d.text_field)
    train_docs, eval_docs = data_mod.split_documents(docs, d.eval_fraction)
    train = data_mod.pack(train_docs, tokenizer, d.seq_len)
    held_out = data_mod.pack(eval_docs, tokenizer, d.seq_len)
    batch = cfg.trainer.micro_batch_tokens // d.seq_len
    return Data(
        train=data_mod.BatchStream(train, batch, cfg.trainer.seed),
        eval=data_mod.eval_batches(held_out, batch, cfg.trainer.eval_batches),
        tokenizer=tokenizer,
        train_tokens=train.rows * d.seq_len,
        micro_batch_tokens=batch * d.seq_len,
    )


def expert_backend(
    model: Model,
    backend: str,
    dtype: torch.dtype,
    device: torch.device,
    num_tokens: int,
    recompute: bool = False,
) -> str:
    """The expert backend this run's MoE layers will use on micro-batches of ``num_tokens``
    tokens, resolved as their block calls resolve it (activation, biases and token count
    included: ``auto``'s choice depends on rows per expert), for the log line; a request no
    backend can serve fails here, before training. The LoRA ranks are read from the adapters
    as the blocks read them (separate gate and up adapters make gate_up's rank twice down's)."""
    c = model.config
    experts = next(p["mlp"]["experts"] for p in model.params["layers"] if "experts" in p["mlp"])
    adapters = experts.get("lora")
    lora = expert_lora_from_params(adapters, 1.0) if adapters is not None else None
    problem = ExpertProblem(
        device=device,
        dtype=dtype,
        num_tokens=num_tokens,
        top_k=c.top_k,
        num_experts=c.num_experts,
        hidden=c.hidden_size,
        inter=c.moe_intermediate_size,
        lora_rank=lora.rank if lora is not None else 0,
        lora_rank_max=lora.rank_max if lora is not None else 0,
        has_bias=experts.get("gate_up_bias") is not None,
        activation=c.moe(model.options).activation,
        recompute=recompute,
    )
    return registry.resolve(None if backend == "auto" else backend, problem).NAME


def save_base_model(model: Model, run_dir: Path) -> str:
    """A from-scratch LoRA run saves its frozen base once (the model without its adapters), so
    its adapters can be reloaded."""
    path = Path(run_dir) / "base_model"
    if not path.exists():
        api.save_pretrained(dataclasses.replace(model, params=without_adapters(model.params)), path)
    return str(path)
