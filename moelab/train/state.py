"""Training checkpoints: written atomically, restored exactly.

``<run>/checkpoints/step_000123/`` holds ``model/`` (hub layout, full fine-tune) or
``adapter/`` (PEFT layout, LoRA), and ``trainer_state.pt`` (step, optimizer, schedule, data
position, RNG states, fp32 masters of bf16 params, and in LoRA runs the trained tensors
themselves, so a resume does not depend on the export format). The folder appears complete
or not at all (written aside, then renamed); ``checkpoints/last`` names the newest one and is
replaced by rename too, so a crash at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from moelab.checkpoints import api
from moelab.checkpoints.safetensors_io import CheckpointError, replace_folder
from moelab.files import replace_text
from moelab.models import tree
from moelab.models.model import Model
from moelab.train import lora as lora_io
from moelab.train.config import LoraConfig

LAST = "last"
log = logging.getLogger("moelab")


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
    for stale in root.glob(".step_*"):  # left by a save killed half-way (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
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
    replace_text(root / LAST, target.name + "\n")
    return target


def find(path: str | os.PathLike) -> Path:
    """A checkpoint folder from itself, a ``checkpoints`` folder or a run folder: the one
    ``last`` names, else (``last`` missing, empty or naming no complete folder, as after a crash
    between the two renames of a save) the newest complete ``step_*`` folder."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / "trainer_state.pt").exists():
            return root
        name = (root / LAST).read_text().strip() if (root / LAST).is_file() else ""
        if name and (root / name / "trainer_state.pt").is_file():
            return root / name
        steps = sorted(p for p in root.glob("step_*") if (p / "trainer_state.pt").is_file())
        if steps:
            log.warning("moelab: %s names no complete checkpoint; resuming from %s", root / LAST,
                        steps[-1])  # fmt: skip
            return steps[-1]
    raise CheckpointError(f"no training checkpoint found at {path}")


def restore_params(ckpt: Path, model: Model, trainer_state: dict) -> None:
    """Overwrite the model's params with checkpoint ``ckpt``'s: every param from ``model/``
    (full fine-tune), or the trained ones, kept exactly in ``trainer_state`` (LoRA)."""
    params = {tree.dotted(path): t for path, t in tree.leaves(model.params)}
    if "trained" in trainer_state:
        pairs = list(trainer_state["trained"].items())
    else:
        saved = api.load_pretrained(ckpt / "model")
        pairs = [(tree.dotted(path), t) for path, t in tree.leaves(saved.params)]
        missing = sorted(set(params) - {name for name, _ in pairs})
        if missing:
            raise CheckpointError(f"{ckpt} has no {missing[0]} (and {len(missing) - 1} more)")
    for name, src in pairs:  # every tensor checked before any is written
        dst = params.get(name)
        if dst is None or dst.shape != src.shape:
            have = "no such tensor" if dst is None else f"shape {tuple(dst.shape)}"
            raise CheckpointError(
                f"{ckpt}: {name} {tuple(src.shape)} does not fit this run's model ({have}); "
                "resume with the config that wrote it"
            )
    with torch.no_grad():
        for name, src in pairs:
            params[name].copy_(src)


def load_trainer_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "trainer_state.pt", weights_only=True)
    except Exception as e:  # truncated or corrupt: name the file and the way out
        raise CheckpointError(
            f"{ckpt / 'trainer_state.pt'} cannot be read ({type(e).__name__}: {e}); resume from "
            f"an earlier step folder with trainer.resume_from=<run>/checkpoints/step_N"
        ) from e


def restore_rng(trainer_state: dict) -> None:
    _set_rng_state(trainer_state["rng"])
