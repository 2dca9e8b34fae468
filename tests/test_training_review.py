"""The training math against float64 references written here with plain torch: the fused LM-head
loss at its edges, gradient accumulation over micro-batches of unequal token counts, fp32 masters
with AdamW, clipping, weight-decay groups and the schedule, and packed data at document
boundaries, its seeded order and its resume position."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from moelab.checkpoints import api
from moelab.models import tree
from moelab.models.model import Model
from moelab.models.options import ForwardOptions
from moelab.train import data as data_mod
from moelab.train.config import OptimConfig, RunConfig, TrainerConfig
from moelab.train.loss import chunked_cross_entropy
from moelab.train.optim import MasterWeights, build_optimizer, build_schedule, param_groups
from moelab.train.trainer import _stack, _train_step, _Window, step_loss

IGNORE = -100
VOCAB = 61  # prime: no chunk size divides it
OPTIONS = ForwardOptions(backend="native_torch")  # runs in float64 too
ARCH = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=256,
)


def _tiny_model(dtype: torch.dtype) -> Model:
    family, _ = api.FAMILIES["qwen3_moe"]
    cfg = family.Config.from_hf({"model_type": "qwen3_moe", **ARCH})
    gen = torch.Generator().manual_seed(0)
    params = family.init_params(cfg, dtype=torch.float32, device="cpu", generator=gen)
    for _, t in tree.leaves(params):  # the same values at every dtype
        t.data = t.data.to(dtype)
    return Model(family, cfg, params)


# ---------------------------------------------------------------------------------------------
# the fused LM-head cross entropy


def _reference_ce(h, w, y):
    """Summed CE of ``h @ w.T`` in float64 and its gradients to h and w."""
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    logp = torch.log_softmax(h64 @ w64.t(), dim=-1)
    kept = y != IGNORE
    loss = -(logp[torch.arange(len(y)), torch.where(kept, y, 0)] * kept).sum()
    return (loss, *torch.autograd.grad(loss, [h64, w64]))


@pytest.mark.parametrize(
    "tokens, chunk, ignored, dtype",
    [
        (1, None, "none", torch.float32),  # one token
        (1, 5, "all", torch.float32),  # one token, ignored
        (37, 5, "all", torch.float32),  # every label ignored: zero loss, zero gradients
        (50, 16, "some", torch.float32),  # neither tokens nor the vocabulary a multiple of chunk
        (50, 16, "some", torch.bfloat16),  # bf16 hidden states and head
    ],
)
def test_loss_edges_match_float64(tokens, chunk, ignored, dtype):
    g = torch.Generator().manual_seed(tokens)
    h = torch.randn(tokens, 24, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(VOCAB, 24, generator=g) * 0.3).to(dtype).requires_grad_(True)
    y = torch.randint(0, VOCAB, (tokens,), generator=g)
    if ignored == "all":
        y[:] = IGNORE
    elif ignored == "some":
        y[torch.rand(tokens, generator=g) < 0.3] = IGNORE
    loss, count = chunked_cross_entropy(h, w, y, chunk=chunk)
    (1.5 * loss).backward()
    ref_loss, ref_h, ref_w = _reference_ce(h, w, y)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert count.item() == int((y != IGNORE).sum())
    assert abs(loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item()))
    assert rel_err(h.grad, 1.5 * ref_h) <= tol and rel_err(w.grad, 1.5 * ref_w) <= tol


# ---------------------------------------------------------------------------------------------
# gradient accumulation in the trainer's step


def _micro_batches(shape: str) -> list[data_mod.Batch]:
    """Two micro-batches of two rows whose counted tokens differ (14 and 24 of 24), or whose
    second has none at all."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (4, 13), generator=g)
    docs = torch.zeros(4, 13, dtype=torch.long)
    docs[0], docs[1] = torch.arange(13) // 2, torch.arange(13) // 3  # many short documents
    batches = [data_mod.make_batch(tokens[a : a + 2], docs[a : a + 2]) for a in (0, 2)]
    if shape == "one_empty":
        batches[1].labels[:] = IGNORE
    return batches


def _reference_step(batches, aux_coef, z_coef):
    """The step's objective in float64: the CE mean over every counted token of the step (as one
    batch of all its rows), plus each router loss as a mean over layers and micro-batches."""
    model = _tiny_model(torch.float64)
    leaves = list(tree.leaves(model.params))
    for _, t in leaves:
        t.requires_grad_(True)
    fam, cfg = model.family, model.config
    ce, counted, router = 0.0, 0, 0.0
    for b in batches:
        h, stats = fam.hidden_states(
            cfg, model.params, b.input_ids, document_ids=b.document_ids, options=OPTIONS
        )
        logits = h @ fam.lm_head_weight(cfg, model.params).t()
        labels = b.labels.reshape(-1)
        ce = ce + F.cross_entropy(logits.reshape(-1, VOCAB), labels, reduction="sum")
        counted += int((labels != IGNORE).sum())
        aux = sum(s.aux_loss for s in stats) / len(stats)
        z = sum(s.z_loss for s in stats) / len(stats)
        router = router + (aux_coef * aux + z_coef * z) / len(batches)
    loss = ce / max(counted, 1) + router
    grads = torch.autograd.grad(loss, [t for _, t in leaves])
    return loss.item(), {path: g for (path, _), g in zip(leaves, grads)}


def _trainer_step(batches, aux_coef, z_coef, dtype=torch.float32):
    """The master gradients ``_train_step`` hands the optimizer, and its window."""
    model = _tiny_model(dtype)
    trainable = list(tree.leaves(model.params))
    for _, t in trainable:
        t.requires_grad_(True)
    masters = MasterWeights(trainable)
    grads = {}

    class Recorder:  # the optimizer's place: keeps what it would step with
        def step(self):
            grads.update({p: m.grad.clone() for p, m in zip(masters.paths, masters.masters)})

        def zero_grad(self, set_to_none=True):
            for m in masters.masters:
                m.grad = None

    cfg = RunConfig(
        trainer=TrainerConfig(aux_loss_coef=aux_coef, z_loss_coef=z_coef),
        optim=OptimConfig(grad_clip=math.inf),
    )
    run = types.SimpleNamespace(
        cfg=cfg, masters=masters, optimizer=Recorder(), model=model, train_opts=OPTIONS
    )
    window = _Window(torch.device("cpu"))
    _train_step(run, window, _stack(batches))
    return grads, window


@pytest.mark.parametrize("shape", ["unequal_counts", "one_empty"])
@pytest.mark.parametrize("coefs", [(0.0, 0.0), (1e-2, 1e-3)], ids=["ce_only", "router_losses"])
def test_accumulated_micro_batches_weigh_every_token_alike(shape, coefs):
    """A micro-batches of B rows step as one batch of A*B rows: the CE is a mean over the step's
    counted tokens. The old step averaged the micro-batches' own means: 27% off in gradient
    norm at counts 14 and 24, and half the gradient when one micro-batch counted nothing."""
    batches = _micro_batches(shape)
    ref_loss, ref_grads = _reference_step(batches, *coefs)
    grads, window = _trainer_step(batches, *coefs)
    num = sum((grads[p].double() - g).norm() ** 2 for p, g in ref_grads.items()) ** 0.5
    den = sum(g.norm() ** 2 for g in ref_grads.values()) ** 0.5
    assert (num / den).item() <= 1e-5
    # the logged total loss is the objective the step descended
    assert window.loss.item() / len(batches) == pytest.approx(ref_loss, rel=1e-5)


def test_one_micro_batch_of_all_rows_is_the_same_step():
    batches = _micro_batches("unequal_counts")
    fields = ("input_ids", "labels", "document_ids")
    whole = data_mod.Batch(*(torch.cat([getattr(b, k) for b in batches]) for k in fields))
    split, _ = _trainer_step(batches, 0.0, 0.0)
    joined, _ = _trainer_step([whole], 0.0, 0.0)
    for path, g in joined.items():
        assert rel_err(split[path], g) <= 1e-5, path


def test_bf16_micro_batches_sum_their_gradients_in_fp32():
    """With bf16 params, each micro-batch's gradient reaches the fp32 masters before the next
    one is added: the step hands the optimizer the fp32 sum of the micro-batches' own bf16
    gradients, bit for bit. Summed in the params' bf16 ``.grad`` (the old step), they rounded at
    every add."""
    batches = _micro_batches("unequal_counts") * 2  # four micro-batches
    model = _tiny_model(torch.bfloat16)
    leaves = list(tree.leaves(model.params))
    cfg = RunConfig(trainer=TrainerConfig(aux_loss_coef=1e-2))
    stacked = _stack(batches)
    micro = len(batches)
    ce_tokens = (stacked[:, 1] != IGNORE).sum().clamp_min(1) / micro
    for _, t in leaves:
        t.requires_grad_(True)
    ref = {}
    for b in batches:  # each micro-batch's gradient alone, as its backward makes it, in bf16
        loss = step_loss(model, b, OPTIONS, cfg, ce_tokens)[0]
        grads = torch.autograd.grad(loss / micro, [t for _, t in leaves])
        for (path, _), grad in zip(leaves, grads):
            assert grad.dtype == torch.bfloat16
            ref[path] = grad.float() if path not in ref else ref[path] + grad.float()
    got, _ = _trainer_step(batches, 1e-2, 0.0, dtype=torch.bfloat16)
    for path, grad in ref.items():
        assert got[path].dtype == torch.float32
        assert torch.equal(got[path], grad), path


def test_a_batch_with_no_counted_token_has_a_zero_finite_loss():
    model = _tiny_model(torch.float32)
    batch = _micro_batches("one_empty")[1]
    cfg = RunConfig(trainer=TrainerConfig(aux_loss_coef=0.0))
    loss, ce_sum, count, _ = step_loss(model, batch, OPTIONS, cfg)
    assert count.item() == 0 and ce_sum.item() == 0.0 and loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# fp32 masters, AdamW, clipping, weight decay and the schedule


def _hand_lr(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return lr * (min_ratio + (1 - min_ratio) * cosine)


def _should_decay(path: tree.Path, t: torch.Tensor) -> bool:
    return t.dim() >= 2 and path[0] != "embed" and "bias" not in str(path[-1])


def test_masters_step_as_float64_adamw_with_clipping_and_the_schedule():
    """bf16 params through fp32 masters (and one fp32 param, its own master) against
    torch.optim.AdamW in float64 on the same gradients, clipped by a norm computed here, at
    learning rates computed here; params equal their masters rounded after every step."""
    shapes = {
        ("embed", "weight"): (11, 4),
        ("layers", 0, "norm", "weight"): (4,),
        ("layers", 0, "experts", "gate_up"): (3, 5, 4),
        ("layers", 0, "experts", "down_bias"): (3, 4),  # a bias, though 2-D
        ("lm_head", "weight"): (11, 4),
    }
    g = torch.Generator().manual_seed(0)
    params = [(p, torch.randn(*s, generator=g).bfloat16().requires_grad_(True))
              for p, s in shapes.items()]  # fmt: skip
    params.append((("layers", 0, "fp32"), torch.randn(5, 3, generator=g).requires_grad_(True)))
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, warmup_steps=2,
                      min_lr_ratio=0.1, grad_clip=0.5)  # fmt: skip
    total = 6
    masters = MasterWeights(params)
    optimizer = build_optimizer(masters, cfg)
    schedule = build_schedule(optimizer, cfg, total)
    ref = [t.detach().double().requires_grad_(True) for _, t in params]
    decayed = [_should_decay(p, t) for p, t in params]
    ref_opt = torch.optim.AdamW(
        [
            {"params": [r for r, d in zip(ref, decayed) if d], "weight_decay": 0.1},
            {"params": [r for r, d in zip(ref, decayed) if not d], "weight_decay": 0.0},
        ],
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    for step in range(total):
        grads = [(torch.randn(t.shape, generator=g) * 3).to(t.dtype) for _, t in params]
        for (_, t), grad in zip(params, grads):
            t.grad = grad.clone()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(_hand_lr(step, 1e-2, 2, total, 0.1))
        masters.grads_to_masters()
        norm = torch.nn.utils.clip_grad_norm_(masters.masters, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masters.masters_to_params()
        schedule.step()

        norm64 = sum(grad.double().square().sum() for grad in grads).sqrt()
        assert norm.item() == pytest.approx(norm64.item(), rel=1e-6)
        for r, grad in zip(ref, grads):
            r.grad = grad.double() * min(1.0, 0.5 / (norm64.item() + 1e-6))
        for group in ref_opt.param_groups:
            group["lr"] = _hand_lr(step, 1e-2, 2, total, 0.1)
        ref_opt.step()
        for (path, t), m, r in zip(params, masters.masters, ref):
            assert m.dtype == torch.float32 and rel_err(m, r) <= 1e-6, (step, path)
            assert torch.equal(t.detach(), m.detach().to(t.dtype)), (step, path)
            assert t.grad is None and m.grad is None
    # the cosine ends at min_lr_ratio at total_steps (one past the last trained step)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_weight_decay_spares_every_bias_norm_and_embedding():
    """GPT-OSS's stacked expert biases ([E, 2I], [E, H]) are biases: the old groups decayed
    them as matrices (4 tensors of the tiny model)."""
    family, _ = api.FAMILIES["gpt_oss"]
    arch = dict(ARCH, num_local_experts=4, sliding_window=8)
    cfg = family.Config.from_hf({"model_type": "gpt_oss", **arch})
    params = family.init_params(cfg, dtype=torch.float32, device="cpu",
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    leaves = list(tree.leaves(params))
    assert sum(t.dim() == 2 and "bias" in str(p[-1]) for p, t in leaves) == 4
    groups = param_groups(MasterWeights(leaves), 0.1)
    decayed = {id(t) for group in groups if group["weight_decay"] > 0 for t in group["params"]}
    for path, t in leaves:
        assert (id(t) in decayed) == _should_decay(path, t), path


# ---------------------------------------------------------------------------------------------
# packed data


def _docs() -> list[tuple[str, str]]:
    return [(f"d{i}", "x" * (i % 5 + 1) + chr(65 + i % 26) * 3) for i in range(40)]


def test_packed_labels_never_cross_a_document_boundary():
    """Each row's input is its tokens but the last, its labels the next tokens, ignored where the
    next token opens another document (checked against the unpacked stream)."""
    docs, seq_len = _docs(), 7
    packed = data_mod.pack(docs, data_mod.ByteTokenizer(), seq_len)
    stream = torch.cat([torch.tensor(list(text.encode())) for _, text in docs])
    owner = torch.cat([torch.full((len(text),), i) for i, (_, text) in enumerate(docs)])
    width = seq_len + 1
    assert packed.rows == len(stream) // width
    for r in range(packed.rows):
        tok, doc = stream[r * width : (r + 1) * width], owner[r * width : (r + 1) * width]
        b = data_mod.make_batch(packed.tokens[r : r + 1], packed.docs[r : r + 1])
        assert torch.equal(b.input_ids[0], tok[:-1]) and torch.equal(b.document_ids[0], doc[:-1])
        assert torch.equal(b.labels[0], torch.where(doc[1:] == doc[:-1], tok[1:], IGNORE))


def test_the_batch_stream_is_seeded_and_resumes_where_it_stopped():
    """Same seed, same batches; another seed, another order; every row once per epoch; a stream
    restored from a state saved mid-epoch continues across the next epoch boundary."""
    packed = data_mod.pack(_docs(), data_mod.ByteTokenizer(), 7)  # 30 rows: 10 batches/epoch

    def draw(stream, n):
        return [stream.next().input_ids for _ in range(n)]

    first = draw(data_mod.BatchStream(packed, 3, seed=5), 20)
    again = draw(data_mod.BatchStream(packed, 3, seed=5), 20)
    other = draw(data_mod.BatchStream(packed, 3, seed=6), 10)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    epoch = torch.cat(first[:10])
    assert len({tuple(row.tolist()) for row in epoch}) == packed.rows
    stopped = data_mod.BatchStream(packed, 3, seed=5)
    draw(stopped, 7)
    resumed = data_mod.BatchStream(packed, 3, seed=999)
    resumed.load_state_dict(stopped.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(draw(resumed, 13), first[7:]))


def test_the_held_out_split_is_by_name_not_by_order():
    docs = _docs()
    train, held_out = data_mod.split_documents(docs, 0.2)
    assert {n for n, _ in train}.isdisjoint({n for n, _ in held_out})
    assert sorted(train + held_out) == sorted(docs)
    assert sorted(data_mod.split_documents(docs[::-1], 0.2)[1]) == sorted(held_out)
