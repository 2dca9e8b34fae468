"""What a resume keeps and refuses: saved results and metrics are never lost or doubled, a broken
``last`` pointer or checkpoint gives a way out, and a checkpoint that does not fit the run's
model is refused before anything is overwritten."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from test_training import SMOKE, run_config

from moelab.checkpoints import safetensors_io
from moelab.checkpoints.safetensors_io import CheckpointError, replace_folder
from moelab.train import state
from moelab.train.config import validate
from moelab.train.trainer import train as run_training


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.eval_interval=0", "trainer.eval_interval=0 is not valid"),
        ("trainer.checkpoint_interval=-2", "trainer.checkpoint_interval=-2 is not valid"),
        ("trainer.resume_from=/no/such/run", "is not a folder"),
        ("optim.grad_clip=0", "optim.grad_clip=0.0 is not valid"),
        ("optim.min_lr_ratio=-1", "optim.min_lr_ratio=-1.0 is not valid"),
        ("optim.warmup_steps=-5", "optim.warmup_steps=-5 is not valid"),
        ("optim.weight_decay=-1", "optim.weight_decay=-1.0 is not valid"),
        ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0] is not valid"),
        ("optim.eps=0", "optim.eps=0.0 is not valid"),
        ("data.max_bytes=0", "data.max_bytes=0 is not valid"),
    ],
)
def test_bad_trainer_and_optimizer_values_are_refused(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(run_config([*SMOKE, override]))


def test_resuming_a_finished_run_changes_none_of_its_files(tmp_path):
    summary = run_training(run_config(SMOKE), tmp_path)
    files = ("summary.json", "metrics.jsonl", "run_config.json")
    before = {name: (tmp_path / name).read_text() for name in files}
    again = run_training(run_config([*SMOKE, "trainer.resume=true"]), tmp_path)
    assert again == json.loads(before["summary.json"])
    assert again["final_loss"] == summary["final_loss"]
    assert {name: (tmp_path / name).read_text() for name in files} == before


def test_records_logged_after_the_checkpoint_are_not_doubled(tmp_path, monkeypatch):
    reference = run_training(run_config(SMOKE), tmp_path / "ref")
    run = tmp_path / "run"
    original = state.save

    def dying_save(run_dir, step, *args, **kwargs):
        if step == 6:  # step 6 logged and evaluated, the last checkpoint at 3
            raise KeyboardInterrupt
        return original(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(state, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_training(run_config(SMOKE), run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a record cut short by the interruption
    monkeypatch.setattr(state, "save", original)
    again = run_training(run_config([*SMOKE, "trainer.resume=true"]), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    eval_steps = [r["step"] for r in records if "eval_loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6] and eval_steps == [0, 3, 6]
    assert again["final_loss"] == reference["final_loss"]
    assert (run / "run_config.json").exists() and (run / "run_config.resume_000003.json").exists()


def _three_checkpoints(run: Path) -> Path:
    run_training(run_config([*SMOKE, "trainer.checkpoint_interval=2"]), run)
    return run / "checkpoints"


def test_a_broken_last_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    root = _three_checkpoints(tmp_path)
    assert state.find(tmp_path) == root / "step_000006"
    (root / "last").write_text("step_000099\n")  # names a folder that never appeared
    assert state.find(tmp_path) == root / "step_000006"
    (root / "last").write_text("")
    assert state.find(tmp_path) == root / "step_000006"
    (root / "last").unlink()
    (root / "step_000006" / "trainer_state.pt").unlink()  # an incomplete folder
    assert state.find(tmp_path) == root / "step_000004"


def test_a_corrupt_trainer_state_names_the_file_and_the_way_out(tmp_path):
    root = _three_checkpoints(tmp_path)
    path = root / "step_000006" / "trainer_state.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trainer.resume_from=.*step_N"):
        state.load_trainer_state(root / "step_000006")


def test_a_failed_final_rename_puts_the_previous_folder_back(tmp_path, monkeypatch):
    target, new = tmp_path / "step_000004", tmp_path / ".step_000004.tmp-x"
    target.mkdir()
    (target / "trainer_state.pt").write_text("previous")
    new.mkdir()
    (new / "trainer_state.pt").write_text("new")
    real = os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(safetensors_io.os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        replace_folder(new, target)
    assert (target / "trainer_state.pt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_000004.tmp-x", "step_000004"]


def test_a_checkpoint_of_another_lora_rank_is_refused_before_anything_is_written(tmp_path):
    run_training(run_config([*SMOKE, "lora.rank=4"]), tmp_path / "r4")
    ckpt = tmp_path / "r4" / "checkpoints" / "step_000003"
    config = run_config([*SMOKE, "lora.rank=8", f"trainer.resume_from={ckpt}"])
    with pytest.raises(CheckpointError, match="does not fit this run's model"):
        run_training(config, tmp_path / "r8")
    assert not (tmp_path / "r8" / "metrics.jsonl").exists()


def test_a_save_clears_what_a_save_killed_half_way_left(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    for name in (".step_000002.tmp-abc", ".step_000002.old-def"):
        (root / name / "model").mkdir(parents=True)
    run_training(run_config(SMOKE), tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["last", "step_000003", "step_000006"]


def test_a_resume_with_no_checkpoint_writes_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        run_training(run_config([*SMOKE, "lora.rank=4", "trainer.resume=true"]), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sizes_the_backend_cannot_serve_leave_the_folder_empty(tmp_path):
    """The expert backend is judged against the model's own sizes (and its adapters) before a
    LoRA run from scratch writes its base model: the run used to write ``base_model`` first, so
    the folder then counted as holding a run and refused the corrected command."""
    bad = [*SMOKE, "lora.rank=4", "backend.name=grouped_mm", "model.arch.moe_intermediate_size=6"]
    with pytest.raises(ValueError, match="grouped_mm needs 16-byte strides: I=6"):
        run_training(run_config(bad), tmp_path)
    assert list(tmp_path.iterdir()) == []
    run_training(run_config([*SMOKE, "lora.rank=4", "backend.name=grouped_mm"]), tmp_path)
    assert (tmp_path / "base_model" / "config.json").exists()


def test_train_called_from_python_does_not_write_over_a_finished_run(tmp_path):
    """The command line checked the run folder; ``train()`` itself did not, so a second run
    from Python replaced the first one's metrics, summary and checkpoints."""
    run_training(run_config(SMOKE), tmp_path)
    files = ("metrics.jsonl", "run_config.json", "summary.json")
    before = {name: (tmp_path / name).read_bytes() for name in files}
    with pytest.raises(ValueError, match="already holds a run"):
        run_training(run_config([*SMOKE, "optim.lr=1e-3"]), tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in files} == before
