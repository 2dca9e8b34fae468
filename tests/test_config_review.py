"""Bad values a researcher can type stop at the boundary, before any work and before a run folder
is written: the training config (``validate``, the run folder, a sweep's every job) and the
benchmark command line (``python -m moelab.bench``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import SMOKE, TRAIN, run_config

from moelab.bench.__main__ import main as bench_main
from moelab.kernels import registry
from moelab.train import config as config_mod

ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = run_config([]).model.arch
FAST = [*SMOKE, "trainer.steps=2", "trainer.eval_interval=2", "data.max_bytes=200000"]


def train_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(TRAIN), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        config_mod.validate(run_config([*SMOKE, *overrides]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        # inf trained into NaN weights and the run hung; NaN failed deep inside AdamW
        (["optim.lr=inf"], "optim.lr=inf is not valid: expected > 0 and finite"),
        (["optim.lr=nan"], "optim.lr=nan is not valid"),
        (["optim.grad_clip=nan"], "optim.grad_clip=nan is not valid"),
        (["optim.eps=nan"], "optim.eps=nan is not valid"),
        (["optim.weight_decay=inf"], "optim.weight_decay=inf is not valid"),
        (["lora.rank=4", "lora.alpha=inf"], "lora.alpha=inf is not valid"),
        # a negative router-loss coefficient rewards imbalance
        (["trainer.aux_loss_coef=-1"], "trainer.aux_loss_coef=-1.0 is not valid"),
        (["trainer.z_loss_coef=nan"], "trainer.z_loss_coef=nan is not valid"),
        # LoRA values are checked without a rank too (a sweep over lora.rank=null,16 uses them)
        (["lora.dropout=5"], "lora.dropout=5.0 is not valid"),
        (["lora.alpha=-1"], "lora.alpha=-1.0 is not valid"),
        (["lora.targets=[expert]"], "lora.targets=['expert'] is not valid"),
        (["lora.rank=4", "lora.targets=[experts,experts]"], "lora.targets="),
        # devices torch knows that the trainer cannot use
        (["trainer.device=meta"], "trainer.device='meta' is not valid"),
        (["trainer.device=mps"], "trainer.device='mps' is not valid"),
        # the model's sizes, named as model.arch (they failed inside train())
        (["model.arch.num_experts=0"], "model.arch is not a qwen3_moe model: num_experts=0"),
        (["model.arch.num_experts_per_tok=9"], "model.arch is not a qwen3_moe model: top-k 9"),
        (["model.arch.num_attention_heads=3"], "model.arch is not a qwen3_moe model: 3 attention"),
        (["model.arch.vocab_size=100"], "data.tokenizer=byte has 256 tokens"),
        # a backend that cannot serve the request (a LoRA run wrote base_model/ first)
        (["backend=native_torch", "trainer.moe_recompute=true"], "recompute is triton's"),
        (["trainer.moe_recompute=true"], "which auto picks on CUDA only"),
        # LoRA rank 200 exceeds triton's 128 (or, on a GPU machine, CPU tensors need the
        # interpreter): either way refused before the model is built
        (["backend=triton", "lora.rank=200"], "backend.name='triton' cannot run on"),
    ],
)
def test_bad_values_are_refused_by_validate(overrides, message):
    refused(overrides, message)


def test_a_backend_this_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "machine_reason", lambda name: "needs a CUDA GPU")
    refused(["backend=triton"], "backend.name='triton' cannot run on trainer.device='cpu'")


def test_a_checkpoint_folder_is_read_before_any_work(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(["model=qwen3_moe", f"model.path={empty}"], "config.json does not exist")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", **TINY_ARCH}))
    refused(["model=gpt_oss", f"model.path={ckpt}"], "holds a 'qwen3_moe' checkpoint")
    refused(["model=qwen3_moe", f"model.path={ckpt}", "data.tokenizer=model"], "tokenizer.json")
    config_mod.validate(run_config([*SMOKE, "model=qwen3_moe", f"model.path={ckpt}"]))
    refused([f"trainer.resume_from={empty}"], "trainer.resume_from: no training checkpoint")


def test_a_warmup_longer_than_the_run_is_pointed_out():
    warn = config_mod.config_warnings
    assert warn(run_config(["trainer.steps=100", "optim.warmup_steps=20"])) == []
    (note,) = warn(run_config(["trainer.steps=10", "optim.warmup_steps=20"]))
    assert "optim.warmup_steps=20 >= trainer.steps=10" in note


def test_lora_dropout_on_expert_adapters_is_pointed_out():
    """Dropout shapes only the dense adapters' inputs; a run asking for it beside expert
    adapters is told so instead of silently training the experts without it."""
    warn = config_mod.config_warnings
    assert warn(run_config(["lora.rank=4", "lora.dropout=0.1", "lora.targets=[attention]"])) == []
    assert warn(run_config(["lora.rank=4", "lora.targets=[experts]"])) == []
    (note,) = warn(run_config(["lora.rank=4", "lora.dropout=0.1"]))
    assert "lora.dropout=0.1 drops the inputs of the dense adapters only (attention)" in note


def test_the_run_folder_is_checked(tmp_path):
    check = config_mod.check_run_dir
    fresh, resume = run_config(SMOKE), run_config([*SMOKE, "trainer.resume=true"])
    check(fresh, tmp_path)
    with pytest.raises(ValueError, match="trainer.resume=true: no training checkpoint"):
        check(resume, tmp_path)
    # a killed save's hidden leftovers are no run: the next save clears them
    (tmp_path / "checkpoints" / ".step_000002.tmp-abc").mkdir(parents=True)
    check(fresh, tmp_path)
    (tmp_path / "base_model").mkdir()  # a LoRA run's first write
    (tmp_path / "base_model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"already holds a run \(base_model\)"):
        check(fresh, tmp_path)


def test_a_new_run_does_not_write_over_a_finished_one(tmp_path):
    run = tmp_path / "run"
    assert train_cli([*FAST, f"hydra.run.dir={run}"], tmp_path).returncode == 0
    files = ["metrics.jsonl", "run_config.json", "summary.json", "overrides.json"]
    # and Hydra's record of the command (config, overrides), written before any check can run
    files += [str(p.relative_to(run)) for p in (run / ".hydra").rglob("*.yaml")]
    before = {name: (run / name).read_bytes() for name in files}
    out = train_cli([*FAST, "optim.lr=1e-3", f"hydra.run.dir={run}"], tmp_path)
    assert out.returncode != 0 and "already holds a run" in out.stderr
    assert "Traceback" not in out.stderr
    assert {name: (run / name).read_bytes() for name in files} == before
    refused = [p for p in (run / ".hydra").rglob("overrides.yaml") if "1e-3" in p.read_text()]
    assert len(refused) == 1  # the refused command's own record, beside the run's


def test_a_sweep_checks_every_job_before_the_first_trains(tmp_path):
    sweep = tmp_path / "sweep"
    out = train_cli(["-m", "lora.rank=4,0", *FAST, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert out.returncode != 0
    assert "sweep job #1 (lora.rank=0" in out.stderr and "lora.rank=0 is not valid" in out.stderr
    assert not list(sweep.glob("*/metrics.jsonl")) and not list(sweep.glob("*/base_model"))


TINY_TRAIN = ["train", "--model", "tiny-qwen3", "--layers", "1", "--seq", "16", "--warmup", "1",
              "--steps", "1", "--systems", "moelab"]  # fmt: skip
TINY_EXPERTS = ["experts", "--shape", "tiny", "--tokens", "16", "--iters", "1", "--mode", "full"]


@pytest.mark.parametrize("command", ["experts", "load", "train", "stages", "plot"])
def test_every_bench_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        bench_main([command, "--help"])
    assert done.value.code == 0 and f"python -m moelab.bench {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["experts", "--shape", "tiny", "--tokens", "-5"], "--tokens -5: expected"),
        (["experts", "--shape", "tiny", "--tokens", "16,x"], "--tokens 16,x: expected"),
        ([*TINY_EXPERTS, "--backends", "native_torch,fast"], "--backends: unknown fast"),
        ([*TINY_EXPERTS, "--mode", "lora", "--rank", "0"], "--rank 0: expected"),
        ([*TINY_EXPERTS, "--iters", "0"], "--iters 0: expected"),
        ([*TINY_EXPERTS, "--sustain", "-1"], "--sustain -1: expected"),
        ([*TINY_EXPERTS, "--cooldown", "-2"], "--cooldown -2.0: expected"),
        ([*TINY_EXPERTS, "--cooldown", "nan"], "--cooldown nan: expected"),
        ([*TINY_EXPERTS, "--device", "gpu"], "--device gpu"),
        ([*TINY_EXPERTS, "--backends", "compiled_grouped_mm", "--device", "cpu"], "bfloat16 only"),
        ([*TINY_TRAIN[:-1], "moelab,hf:fast"], "--systems: unknown hf:fast"),
        ([*TINY_TRAIN, "--rank", "0"], "--rank 0: expected"),
        ([*TINY_TRAIN, "--steps", "0"], "--steps 0: expected"),
        (["load", "--gb", "-1"], "--gb -1.0: expected"),
        (["plot", "/no/such/rows.json"], "no such file: /no/such/rows.json"),
    ],
)
def test_bad_bench_arguments_are_named_before_any_work(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        bench_main(argv)


@pytest.mark.parametrize(
    "argv",
    [[*TINY_EXPERTS, "--dtype", "float8"], [*TINY_TRAIN, "--backend", "fast"]],
    ids=["dtype", "backend"],
)
def test_bench_choices_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as done:
        bench_main(argv)
    assert done.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_bench_stages_needs_a_triton_that_runs_here(monkeypatch):
    monkeypatch.setattr(registry, "machine_reason", lambda name: "needs a CUDA GPU")
    argv = ["stages", "--shape", "tiny", "--tokens", "16", "--iters", "1"]
    with pytest.raises(ValueError, match="stages times the triton backend's kernels"):
        bench_main(argv)


def test_the_bench_command_line_shows_a_bad_argument_without_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "moelab.bench", "experts", "--shape", "tiny", "--tokens", "-5"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode != 0
    assert "error: --tokens -5: expected" in done.stderr and "Traceback" not in done.stderr
