"""The Hydra trainer's CUDA-graph mode (``trainer.cuda_graph=true``): the same training as eager
steps, learning rates set in place between replays, checkpoints that either kind of run resumes
from; and the host-side pieces it relies on, checked on the CPU."""

from __future__ import annotations

import pytest
import torch
from test_training import SMOKE, metrics, run_config

from moelab.ops.moe import RouterStats
from moelab.train import state
from moelab.train.config import LoraConfig, OptimConfig
from moelab.train.optim import (
    MasterWeights,
    build_optimizer,
    build_schedule,
    load_optimizer_state,
)
from moelab.train.trainer import _resume_state, _Window
from moelab.train.trainer import train as run_training

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_the_window_adds_into_the_same_tensors_and_clears_them_in_place():
    """A replayed graph adds into the tensors it recorded: the window's sums must stay the same
    objects across flushes, and each flush report only its own steps."""
    window = _Window(torch.device("cpu"))
    stats = [RouterStats(torch.tensor(0.5), torch.tensor(0.25), torch.tensor([3, 1]),
                         torch.tensor(0.7))]  # fmt: skip
    window.add(torch.tensor(2.0), torch.tensor(6.0), torch.tensor(3.0), stats)
    window.add_grad_norm(torch.tensor(4.0))
    window.end_step(1)
    held = [id(t) for t in (window.loss, window.ce, window.count, window.grad_norm)]
    counts = window.counts[0]
    first = window.flush(tokens_per_step=8, lr=1e-3)
    assert first["loss"] == 2.0 and first["grad_norm"] == 4.0 and first["aux_loss"] == 0.5
    assert first["expert_load"] == {0: [0.75, 0.25]}
    assert [id(t) for t in (window.loss, window.ce, window.count, window.grad_norm)] == held
    assert window.counts[0] is counts and counts.tolist() == [0, 0]
    for _ in range(2):  # two steps of one micro-batch each
        window.add(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0), stats)
        window.add_grad_norm(torch.tensor(1.0))
        window.end_step(1)
    second = window.flush(tokens_per_step=8, lr=1e-3)
    assert second["loss"] == 0.5 and second["total_loss"] == 1.0 and second["grad_norm"] == 1.0
    assert second["expert_load"] == {0: [0.75, 0.25]} and counts.tolist() == [0, 0]


def test_saved_learning_rates_are_floats_when_the_run_keeps_them_in_tensors():
    """A graphed run holds each group's learning rate in a tensor the schedule fills in place;
    its checkpoints store floats, so an eager run resumes from them (and the other way)."""
    weight = torch.nn.Parameter(torch.ones(2, 2))
    masters = MasterWeights([(("w",), weight)])
    optim = OptimConfig(lr=1e-2, warmup_steps=4)
    optimizer = build_optimizer(masters, optim)
    schedule = build_schedule(optimizer, optim, total_steps=10)
    for group in optimizer.param_groups:  # as train() does for trainer.cuda_graph
        group["lr"] = torch.tensor(float(group["lr"]))
    held = optimizer.param_groups[0]["lr"]
    optimizer.step()  # no gradients: moves nothing
    schedule.step()
    assert optimizer.param_groups[0]["lr"] is held and held.item() == pytest.approx(5e-3)

    class Data:
        train = type("S", (), {"state_dict": lambda self: {}})()

    saved = _resume_state(optimizer, schedule, Data(), masters, LoraConfig())
    assert all(type(g["lr"]) is float for g in saved["optimizer"]["param_groups"])
    assert all(type(lr) is float for lr in saved["schedule"]["_last_lr"])
    eager = build_optimizer(masters, optim)
    eager_schedule = build_schedule(eager, optim, total_steps=10)
    eager.load_state_dict(saved["optimizer"])
    eager_schedule.load_state_dict(saved["schedule"])
    eager.step()
    eager_schedule.step()
    assert eager.param_groups[0]["lr"] == pytest.approx(7.5e-3)


@pytest.mark.parametrize("saved_capturable", [False, True], ids=["eager_ckpt", "graph_ckpt"])
def test_a_resumed_optimizer_keeps_its_own_capturable_setting(saved_capturable):
    """torch's load_state_dict takes every group option from the checkpoint: an eager run's
    would leave a graphed run's AdamW non-capturable, and its capture fails (run 62). The
    trained state comes from the checkpoint, how the update runs from this run."""
    weight = torch.nn.Parameter(torch.randn(3, 2))
    weight.grad = torch.randn(3, 2)
    masters = MasterWeights([(("w",), weight)])
    optim = OptimConfig(lr=1e-2, warmup_steps=1)
    source = build_optimizer(masters, optim, capturable=saved_capturable)
    if not saved_capturable:  # a capturable update needs a GPU: the saved state is enough here
        source.step()
    saved = source.state_dict()
    resumed = build_optimizer(masters, optim, capturable=not saved_capturable)
    load_optimizer_state(resumed, saved)
    assert [g["capturable"] for g in resumed.param_groups] == [not saved_capturable]
    assert [g["capturable"] for g in source.param_groups] == [saved_capturable]
    for name, value in source.state.get(weight, {}).items():
        assert torch.equal(resumed.state[weight][name], value), name


def _masters(run_dir, step: int) -> list[torch.Tensor]:
    return state.load_trainer_state(run_dir / "checkpoints" / f"step_{step:06d}")["masters"]


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float((x - y).norm()) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5


@gpu
@pytest.mark.parametrize(
    "mode", [["lora.rank=8", "backend=triton"], ["backend=grouped_mm"]], ids=["lora", "full"]
)
def test_a_graphed_run_trains_as_the_eager_run(tmp_path, mode):
    """Six steps of two micro-batches each way (bf16, fp32 masters; the warmup raises the
    learning rate every step, so a rate recorded as a constant would show): the same losses and
    trained weights; an eager run resumed from the graphed run's step-3 checkpoint goes on as the
    graphed run did, and a graphed run resumed from the eager run's as the eager run did."""
    common = [*SMOKE, *mode, "trainer.device=cuda", "trainer.grad_accum=2"]
    run_training(run_config(common), tmp_path / "eager")
    run_training(run_config([*common, "trainer.cuda_graph=true"]), tmp_path / "graph")
    eager, eager_eval = metrics(tmp_path / "eager")
    graph, graph_eval = metrics(tmp_path / "graph")
    assert sorted(graph) == [1, 2, 3, 4, 5, 6] and graph_eval[6] < graph_eval[0]
    for step in eager:
        assert graph[step] == pytest.approx(eager[step], rel=5e-3), step
    for step in eager_eval:
        assert graph_eval[step] == pytest.approx(eager_eval[step], rel=5e-3), step
    # trained weights: the two runs differ by far less than three steps of updates
    moved = _distance(_masters(tmp_path / "eager", 6), _masters(tmp_path / "eager", 3))
    apart = _distance(_masters(tmp_path / "graph", 6), _masters(tmp_path / "eager", 6))
    assert moved > 0 and apart <= 0.02 * moved, (apart, moved)

    # either kind of run resumes from the other's step-3 checkpoint and goes on as that run did
    graphed = ["trainer.cuda_graph=true"]
    for resumed, source, extra in (("eager", "graph", []), ("graph", "eager", graphed)):
        ckpt = tmp_path / source / "checkpoints" / "step_000003"
        resume = ["trainer.resume=true", f"trainer.resume_from={ckpt}"]
        run_training(run_config([*common, *extra, *resume]), tmp_path / f"resumed_{resumed}")
        got, _ = metrics(tmp_path / f"resumed_{resumed}")
        expected = graph if source == "graph" else eager
        assert sorted(got) == [4, 5, 6], resumed
        for step in got:
            assert got[step] == pytest.approx(expected[step], rel=5e-3), (resumed, step)


@gpu
def test_a_graphed_run_resumes_as_a_graphed_run_with_checkpointed_layers(tmp_path):
    """Activation checkpointing recomputes layers inside the captured backward; a graphed run
    resumed from its own step-3 checkpoint captures again and goes on as the whole run did."""
    common = [*SMOKE, "lora.rank=8", "backend=triton", "trainer.device=cuda",
              "trainer.cuda_graph=true", "trainer.activation_checkpointing=true"]  # fmt: skip
    run_training(run_config(common), tmp_path / "whole")
    whole, whole_eval = metrics(tmp_path / "whole")
    assert whole_eval[6] < whole_eval[0]
    ckpt = tmp_path / "whole" / "checkpoints" / "step_000003"
    resume = ["trainer.resume=true", f"trainer.resume_from={ckpt}"]
    run_training(run_config([*common, *resume]), tmp_path / "resumed")
    got, _ = metrics(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(whole[step], rel=5e-3), step


@gpu
def test_a_graphed_run_trains_with_lora_dropout(tmp_path):
    """LoRA dropout inside the graph (new masks on each replay: tests/test_graphs.py): the run
    trains, and its losses are not those of the same run without dropout."""
    common = [*SMOKE, "lora.rank=8", "backend=triton", "trainer.device=cuda",
              "trainer.cuda_graph=true"]  # fmt: skip
    run_training(run_config([*common, "lora.dropout=0.5"]), tmp_path / "dropout")
    run_training(run_config(common), tmp_path / "plain")
    dropout, dropout_eval = metrics(tmp_path / "dropout")
    plain, _ = metrics(tmp_path / "plain")
    assert dropout_eval[6] < dropout_eval[0]
    assert all(dropout[s] != plain[s] for s in (2, 3, 4, 5, 6))
