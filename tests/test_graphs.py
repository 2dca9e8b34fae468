"""A training step replayed from a CUDA graph trains exactly like the eager step."""

from __future__ import annotations

import pytest
import torch

from moelab.bench.train_step import MoelabSystem, hf_config
from moelab.models import tree
from moelab.train.graphs import CapturedStep


def test_capture_refuses_a_cpu_batch():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA batch"):
        CapturedStep(lambda batch: None).capture(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("checkpoint", [False, True], ids=["kept", "checkpointed"])
def test_graphed_steps_match_eager_steps(checkpoint):
    """Three steps each way from the same initial weights: the adapters end up the same (the
    capture's own step runs eagerly, the two after it are replays)."""
    cfg = hf_config("tiny-qwen3", 2)
    ids = torch.randint(0, cfg["vocab_size"], (1, 64), device="cuda")

    def trained(graph: bool) -> dict:
        system = MoelabSystem(cfg, "lora", 8, "auto", torch.device("cuda"), torch.bfloat16,
                              checkpoint, graph=graph)  # fmt: skip
        # B starts at zero; give it values so that every adapter's gradient is non-zero
        gen = torch.Generator("cuda").manual_seed(3)
        with torch.no_grad():
            for path, t in tree.leaves(system.params):
                if path[-1].endswith("b") and t.requires_grad:
                    t.normal_(generator=gen)
            for param, master in zip(system.masters.params, system.masters.masters):
                master.copy_(param)
        start = {
            p: m.detach().clone() for p, m in zip(system.masters.paths, system.masters.masters)
        }
        if graph:
            system.capture(ids)  # one eager step, then the recording
        for _ in range(2 if graph else 3):
            system.step(ids)
        torch.cuda.synchronize()
        end = dict(zip(system.masters.paths, system.masters.masters))
        assert all((end[p] - start[p]).abs().max() > 1e-5 for p in start)  # all of them trained
        return end

    eager, graphed = trained(False), trained(True)
    assert eager.keys() == graphed.keys()
    for path in eager:
        # fp32 masters; the capturable optimizer computes its bias correction on the GPU, so
        # allow rounding, far below one step's update (lr 1e-4)
        torch.testing.assert_close(graphed[path], eager[path], rtol=0, atol=1e-6, msg=str(path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_each_call_is_one_step():
    """The call that captures trains once (its eager step), later calls replay once each."""
    counter = torch.zeros((), device="cuda")

    def step(batch):
        counter.add_(batch.sum())

    captured = CapturedStep(step)
    ones = torch.ones(3, device="cuda")
    for _ in range(3):
        captured(ones)
    torch.cuda.synchronize()
    assert counter.item() == 9.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_each_replay_draws_new_random_numbers():
    """Dropout in a captured step (LoRA dropout) takes a new mask on every replay, not the
    recorded one: the CUDA generator's offset advances per replay."""
    out = torch.zeros(4096, device="cuda")

    def step(batch):
        out.copy_(torch.nn.functional.dropout(batch, 0.5))

    captured = CapturedStep(step)
    ones = torch.ones(4096, device="cuda")
    masks = []
    for _ in range(3):  # the capture's eager step, then two replays
        captured(ones)
        masks.append(out.clone())
    assert all(0.3 < (m == 0).float().mean() < 0.7 for m in masks)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
