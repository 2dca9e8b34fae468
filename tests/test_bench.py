"""The experts benchmark runs end to end on CPU and its FLOP convention is the documented one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TEST_DEVICE, rel_err

from moelab.bench import compiled
from moelab.bench.__main__ import UsageError, main
from moelab.bench.experts import block_config, build_block
from moelab.bench.shapes import SHAPES, BlockShape, moe_flops
from moelab.ops import moe_block, route


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
            "--device",
            "cpu",  # an fp32 check on any machine (a GPU would mean bf16)
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
    png = tmp_path / "sweep.png"
    assert main(["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(out), "--out", str(png), "--mode", "lora"]) == 0


def test_experts_benchmark_with_recompute(tmp_path):
    """``--recompute``: triton is checked and timed with h recomputed (fewer saved bytes per
    token), grouped_mm, which keeps h, is skipped with the reason."""
    out = tmp_path / "rows.json"
    args = ["experts", "--shape", "tiny", "--tokens", "32", "--mode", "lora", "--iters", "1",
            "--check", "--check-tokens", "24", "--backends", "grouped_mm,triton",
            "--device", str(TEST_DEVICE), "--dtype", "float32", "--recompute",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(out.read_text())
    checks = [r for r in rows if "check" in r]
    assert [r["check"] for r in checks] == ["triton", "triton"]  # lora and full
    assert all(r["max_rel_err"] < 1e-5 and r["empty_expert_zero_grad"] for r in checks)
    by_backend = {r["backend"]: r for r in rows if "backend" in r}
    assert "recompute is triton's" in by_backend["grouped_mm"]["skipped"]
    assert by_backend["triton"]["recompute"] and by_backend["triton"]["ms"] > 0
    kept = main(args[:-3] + ["--json", str(tmp_path / "kept.json")])
    assert kept == 0
    kept_rows = json.loads((tmp_path / "kept.json").read_text())
    kept_triton = [r for r in kept_rows if r.get("backend") == "triton"][0]
    assert by_backend["triton"]["saved_bytes_per_token"] < kept_triton["saved_bytes_per_token"]


@pytest.mark.parametrize("model", ["tiny-qwen3", "tiny-gpt-oss"])
def test_train_step_benchmark_runs_moelab_and_transformers(capsys, tmp_path, model):
    pytest.importorskip("peft")
    from moelab.bench import train_step

    code = main(
        [
            "train",
            "--breakdown",
            "--model",
            model,
            "--layers",
            "2",
            "--seq",
            "48,64",
            "--json",
            str(tmp_path / "train.json"),
            "--warmup",
            "1",
            "--steps",
            "1",
            "--systems",
            "moelab,moelab:no-ckpt,hf:grouped_mm",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "moelab" in table and "hf:grouped_mm" in table
    assert "LM head + loss" in table and "attention kernels" in table
    rows = json.loads((tmp_path / "train.json").read_text())
    assert [(r["system"], r["seq"]) for r in rows] == [
        ("moelab", 48), ("moelab", 64), ("moelab:no-ckpt", 48), ("moelab:no-ckpt", 64),
        ("hf:grouped_mm", 48), ("hf:grouped_mm", 64),
    ]  # fmt: skip
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert "SM MHz" in table
    if torch.cuda.is_available() and shutil.which("nvidia-smi"):  # timed on the default GPU
        assert all(r["clock"]["sm_mhz"] > 0 for r in rows)
    else:  # no GPU clock for rows timed on the CPU
        assert all(r["clock"] is None for r in rows)
    png = tmp_path / "train.png"
    assert main(["plot", str(tmp_path / "train.json"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert train_step.hf_config("qwen3-30b-a3b", 4)["num_hidden_layers"] == 4


@pytest.mark.parametrize("limit", [0, 4095, 4096, 12000, 65536, 98304, 100000, 262144, 10**6])
def test_longest_fitting_finds_the_limit_of_a_monotone_fit(limit):
    from moelab.bench.step_probes import longest_fitting

    tried = []

    def fits(seq):
        tried.append(seq)
        return seq <= limit

    best = longest_fitting(fits, start=4096, stop=262144, resolution=4096)
    expected = 0 if limit < 4096 else min(limit, 262144) // 4096 * 4096
    assert best == expected
    assert len(tried) == len(set(tried)) <= 12  # doubling then bisection, no repeats


GPT_OSS_LIKE = BlockShape(32, 24, 4, 2, "topk_softmax", "swiglu_oai", biases=True)


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("shape", [SHAPES["tiny"], GPT_OSS_LIKE], ids=["qwen-like", "oss-like"])
def test_compiled_baseline_computes_the_same_block(shape, mode):
    """The torch.compile baseline must be the same MoE block, or its timing compares nothing:
    its output and gradients (uncompiled here) match moelab's native_torch block."""
    params, trainable = build_block(shape, mode, 4, torch.float32, "cpu", seed=3)
    x = torch.randn(40, shape.hidden)
    ours = moe_block(x, params, block_config(shape, "native_torch", 4))[0]
    theirs = compiled.block(x, params, shape, 2.0)
    assert rel_err(theirs, ours) < 1e-5
    dout = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, trainable, dout)
    g_theirs = torch.autograd.grad(theirs, trainable, dout)
    for a, b in zip(g_theirs, g_ours):
        assert rel_err(a, b) < 1e-5


def test_compiled_baseline_routes_with_torch_ops(monkeypatch):
    """The compiled baseline is plain PyTorch for torch.compile: it must not route through
    moelab's Triton router (which run 30's compiled rows did on the GPU)."""
    seen = []

    def recording_route(logits, kind, top_k, **options):
        seen.append(options.get("fused", True))
        return route(logits, kind, top_k, **options)

    monkeypatch.setattr(compiled, "route", recording_route)
    params, _ = build_block(SHAPES["tiny"], "lora", 4, torch.float32, "cpu", seed=3)
    compiled.block(torch.randn(8, SHAPES["tiny"].hidden), params, SHAPES["tiny"], 2.0)
    assert seen == [False]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_stages_benchmark_times_every_stage(tmp_path, mode):
    """The triton stage benchmark runs the backend's own stage functions (here under the CPU
    interpreter) and reports every stage, both LoRA placements, the three main loops of the
    down projection's backward, both paths of the weight gradients and the reference GEMMs."""
    out = tmp_path / "stages.json"
    args = ["stages", "--shape", "tiny", "--tokens", "16", "--iters", "1", "--mode", mode]
    assert main([*args, "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text()) if "stage" in r]
    names = [r["stage"] for r in rows]
    assert all(r["ms"] > 0 for r in rows)
    mains = [n for n in names if n.startswith("alt: bwd dY W2 [") and "main loop" in n]
    assert len(mains) == 3
    assert sum(n.startswith("alt:") for n in names) == (12 if mode == "lora" else 5)
    assert (sum(n.startswith("alt: dW1, dW2 [") for n in names) == 2) == (mode == "full")
    assert sum(n.startswith("ref:") for n in names) == 4
    assert ("LoRA dA, dB (rank-r kernels)" in names) == (mode == "lora")
    assert ("alt: LoRA dA, dB (torch grouped_mm)" in names) == (mode == "lora")


def test_train_step_profile_writes_a_table(tmp_path):
    """``--profile`` leaves one profiler table per row, naming the ops a step ran."""
    prefix = tmp_path / "prof"
    args = ["train", "--model", "tiny-qwen3", "--layers", "1", "--seq", "16", "--systems",
            "moelab", "--warmup", "1", "--steps", "1", "--profile", str(prefix)]  # fmt: skip
    assert main(args) == 0
    table = (tmp_path / "prof_tiny-qwen3_moelab_16.txt").read_text()
    assert "aten::mm" in table and "Self CPU" in table


def test_train_step_benchmark_full_fine_tune(tmp_path):
    """``--mode full``: every parameter trains, on both sides."""
    pytest.importorskip("peft")
    out = tmp_path / "full.json"
    args = ["train", "--model", "tiny-gpt-oss", "--layers", "1", "--seq", "32", "--mode",
            "full", "--systems", "moelab,hf:grouped_mm", "--warmup", "1", "--steps", "1",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(out.read_text())
    assert [r["system"] for r in rows] == ["moelab", "hf:grouped_mm"]
    assert all(r["mode"] == "full" for r in rows)
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal off CUDA")
@pytest.mark.parametrize("grads", ["accumulate", "fresh"])
def test_experts_benchmark_refuses_graph_replay_without_cuda(grads):
    """Only the missing device is refused: graph replays take either gradient protocol."""
    with pytest.raises(ValueError, match="needs a CUDA device"):
        main(["experts", "--shape", "tiny", "--tokens", "16", "--graph", "--grads", grads])


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--graph", "--graphed-block"], "time different things"),
        (["--graphed-block", "--backends", "triton,native_torch"], "native_torch reads expert"),
    ],
)
def test_experts_benchmark_refuses_graphed_block_misuse(extra, words):
    """Refused before anything runs (before the device is even looked at), with the reason."""
    with pytest.raises(UsageError, match=words):
        main(["experts", "--shape", "tiny", "--tokens", "16", *extra])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal off CUDA")
def test_experts_benchmark_refuses_graphed_block_without_cuda():
    with pytest.raises(UsageError, match="--graphed-block replays CUDA graphs"):
        main(["experts", "--shape", "tiny", "--tokens", "16", "--graphed-block"])


@pytest.mark.parametrize("grads", ["accumulate", "fresh"])
def test_time_step_accumulates_or_drops_gradients(grads):
    """The anchor's protocol adds every step's gradient to the last (warm-ups included);
    ``fresh`` leaves exactly one step's gradient, as after zero_grad(set_to_none=True)."""
    from moelab.bench.experts import time_step

    torch.manual_seed(0)
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(5, 4, dtype=torch.float64)
    fresh = [w] if grads == "fresh" else None
    time_step(lambda x: x @ w, x0, iters=2, warmup=1, fresh=fresh)
    # every step's output gradient is the one draw time_step made next: the same from the seed
    torch.manual_seed(0)
    torch.randn(4, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    one_step = x0.t() @ torch.randn(5, 4, dtype=torch.float64)
    steps = 1 if grads == "fresh" else 3
    torch.testing.assert_close(w.grad, steps * one_step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("grads", ["accumulate", "fresh"])
def test_graph_replays_accumulate_or_write_fresh_gradients(grads):
    """Replayed from a CUDA graph, ``fresh`` gradients hold one step's (written by the graph
    into its own tensors), accumulated ones every step's: warm-ups, capture and replays."""
    from moelab.bench.experts import time_step

    torch.manual_seed(0)
    w = torch.randn(64, 64, device="cuda", requires_grad=True)
    x0 = torch.randn(48, 64, device="cuda")
    fresh = [w] if grads == "fresh" else None
    time_step(lambda x: x @ w, x0, iters=2, warmup=1, graph=True, fresh=fresh)
    torch.manual_seed(0)
    torch.randn(64, 64, device="cuda"), torch.randn(48, 64, device="cuda")
    one_step = (x0.double().t() @ torch.randn(48, 64, device="cuda").double()).float()
    # one warm-up, the capture's eager step, its recording (which runs nothing), two replays
    steps = 1 if grads == "fresh" else 4
    torch.testing.assert_close(w.grad, steps * one_step, rtol=1e-4, atol=1e-4)


def test_median_ms_spreads_each_timing_over_repeated_calls(monkeypatch):
    """``repeat`` back-to-back calls per timing, the time divided by them (wall clock on CPU)."""
    from types import SimpleNamespace

    from moelab.bench import timing

    calls = []
    clock = iter(range(0, 1000, 1))  # each perf_counter() reads one second later
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    ms = timing.median_ms(lambda: calls.append(1), iters=3, warmup=2, cuda=False, repeat=4)
    assert len(calls) == 2 + 3 * 4
    assert ms == pytest.approx(1e3 / 4)  # one second per timing, over 4 calls


def test_merged_sweeps_keep_the_latest_row_per_backend_and_token_count():
    from moelab.bench.plot import ms_series

    def row(tokens, ms, backend="triton", mode="lora", **more):
        return dict(shape="s", mode=mode, backend=backend, tokens=tokens, ms=ms, **more)

    rows = [row(2048, 3.0), row(1024, 2.0), {"check": "triton"}, row(1024, 1.5),
            row(1024, 9.0, "grouped_mm"), row(1024, 4.0, mode="full"),
            row(1024, 3.5, mode="full", grads="fresh"),
            row(1024, 4.2, mode="full", grads="accumulate"), row(1024, 0.9, graph=True),
            row(1024, 0.8, mode="full", grads="fresh", graph=True)]  # fmt: skip
    assert ms_series(rows) == {
        ("s", "lora"): {"triton": [(1024, 1.5), (2048, 3.0)], "grouped_mm": [(1024, 9.0)],
                        "triton, CUDA graph": [(1024, 0.9)]},
        ("s", "full"): {"triton": [(1024, 4.2)], "triton, fresh grads": [(1024, 3.5)],
                        "triton, fresh grads, CUDA graph": [(1024, 0.8)]},
    }  # fmt: skip


def test_cli_shows_the_backend_choice_on_stderr(tmp_path):
    # A first run at a new shape tunes for minutes on a GPU; the command line must show moelab's
    # log lines (backend chosen, tuning costs), not only the final table.
    args = ["experts", "--shape", "tiny", "--tokens", "16", "--iters", "1"]
    args += ["--backends", "grouped_mm", "--json", str(tmp_path / "rows.json")]
    done = subprocess.run(
        [sys.executable, "-m", "moelab.bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert done.returncode == 0, done.stderr
    assert "moelab: expert backend grouped_mm (requested by argument)" in done.stderr
    assert "moelab: expert backend" not in done.stdout


@pytest.mark.parametrize("shape", ["qwen3", "gpt-oss"])
def test_host_stand_in_walks_every_launch_of_a_lora_step(shape):
    """``scripts/host_standin.py`` patches moelab's launch internals to measure the host path
    on the CPU; it must keep running as they change (a fresh process: the patches are global)."""
    root = os.path.dirname(os.path.dirname(__file__))
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "scripts/host_standin.py", "--shape", shape, "--steps", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert f"{shape}, LoRA z given: host us per experts forward + backward" in done.stdout
