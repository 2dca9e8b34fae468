"""Training checkpoints: written atomically, restored exactly.

``<run>/checkpoints/step_000123/`` holds ``model/`` (hub layout, full fine-tune) or
``adapter/`` (PEFT layout, LoRA), and ``trainer_state.pt`` (step, optimizer, schedule, data
position, RNG states, fp32 masters of bf16 params, and in LoRA runs the trained tensors
themselves, so a resume does not depend on the export format). The folder appears complete
or not at all (written aside, then renamed); ``checkpoints/last`` names the newest one and is
replaced by rename too, so a crash at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from moelab.checkpoints import api
from moelab.checkpoints.safetensors_io import CheckpointError, replace_folder
from moelab.models import tree
from moelab.models.model import Model
from moelab.train import lora as lora_io
from moelab.train.config import LoraConfig

LAST = "last"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    run_dir: Path,
    step: int,
    model: Model,
    lora: LoraConfig,
    layout: lora_io.AdapterLayout,
    trainer_state: dict,
    base_model: str | None,
) -> Path:
    """Write checkpoint ``step`` and point ``last`` at it; returns its folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        if lora.rank is None:
            api.save_pretrained(model, tmp / "model")
        else:
            lora_io.save_adapter(model.params, layout, lora, tmp / "adapter", base_model)
        torch.save({**trainer_state, "step": step, "rng": _rng_state()}, tmp / "trainer_state.pt")
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{LAST}.tmp"
    pointer.write_text(target.name + "\n")
    os.replace(pointer, root / LAST)
    return target


def find(path: str | os.PathLike) -> Path:
    """A checkpoint folder from itself, a ``checkpoints`` folder or a run folder."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / "trainer_state.pt").exists():
            return root
        if (root / LAST).exists():
            return root / (root / LAST).read_text().strip()
    raise CheckpointError(f"no training checkpoint found at {path}")


def restore_params(ckpt: Path, model: Model, trainer_state: dict) -> None:
    """Overwrite the model's params with checkpoint ``ckpt``'s: every param from ``model/``
    (full fine-tune), or the trained ones, kept exactly in ``trainer_state`` (LoRA)."""
    if "trained" in trainer_state:
        with torch.no_grad():
            for path, t in tree.leaves(model.params):
                saved = trainer_state["trained"].get(tree.dotted(path))
                if saved is not None:
                    t.copy_(saved)
        return
    saved = api.load_pretrained(ckpt / "model")
    with torch.no_grad():
        for (_, dst), (_, src) in zip(tree.leaves(model.params), tree.leaves(saved.params)):
            dst.copy_(src)


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)


def restore_rng(trainer_state: dict) -> None:
    _set_rng_state(trainer_state["rng"])
