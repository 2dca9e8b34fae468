"""The experts benchmark runs end to end on CPU and its FLOP convention is the documented one."""

from __future__ import annotations

import json

import pytest

from moelab.bench.__main__ import main
from moelab.bench.shapes import SHAPES, moe_flops


def test_flop_convention_matches_performance_md():
    qwen, oss = SHAPES["qwen3-30b-a3b"], SHAPES["gpt-oss-20b"]
    # performance.md's floors table: 1.28 T, 1.86 T, 3.31 T, 4.89 T
    assert round(moe_flops(qwen, 8192, "lora", 16) / 1e12, 2) == 1.28
    assert round(moe_flops(qwen, 8192, "full", 0) / 1e12, 2) == 1.86
    assert round(moe_flops(oss, 8192, "lora", 16) / 1e12, 2) == 3.31
    assert round(moe_flops(oss, 8192, "full", 0) / 1e12, 2) == 4.89


def test_experts_benchmark_runs_and_checks(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(
        [
            "experts",
            "--shape",
            "tiny",
            "--tokens",
            "16,32",
            "--iters",
            "1",
            "--check",
            "--check-tokens",
            "24",
            "--backends",
            "native_torch,grouped_mm",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())
    checks = [r for r in rows if "check" in r]
    assert {r["check"] for r in checks} == {"native_torch", "grouped_mm"}
    assert all(r["max_rel_err"] < 1e-5 and r["empty_expert_zero_grad"] for r in checks)
    timed = [r for r in rows if "ms" in r]
    assert len(timed) == 2 * 2 * 2  # tokens x modes x backends
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in timed)
    table = capsys.readouterr().out
    assert "backend" in table and "grouped_mm" in table and "TFLOP/s" in table


def test_train_step_benchmark_runs_moelab_and_transformers(capsys):
    pytest.importorskip("peft")
    from moelab.bench import train_step

    code = main(
        [
            "train",
            "--model",
            "tiny-qwen3",
            "--layers",
            "2",
            "--seq",
            "64",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--systems",
            "moelab,hf:grouped_mm",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "moelab" in table and "hf:grouped_mm" in table
    assert train_step.hf_config("qwen3-30b-a3b", 4)["num_hidden_layers"] == 4
