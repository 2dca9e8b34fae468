"""The configuration of a training run, as plain dataclasses.

``experiments/train.py`` registers these as Hydra structured configs (so a mistyped override is
an error); nothing here imports Hydra. :func:`validate` checks values before any work starts,
:func:`check_run_dir` that a run neither writes over another nor resumes from nothing.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelab.files import replace_text

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "native_torch", "grouped_mm", "triton")
LORA_TARGETS = ("experts", "attention", "mlp", "shared", "router")
PRECISIONS = ("auto", "fp32", "bf16")
LOGGER_MODES = ("offline", "online", "disabled")
DATA_SOURCES = ("stdlib", "files")
# what a run writes into its folder (Hydra's .hydra/ and log file are not the run's own)
RUN_FILES = ("run_config.json", "metrics.jsonl", "summary.json", "checkpoints", "base_model")


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
    """Raise ValueError naming the first bad value; cheap checks only (no data, no tensors: at
    most a checkpoint's ``config.json`` is read)."""
    model_cfg = _check_model(cfg)
    _check_lora(cfg.lora)
    _check_data(cfg, model_cfg.vocab_size)
    device = _check_trainer(cfg)
    _check_backend(cfg, device)
    _check_optim(cfg.optim)
    if cfg.logger.mode not in LOGGER_MODES:
        raise _bad("logger.mode", cfg.logger.mode, f"one of {LOGGER_MODES}")
    if cfg.logger.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"logger.mode={cfg.logger.mode!r} logs to wandb, which is not installed here: "
            "install it (pip install wandb) or run with logger=disabled"
        )


def config_warnings(cfg: RunConfig) -> list[str]:
    """Values that are valid but rarely meant: the run goes on, and the entry point says so."""
    notes = []
    if cfg.optim.warmup_steps >= cfg.trainer.steps:
        notes.append(
            f"optim.warmup_steps={cfg.optim.warmup_steps} >= trainer.steps={cfg.trainer.steps}: "
            f"the learning rate never reaches optim.lr={cfg.optim.lr:g} nor decays"
        )
    lora = cfg.lora
    if lora.rank is not None and lora.dropout > 0 and "experts" in lora.targets:
        dense = [t for t in lora.targets if t != "experts"]
        notes.append(
            f"lora.dropout={lora.dropout:g} drops the inputs of the dense adapters only "
            f"({', '.join(dense) or 'none here'}): the expert adapters take no dropout (PEFT "
            "has none on adapted parameters either)"
        )
    return notes


def resumes(cfg: RunConfig) -> bool:
    """Whether the run goes on from a checkpoint (``trainer.resume`` or ``trainer.resume_from``)."""
    return cfg.trainer.resume or cfg.trainer.resume_from is not None


def check_run_dir(cfg: RunConfig, run_dir: str | os.PathLike) -> None:
    """Raise ValueError if the run would write over another run's files (a new run into a folder
    that holds one) or ``trainer.resume=true`` finds no checkpoint in ``run_dir``."""
    run_dir = Path(run_dir)
    t = cfg.trainer
    if t.resume_from is not None:  # validate found its checkpoint; a run may go on in its folder
        return
    if t.resume:
        _find_checkpoint(run_dir, "trainer.resume=true", "a new run: leave trainer.resume off")
        return
    kept = [name for name in RUN_FILES if _holds_output(run_dir / name)]
    if kept:
        raise ValueError(
            f"{run_dir} already holds a run ({', '.join(kept)}): go on with it with "
            "trainer.resume=true, or give this run its own folder (hydra.run.dir=...)"
        )


def _holds_output(path: Path) -> bool:
    """A run's file, or a folder with something in it besides the hidden leftovers of a save
    that was killed half-way (which the next save clears)."""
    if not path.is_dir():
        return path.exists()
    return any(not entry.name.startswith(".") for entry in path.iterdir())


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{key}={value!r} is not valid: expected {expected}")


def _check_model(cfg: RunConfig) -> Any:
    """The family ``Config`` the run will build, parsed from ``model.arch`` or from
    ``model.path``'s config.json: a size or key that cannot make a model fails here, named."""
    from moelab.checkpoints.api import FAMILIES, read_config

    m = cfg.model
    if m.family not in FAMILIES:
        raise _bad("model.family", m.family, f"one of {sorted(FAMILIES)}")
    family, _ = FAMILIES[m.family]
    if m.path is None and not m.arch:
        raise ValueError("model needs a checkpoint path (model.path=...) or an arch to init")
    if m.path is None:
        try:
            return family.Config.from_hf({**m.arch, "model_type": m.family})
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"model.arch is not a {m.family} model: {e}") from None
    if not os.path.isdir(m.path):
        raise ValueError(f"model.path={m.path!r} is not a folder")
    try:
        model_cfg = read_config(m.path)
    except ValueError as e:  # CheckpointError: a missing, corrupt or unsupported config.json
        raise ValueError(f"model.path={m.path!r}: {e}") from None
    if FAMILIES[model_cfg.model_type][0] is not family:
        raise ValueError(
            f"model.family={m.family!r}, and model.path={m.path!r} holds a "
            f"{model_cfg.model_type!r} checkpoint: use the model group of its family"
        )
    return model_cfg


def _check_lora(lora: LoraConfig) -> None:
    # checked with or without a rank: a sweep over lora.rank=null,16 runs with them
    if lora.rank is not None and lora.rank < 1:
        raise _bad("lora.rank", lora.rank, ">= 1 (lora=none trains without LoRA)")
    unknown = [t for t in lora.targets if t not in LORA_TARGETS]
    if unknown or not lora.targets or len(set(lora.targets)) < len(lora.targets):
        raise _bad("lora.targets", list(lora.targets), f"a non-empty subset of {LORA_TARGETS}")
    if not (math.isfinite(lora.alpha) and lora.alpha > 0):
        raise _bad("lora.alpha", lora.alpha, "> 0 and finite (the adapters' scale is alpha / rank)")
    if lora.gate_up not in ("fused", "separate"):
        raise _bad("lora.gate_up", lora.gate_up, "'fused' or 'separate'")
    if not 0.0 <= lora.dropout < 1.0:
        raise _bad("lora.dropout", lora.dropout, "in [0, 1)")


def _check_data(cfg: RunConfig, vocab_size: int) -> None:
    d, path = cfg.data, cfg.model.path
    if d.source not in DATA_SOURCES:
        raise _bad("data.source", d.source, f"one of {DATA_SOURCES}")
    if d.source == "files":
        if not d.path:
            raise ValueError("data.source=files needs data.path (a file, folder or .jsonl)")
        if not os.path.exists(d.path):
            raise ValueError(f"data.path={d.path!r} does not exist")
        if not d.text_field:
            raise _bad("data.text_field", d.text_field, "the name of a .jsonl's text field")
    if d.tokenizer not in ("byte", "model"):
        raise _bad("data.tokenizer", d.tokenizer, "'byte' or 'model'")
    if d.tokenizer == "model" and path is None:
        raise ValueError("data.tokenizer=model needs model.path (its tokenizer.json)")
    if d.tokenizer == "model" and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ValueError(
            f"data.tokenizer=model reads model.path's tokenizer.json, and {path!r} has none: "
            "add it, or use data.tokenizer=byte"
        )
    if d.tokenizer == "byte" and vocab_size < 256:
        raise ValueError(
            f"data.tokenizer=byte has 256 tokens, and the model's vocab_size is {vocab_size}"
        )
    if d.max_bytes < 1:
        raise _bad("data.max_bytes", d.max_bytes, ">= 1")
    if d.seq_len < 2:
        raise _bad("data.seq_len", d.seq_len, ">= 2")
    if not 0.0 < d.eval_fraction < 1.0:
        raise _bad("data.eval_fraction", d.eval_fraction, "in (0, 1)")


def _check_trainer(cfg: RunConfig) -> torch.device:
    """The trainer's values; returns the device the run will use."""
    t = cfg.trainer
    if t.precision not in PRECISIONS:
        raise _bad("trainer.precision", t.precision, f"one of {PRECISIONS}")
    for key in ("steps", "grad_accum", "eval_batches", "log_interval", "eval_interval"):
        if getattr(t, key) < 1:
            raise _bad(f"trainer.{key}", getattr(t, key), ">= 1")
    if t.checkpoint_interval < 0:
        raise _bad("trainer.checkpoint_interval", t.checkpoint_interval, ">= 0 (0: at the end)")
    for key in ("aux_loss_coef", "z_loss_coef"):
        if not (math.isfinite(getattr(t, key)) and getattr(t, key) >= 0):
            raise _bad(f"trainer.{key}", getattr(t, key), ">= 0 and finite")
    if t.resume_from is not None:
        if not os.path.isdir(t.resume_from):
            raise ValueError(f"trainer.resume_from={t.resume_from!r} is not a folder")
        hint = "a run, its checkpoints folder or one step_* folder in it"
        _find_checkpoint(t.resume_from, "trainer.resume_from", hint)
    if t.micro_batch_tokens < cfg.data.seq_len:
        seq_len = cfg.data.seq_len
        raise _bad(
            "trainer.micro_batch_tokens", t.micro_batch_tokens, f">= data.seq_len ({seq_len})"
        )
    try:
        device = resolve_device(t.device)
    except RuntimeError as e:  # torch's own words for what a device string may be
        raise _bad("trainer.device", t.device, f'"auto" or a torch device ({e})') from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not _cuda_present(device)):
        raise _bad("trainer.device", t.device, '"auto", "cpu" or a CUDA device this machine has')
    if t.cuda_graph and device.type != "cuda":
        raise ValueError(
            f"trainer.cuda_graph=true replays each step from a CUDA graph: it needs a CUDA device, "
            f"and trainer.device={t.device!r} is not one here"
        )
    return device


def _check_backend(cfg: RunConfig, device: torch.device) -> None:
    """The expert backend can serve this device, precision, recompute and LoRA rank (its limits
    on the model's sizes are judged when the model is built)."""
    import torch

    from moelab.kernels import registry
    from moelab.kernels.problem import ExpertProblem

    name, recompute, where = cfg.backend.name, cfg.trainer.moe_recompute, cfg.trainer.device
    if name not in BACKENDS:
        raise _bad("backend.name", name, f"one of {BACKENDS}")
    if recompute and name not in ("auto", "triton"):
        raise ValueError(
            f"trainer.moe_recompute=true with backend.name={name!r}: recompute is triton's "
            "(backend=triton, on CUDA)"
        )
    if recompute and name == "auto" and device.type != "cuda":
        raise ValueError(
            "trainer.moe_recompute=true recomputes in the triton backend, which auto picks on "
            f"CUDA only, and trainer.device={where!r} is not CUDA here"
        )
    if name == "auto":
        return
    lora, precision = cfg.lora, cfg.trainer.precision
    rank = lora.rank if lora.rank is not None and "experts" in lora.targets else 0
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    # sizes every backend takes (rows of 256 bytes), so that only the request is judged
    probe = ExpertProblem(
        device=device,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        num_tokens=256,
        top_k=2,
        num_experts=8,
        hidden=128,
        inter=128,
        lora_rank=rank,
        lora_rank_max=2 * rank if lora.gate_up == "separate" else rank,
        has_bias=False,
        activation="swiglu",
        recompute=recompute,
    )
    reason = registry.unsupported_reason(name, probe)
    if reason is not None:
        raise ValueError(f"backend.name={name!r} cannot run on trainer.device={where!r}: {reason}")


def _check_optim(o: OptimConfig) -> None:
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise _bad("optim.lr", o.lr, "> 0 and finite")
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise _bad("optim.weight_decay", o.weight_decay, ">= 0 and finite")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise _bad("optim.betas", list(o.betas), "two values in [0, 1)")
    if not (math.isfinite(o.eps) and o.eps > 0):
        raise _bad("optim.eps", o.eps, "> 0 and finite")
    if o.warmup_steps < 0:
        raise _bad("optim.warmup_steps", o.warmup_steps, ">= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise _bad("optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
    if not o.grad_clip > 0:  # NaN fails this too
        raise _bad("optim.grad_clip", o.grad_clip, "> 0 (the max gradient norm; inf: no clipping)")


def _find_checkpoint(path: str | os.PathLike, key: str, hint: str) -> None:
    from moelab.train import state

    try:
        state.find(path)
    except ValueError as e:  # CheckpointError
        raise ValueError(f"{key}: {e} ({hint})") from None


def recorded_config_name(resume_step: int | None) -> str:
    """The file a run records its config in: ``run_config.json`` at the start, and beside it one
    per resume (the first config is kept)."""
    if resume_step is None:
        return "run_config.json"
    return f"run_config.resume_{resume_step:06d}.json"


# names the config recorded last: its content survives a copy of the folder, which file times
# do not, and a resume from an earlier checkpoint writes a lower step's name after a higher one's
LATEST_RECORD = "run_config.latest"
_RECORD_NAME = re.compile(r"run_config(\.resume_\d{6})?\.json")


def mark_latest_recorded(run_dir: str | os.PathLike, name: str) -> None:
    """Record that ``name`` (a :func:`recorded_config_name`) is the config the run now runs
    with; replaced whole, so a reader never sees a part."""
    replace_text(Path(run_dir) / LATEST_RECORD, name + "\n")


def latest_recorded_config(run_dir: str | os.PathLike) -> Path:
    """The config a run last ran with: the one ``run_config.latest`` names; in a folder from
    before that file (or where it names no recorded config), the newest resume's by step, else
    the first (``run_config.json``'s name where there is none yet)."""
    run_dir = Path(run_dir)
    try:
        named = (run_dir / LATEST_RECORD).read_text().strip()
    except (OSError, UnicodeDecodeError):
        named = ""
    if _RECORD_NAME.fullmatch(named) and (run_dir / named).is_file():
        return run_dir / named
    resumes = sorted(run_dir.glob("run_config.resume_*.json"))  # zero-padded: name order
    return resumes[-1] if resumes else run_dir / recorded_config_name(None)


def _cuda_present(device: torch.device) -> bool:
    import torch

    return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()


def resolve_device(name: str) -> torch.device:
    """``trainer.device`` as a torch device: "auto" is CUDA where there is one, else the CPU."""
    import torch  # here, not at the top: reading a config does not load torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
