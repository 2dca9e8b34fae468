"""The configuration of a training run, as plain dataclasses.

``experiments/train.py`` registers these as Hydra structured configs (so a mistyped override is
an error); nothing here imports Hydra. :func:`validate` checks values before any work starts.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "native_torch", "grouped_mm", "triton")
LORA_TARGETS = ("experts", "attention", "mlp", "shared", "router")
PRECISIONS = ("auto", "fp32", "bf16")
LOGGER_MODES = ("offline", "online", "disabled")
DATA_SOURCES = ("stdlib", "files")


@dataclass
class ModelConfig:
    """``family`` with either a checkpoint ``path`` or an ``arch`` (config.json keys) to init."""

    family: str = "qwen3_moe"
    name: str = "tiny"
    path: str | None = None
    arch: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackendConfig:
    name: str = "auto"


@dataclass
class LoraConfig:
    """``rank: null`` trains every parameter; a rank trains adapters on ``targets`` only.

    ``router`` among the targets trains the router weight itself (it is small); ``gate_up``
    chooses one adapter over the fused gate/up projection of the experts (``fused``, the
    Transformers v5 convention) or one each for gate and up (``separate``).
    """

    rank: int | None = None
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["experts", "attention"])
    gate_up: str = "fused"


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class DataConfig:
    """``stdlib``: this interpreter's standard-library sources, byte tokens (always present).
    ``files``: a text file, a folder of ``.txt``/``.md``/``.py`` files or a JSONL file."""

    source: str = "stdlib"
    path: str | None = None
    text_field: str = "text"
    tokenizer: str = "byte"  # "byte", or "model" for the checkpoint's tokenizer.json
    seq_len: int = 256
    eval_fraction: float = 0.05
    max_bytes: int = 16_000_000


@dataclass
class TrainerConfig:
    steps: int = 800
    micro_batch_tokens: int = 4096
    grad_accum: int = 1
    precision: str = "auto"  # bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    moe_recompute: bool = False  # expert pre-activation recomputed in backward (triton backend)
    seed: int = 0
    device: str = "auto"
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 0  # 0: only at the end
    log_interval: int = 10
    aux_loss_coef: float = 1e-3
    z_loss_coef: float = 0.0
    resume: bool = False  # from this run folder's last checkpoint
    resume_from: str | None = None  # a run, checkpoints or step folder (implies resume)
    # replay each step from a CUDA graph captured at the first (fixed shapes; no host launching)
    cuda_graph: bool = False


@dataclass
class LoggerConfig:
    mode: str = "offline"
    project: str = "moelab"
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def validate(cfg: RunConfig) -> None:
    """Raise ValueError naming the first bad value; cheap checks only (no data, no model)."""
    from moelab.checkpoints.api import FAMILIES

    def bad(key: str, value: Any, expected: str) -> ValueError:
        return ValueError(f"{key}={value!r} is not valid: expected {expected}")

    if cfg.model.family not in FAMILIES:
        raise bad("model.family", cfg.model.family, f"one of {sorted(FAMILIES)}")
    if cfg.model.path is None and not cfg.model.arch:
        raise ValueError("model needs a checkpoint path (model.path=...) or an arch to init")
    if cfg.model.path is not None and not os.path.isdir(cfg.model.path):
        raise ValueError(f"model.path={cfg.model.path!r} is not a folder")
    if cfg.backend.name not in BACKENDS:
        raise bad("backend.name", cfg.backend.name, f"one of {BACKENDS}")
    lora = cfg.lora
    if lora.rank is not None:
        if lora.rank < 1:
            raise bad("lora.rank", lora.rank, ">= 1 (lora=none trains without LoRA)")
        unknown = [t for t in lora.targets if t not in LORA_TARGETS]
        if unknown or not lora.targets:
            raise bad("lora.targets", list(lora.targets), f"a non-empty subset of {LORA_TARGETS}")
        if not lora.alpha > 0:
            raise bad("lora.alpha", lora.alpha, "> 0 (the adapters' scale is alpha / rank)")
        if lora.gate_up not in ("fused", "separate"):
            raise bad("lora.gate_up", lora.gate_up, "'fused' or 'separate'")
        if not 0.0 <= lora.dropout < 1.0:
            raise bad("lora.dropout", lora.dropout, "in [0, 1)")
    if cfg.data.source not in DATA_SOURCES:
        raise bad("data.source", cfg.data.source, f"one of {DATA_SOURCES}")
    if cfg.data.source == "files":
        if not cfg.data.path:
            raise ValueError("data.source=files needs data.path (a file, folder or .jsonl)")
        if not os.path.exists(cfg.data.path):
            raise ValueError(f"data.path={cfg.data.path!r} does not exist")
    if cfg.data.tokenizer not in ("byte", "model"):
        raise bad("data.tokenizer", cfg.data.tokenizer, "'byte' or 'model'")
    if cfg.data.tokenizer == "model" and cfg.model.path is None:
        raise ValueError("data.tokenizer=model needs model.path (its tokenizer.json)")
    if cfg.data.max_bytes < 1:
        raise bad("data.max_bytes", cfg.data.max_bytes, ">= 1")
    if cfg.data.seq_len < 2:
        raise bad("data.seq_len", cfg.data.seq_len, ">= 2")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise bad("data.eval_fraction", cfg.data.eval_fraction, "in (0, 1)")
    t = cfg.trainer
    if t.precision not in PRECISIONS:
        raise bad("trainer.precision", t.precision, f"one of {PRECISIONS}")
    for key in ("steps", "grad_accum", "eval_batches", "log_interval", "eval_interval"):
        if getattr(t, key) < 1:
            raise bad(f"trainer.{key}", getattr(t, key), ">= 1")
    if t.checkpoint_interval < 0:
        raise bad("trainer.checkpoint_interval", t.checkpoint_interval, ">= 0 (0: only at the end)")
    if t.resume_from is not None and not os.path.isdir(t.resume_from):
        raise ValueError(f"trainer.resume_from={t.resume_from!r} is not a folder")
    if t.micro_batch_tokens < cfg.data.seq_len:
        raise bad(
            "trainer.micro_batch_tokens",
            t.micro_batch_tokens,
            f">= data.seq_len ({cfg.data.seq_len})",
        )
    try:
        device = resolve_device(t.device)
    except RuntimeError as e:  # torch's own words for what a device string may be
        raise bad("trainer.device", t.device, f'"auto" or a torch device ({e})') from None
    if device.type == "cuda" and not _cuda_present(device):
        raise bad("trainer.device", t.device, '"auto", "cpu" or a CUDA device this machine has')
    if t.cuda_graph and device.type != "cuda":
        raise ValueError(
            f"trainer.cuda_graph=true replays each step from a CUDA graph: it needs a CUDA device, "
            f"and trainer.device={t.device!r} is not one here"
        )
    o = cfg.optim
    if o.lr <= 0:
        raise bad("optim.lr", o.lr, "> 0")
    if o.weight_decay < 0:
        raise bad("optim.weight_decay", o.weight_decay, ">= 0")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise bad("optim.betas", list(o.betas), "two values in [0, 1)")
    if o.eps <= 0:
        raise bad("optim.eps", o.eps, "> 0")
    if o.warmup_steps < 0:
        raise bad("optim.warmup_steps", o.warmup_steps, ">= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise bad("optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
    if o.grad_clip <= 0:
        raise bad("optim.grad_clip", o.grad_clip, "> 0 (the max gradient norm; inf: no clipping)")
    if cfg.logger.mode not in LOGGER_MODES:
        raise bad("logger.mode", cfg.logger.mode, f"one of {LOGGER_MODES}")
    if cfg.logger.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"logger.mode={cfg.logger.mode!r} logs to wandb, which is not installed here: "
            "install it (pip install wandb) or run with logger=disabled"
        )


def recorded_config_name(resume_step: int | None) -> str:
    """The file a run records its config in: ``run_config.json`` at the start, and beside it one
    per resume (the first config is kept)."""
    if resume_step is None:
        return "run_config.json"
    return f"run_config.resume_{resume_step:06d}.json"


def latest_recorded_config(run_dir: str | os.PathLike) -> Path:
    """The config a run last ran with: its newest resume's, else its first."""
    resumes = sorted(Path(run_dir).glob("run_config.resume_*.json"))  # zero-padded: name order
    return resumes[-1] if resumes else Path(run_dir) / recorded_config_name(None)


def _cuda_present(device: torch.device) -> bool:
    import torch

    return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()


def resolve_device(name: str) -> torch.device:
    """``trainer.device`` as a torch device: "auto" is CUDA where there is one, else the CPU."""
    import torch  # here, not at the top: reading a config does not load torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
