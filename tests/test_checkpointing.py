"""Activation checkpointing per layer recomputes the same forward: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch

from moelab.bench.train_step import hf_config
from moelab.checkpoints import api
from moelab.models import tree
from moelab.models.options import ForwardOptions
from moelab.train.loss import chunked_cross_entropy


@pytest.mark.parametrize("model", ["tiny-qwen3", "tiny-gpt-oss"])
@pytest.mark.parametrize("backend", ["native_torch", "grouped_mm"])
def test_checkpointed_layers_give_the_same_gradients(model, backend):
    hf = hf_config(model, 2)
    family, _ = api.FAMILIES[hf["model_type"]]
    cfg = family.Config.from_hf(hf)
    params = family.init_params(cfg, generator=torch.Generator().manual_seed(0))
    leaves = [t.requires_grad_(True) for _, t in tree.leaves(params)]
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    docs = torch.tensor([[0] * 25 + [1] * 15])  # packed documents and (GPT-OSS) a window

    def loss_and_grads(checkpoint: bool):
        options = ForwardOptions(backend=backend, checkpoint_layers=checkpoint)
        h, stats = family.hidden_states(cfg, params, ids, document_ids=docs, options=options)
        ce, count = chunked_cross_entropy(h[0, :-1], family.lm_head_weight(cfg, params), ids[0, 1:])
        # the router losses as the trainer adds them (coefficients 1): their gradients reach the
        # routers through the checkpointed layers' outputs too
        router_losses = torch.stack([s.aux_loss + s.z_loss for s in stats])
        assert len(stats) == cfg.num_layers and router_losses.requires_grad
        loss = ce / count + router_losses.mean()
        return router_losses, loss, torch.autograd.grad(loss, leaves, allow_unused=True)

    router_losses, loss, grads = loss_and_grads(False)
    router_losses_ckpt, loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert torch.equal(router_losses, router_losses_ckpt) and torch.equal(loss, loss_ckpt)
    assert sum(g is not None for g in grads) >= len(leaves) - 1  # all but an unused tied head
    for g, g_ckpt in zip(grads, grads_ckpt):
        assert (g is None) == (g_ckpt is None)
        if g is not None:
            torch.testing.assert_close(g_ckpt, g, rtol=1e-6, atol=1e-7)


def test_checkpointed_layers_replay_lora_dropout():
    """With LoRA dropout the recompute must draw the same masks: the RNG state is saved for it
    (and only then, as saving it synchronises with a GPU)."""
    from moelab.train.config import LoraConfig
    from moelab.train.lora import add_lora

    hf = hf_config("tiny-qwen3", 2)
    family, _ = api.FAMILIES[hf["model_type"]]
    cfg = family.Config.from_hf(hf)
    params = family.init_params(cfg, generator=torch.Generator().manual_seed(0))
    add_lora(params, LoraConfig(rank=4, targets=["attention"]), torch.Generator().manual_seed(2))
    adapters = [t.requires_grad_(True) for p, t in tree.leaves(params) if p[-1] == "lora_b"]
    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))

    def grads(checkpoint: bool):
        torch.manual_seed(7)
        options = ForwardOptions(lora_dropout=0.5, checkpoint_layers=checkpoint)
        h, _ = family.hidden_states(cfg, params, ids, options=options)
        return torch.autograd.grad(h.square().mean(), adapters)

    for g, g_ckpt in zip(grads(False), grads(True)):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g_ckpt, g, rtol=1e-6, atol=1e-7)
