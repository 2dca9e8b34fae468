"""The training loop: one step = grad-accumulated micro-batches, clip, AdamW, schedule.

``train(cfg, run_dir)`` is the whole run; ``experiments/train.py`` calls it from Hydra. Host
synchronisation happens only at log, eval and checkpoint steps. With ``trainer.cuda_graph`` the
step (micro-batches, clipping, the optimizer) is captured as a CUDA graph at its first call and
replayed after (:class:`moelab.train.graphs.CapturedStep`); the schedule sets the learning rate
in place between replays, and evaluation and checkpoints run eagerly as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moelab.files import replace_text
from moelab.kernels import registry
from moelab.models import tree
from moelab.models.model import Model
from moelab.models.options import ForwardOptions
from moelab.ops.moe import RouterStats
from moelab.train import lora as lora_mod
from moelab.train import setup, state
from moelab.train.config import (
    RunConfig,
    check_run_dir,
    mark_latest_recorded,
    recorded_config_name,
    resolve_device,
    resumes,
    validate,
)
from moelab.train.data import Batch
from moelab.train.graphs import CapturedStep
from moelab.train.loss import IGNORE_LABEL, chunked_cross_entropy
from moelab.train.optim import (
    MasterWeights,
    build_optimizer,
    build_schedule,
    load_optimizer_state,
)
from moelab.train.tracking import Tracker

log = logging.getLogger("moelab")


def step_loss(
    model: Model,
    batch: Batch,
    options: ForwardOptions,
    cfg: RunConfig,
    ce_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[RouterStats]]:
    """(total loss, CE sum, counted tokens, router stats) of one micro-batch.

    The total is the CE sum over ``ce_tokens`` (default: this micro-batch's counted tokens)
    plus the router losses, each a mean over the MoE layers.
    """
    fam = model.family
    h, stats = fam.hidden_states(
        model.config,
        model.params,
        batch.input_ids,
        document_ids=batch.document_ids,
        options=options,
    )
    ce_sum, count = chunked_cross_entropy(
        h.reshape(-1, h.shape[-1]),
        fam.lm_head_weight(model.config, model.params),
        batch.labels.reshape(-1),
    )
    loss = ce_sum / (count.clamp_min(1) if ce_tokens is None else ce_tokens)
    if stats:
        t = cfg.trainer
        loss = loss + t.aux_loss_coef * torch.stack([s.aux_loss for s in stats]).mean()
        loss = loss + t.z_loss_coef * torch.stack([s.z_loss for s in stats]).mean()
    return loss, ce_sum, count, stats


@torch.no_grad()
def evaluate(
    model: Model,
    batches: list[Batch],
    options: ForwardOptions,
    cfg: RunConfig,
    device: torch.device,
) -> float:
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for batch in batches:
        _, ce_sum, n, _ = step_loss(model, batch.to(device), options, cfg)
        total, count = total + ce_sum, count + n
    return (total / count.clamp_min(1)).item()


def train(cfg: RunConfig, run_dir: str | Path) -> dict:
    """Run the configured training; returns the run summary (also in ``summary.json``)."""
    validate(cfg)
    run_dir = Path(run_dir)
    resuming = resumes(cfg)
    if not resuming:  # before anything is written: never over another run's files
        check_run_dir(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    registry.forget_logged()
    device = resolve_device(cfg.trainer.device)
    dtype = setup.resolve_dtype(cfg.trainer.precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.trainer.seed)

    # the checkpoint to resume from, before anything is written to the run folder
    ckpt = state.find(cfg.trainer.resume_from or run_dir) if resuming else None
    saved = state.load_trainer_state(ckpt) if ckpt is not None else None
    model = setup.build_model(cfg, dtype, device)
    names = setup.adapter_layout(model)
    # the data (its vocabulary against the model's) before a LoRA run writes its base model
    data = setup.build_data(cfg, model)
    base_model = cfg.model.path
    lora = cfg.lora
    if lora.rank is not None:
        lora_mod.check_targets(model.params, lora)
        lora_mod.add_lora(
            model.params, lora, torch.Generator(device=device).manual_seed(cfg.trainer.seed + 1)
        )
    # the expert backend for the model's sizes and adapters, before a LoRA run writes its base
    # model: a request the backend cannot serve at these sizes leaves the folder empty
    # fmt: off
    backend = setup.expert_backend(model, cfg.backend.name, dtype, device,
                                   data.micro_batch_tokens, cfg.trainer.moe_recompute)
    # fmt: on
    if lora.rank is not None and base_model is None:
        base_model = setup.save_base_model(model, run_dir)  # before any restored weights
    if saved is not None:
        state.restore_params(ckpt, model, saved)
    trains = lora_mod.trainable_predicate(lora)
    trainable = []
    for path, t in tree.leaves(model.params):
        t.requires_grad_(trains(path))
        if trains(path):
            trainable.append((path, t))
    masters = MasterWeights(trainable)
    optimizer = build_optimizer(masters, cfg.optim, capturable=cfg.trainer.cuda_graph)
    schedule = build_schedule(optimizer, cfg.optim, cfg.trainer.steps)
    start = 0
    if saved is not None:
        load_optimizer_state(optimizer, saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        data.train.load_state_dict(saved["data"])
        kept = [m for m, p in zip(masters.masters, masters.params) if m is not p]
        if [tuple(m.shape) for m in kept] != [tuple(v.shape) for v in saved["masters"]]:
            raise state.CheckpointError(
                f"{ckpt}: its fp32 master weights do not fit this run's trainable tensors; "
                "resume with the config that wrote it"
            )
        for m, value in zip(kept, saved["masters"]):
            m.data.copy_(value)
        start = saved["step"]
        state.restore_rng(saved)
        log.info("moelab: resumed from %s at step %d", ckpt, start)
        if start >= cfg.trainer.steps:  # a finished run: its files stay as they are
            log.info("moelab: nothing to train (trainer.steps=%d)", cfg.trainer.steps)
            done = run_dir / "summary.json"
            if done.exists():
                return json.loads(done.read_text())
            return dict(steps=start, final_loss=None, eval_loss=None, tokens_per_s=None)
    if cfg.trainer.cuda_graph:
        # a captured optimizer step reads the learning rate from memory, which the schedule
        # then sets in place between replays (a float would be recorded as a constant)
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)

    scale = lora.alpha / lora.rank if lora.rank else 1.0
    train_opts = ForwardOptions(
        backend=cfg.backend.name,
        lora_scale=scale,
        lora_dropout=lora.dropout if lora.rank else 0.0,
        checkpoint_layers=cfg.trainer.activation_checkpointing,
        moe_recompute=cfg.trainer.moe_recompute,
    )
    eval_opts = dataclasses.replace(
        train_opts, lora_dropout=0.0, checkpoint_layers=False, moe_recompute=False
    )
    n_total, n_train = tree.count(model.params), sum(t.numel() for _, t in trainable)
    mode = "full" if lora.rank is None else f"LoRA r={lora.rank} on {', '.join(lora.targets)}"
    log.info(
        "moelab: model %s (%s), %.2fM parameters, %.3fM trainable (%s), backend %s, "
        "%s on %s, %d train tokens%s",
        model.config.model_type,
        cfg.model.name,
        n_total / 1e6,
        n_train / 1e6,
        mode,
        backend,
        str(dtype).removeprefix("torch."),
        device,
        data.train_tokens,
        ", steps replayed from a CUDA graph" if cfg.trainer.cuda_graph else "",
    )

    resolved = dataclasses.asdict(cfg)
    resume_step = start if saved is not None else None
    config_file = recorded_config_name(resume_step)
    (run_dir / config_file).write_text(json.dumps(resolved, indent=2) + "\n")
    mark_latest_recorded(run_dir, config_file)
    tracker = Tracker(cfg.logger, run_dir, resolved, resume_step=resume_step)
    run = _Run(
        cfg,
        run_dir,
        model,
        names,
        base_model,
        masters,
        optimizer,
        schedule,
        data,
        train_opts,
        eval_opts,
        tracker,
        device,
    )
    summary = _loop(run, start)
    summary.update(
        parameters=n_total,
        trainable=n_train,
        backend=backend,
        mode=mode,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
    )
    tracker.summary(summary)
    tracker.finish()
    # whole or not at all: a sweep's report reads it to tell finished jobs from the rest
    replace_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    log.info(
        "moelab: done, %d steps, train loss %s, eval loss %s, %s tokens/s; outputs in %s",
        summary["steps"],
        fmt(summary["final_loss"], ".4f"),
        fmt(summary.get("eval_loss"), ".4f"),
        fmt(summary["tokens_per_s"], ".0f"),
        run_dir,
    )
    return summary


@dataclasses.dataclass
class _Run:
    """Everything the loop works with, built by :func:`train`."""

    cfg: RunConfig
    run_dir: Path
    model: Model
    names: object  # the family's adapter layout
    base_model: str | None
    masters: MasterWeights
    optimizer: torch.optim.Optimizer
    schedule: object
    data: object
    train_opts: ForwardOptions
    eval_opts: ForwardOptions
    tracker: Tracker
    device: torch.device


def _loop(run: _Run, start: int) -> dict:
    cfg, model, data, device = run.cfg, run.model, run.data, run.device
    optimizer, schedule, tracker = run.optimizer, run.schedule, run.tracker
    eval_opts = run.eval_opts
    t = cfg.trainer
    tokens_per_step = data.micro_batch_tokens * t.grad_accum
    window = _Window(device)
    step_fn = functools.partial(_train_step, run, window)
    train_step = CapturedStep(step_fn) if t.cuda_graph else step_fn
    eval_loss, postfix = None, {}
    if start == 0:  # the untrained baseline, so the eval curve starts where training does
        with window.not_timed():
            tracker.log({"eval_loss": evaluate(model, data.eval, eval_opts, cfg, device)}, 0)
    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    for step in range(start, t.steps):
        lr = float(schedule.get_last_lr()[0])  # the rate this step trains at
        train_step(_stack([data.train.next() for _ in range(t.grad_accum)]).to(device))
        schedule.step()
        window.end_step(t.grad_accum)
        done = step + 1
        if done % t.log_interval == 0 or done == t.steps:
            record = window.flush(tokens_per_step, lr)
            tracker.log(record, done)
            postfix.update(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.set_postfix(postfix)
        if done % t.eval_interval == 0 or done == t.steps:
            with window.not_timed():
                eval_loss = evaluate(model, data.eval, eval_opts, cfg, device)
            tracker.log({"eval_loss": eval_loss}, done)
            postfix["eval"] = f"{eval_loss:.3f}"
            bar.set_postfix(postfix)
        if (t.checkpoint_interval and done % t.checkpoint_interval == 0) or done == t.steps:
            with window.not_timed():
                resume_state = _resume_state(optimizer, schedule, data, run.masters, cfg.lora)
                # fmt: off
                state.save(run.run_dir, done, model, cfg.lora, run.names, resume_state,
                           run.base_model)
                # fmt: on
        bar.update(1)
    bar.close()
    return {
        "final_loss": window.last_loss,
        "eval_loss": eval_loss,
        "steps": t.steps,
        "tokens_per_s": window.overall_tokens_per_s(),
        "peak_mem_mib": window.peak_mib(),
    }


def _stack(batches: list[Batch]) -> torch.Tensor:
    """A step's micro-batches as one ``[A, 3, B, S]`` tensor (input ids, labels, document ids):
    one copy to the device, and one fixed-shape input for a captured step."""
    return torch.stack([torch.stack((b.input_ids, b.labels, b.document_ids)) for b in batches])


def _train_step(run: _Run, window: _Window, batches_A3BS: torch.Tensor) -> None:
    """One optimizer step over the micro-batches: no host synchronisation and no host-side
    state, so that a CUDA graph can replay it (the window's sums are added in place)."""
    cfg, masters, optimizer = run.cfg, run.masters, run.optimizer
    micro = batches_A3BS.shape[0]
    # NOTE: every counted token of the step weighs the same, as in one batch of all its rows:
    # each micro-batch's CE sum is divided by the step's mean count per micro-batch (then by
    # ``micro`` below). Its own count would over-weight the tokens of a micro-batch with fewer
    # counted tokens. A device tensor: no host synchronisation (a CUDA graph replays it).
    ce_tokens = (batches_A3BS[:, 1] != IGNORE_LABEL).sum().clamp_min(1) / micro
    for input_ids, labels, document_ids in batches_A3BS:
        batch = Batch(input_ids, labels, document_ids)
        loss, ce_sum, count, stats = step_loss(run.model, batch, run.train_opts, cfg, ce_tokens)
        (loss / micro).backward()
        masters.grads_to_masters()  # summed in fp32 across micro-batches
        window.add(loss.detach(), ce_sum.detach(), count, stats)
    grad_norm = torch.nn.utils.clip_grad_norm_(masters.masters, cfg.optim.grad_clip)
    window.add_grad_norm(grad_norm.detach())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    masters.masters_to_params()


def _resume_state(optimizer, schedule, data, masters: MasterWeights, lora) -> dict:
    """What a resume needs beyond the exported model: optimizer, schedule, data position, the
    fp32 masters of bf16 params, and in LoRA runs the trained tensors themselves."""
    optimizer_state, schedule_state = optimizer.state_dict(), schedule.state_dict()
    # a graphed run keeps learning rates in device tensors: saved as floats, so that either
    # kind of run resumes from either
    for group in optimizer_state["param_groups"]:
        group["lr"] = float(group["lr"])
    schedule_state["_last_lr"] = [float(lr) for lr in schedule_state["_last_lr"]]
    resume = {
        "optimizer": optimizer_state,
        "schedule": schedule_state,
        "data": data.train.state_dict(),
        "masters": [
            m.detach().cpu() for m, p in zip(masters.masters, masters.params) if m is not p
        ],
    }
    if lora.rank is not None:
        resume["trained"] = {
            tree.dotted(p): t.detach().cpu() for p, t in zip(masters.paths, masters.params)
        }
    return resume


class _Window:
    """Device-side sums over the steps since the last log line, synced only when flushed. The
    sums are added in place (a replayed CUDA graph adds into the tensors it recorded); the
    step and micro-batch counts are the host's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total_tokens, self.total_seconds = 0, 0.0
        self.last_loss = None
        z = torch.zeros((), device=device)
        self.loss, self.ce, self.count, self.grad_norm = z.clone(), z.clone(), z.clone(), z.clone()
        self.aux, self.z_loss, self.entropy = z.clone(), z.clone(), z.clone()
        self.counts: dict[int, torch.Tensor] = {}  # per layer, made at the first step
        self._restart()

    def _restart(self) -> None:
        self.micro, self.steps = 0, 0
        self.t0, self.untimed = time.perf_counter(), 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def not_timed(self) -> Iterator[None]:
        """Work inside (evaluation, checkpoints) does not count toward the steps' time; the
        steps queued before it are waited for first, so their time does."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.untimed += time.perf_counter() - start

    def add(
        self,
        loss: torch.Tensor,
        ce_sum: torch.Tensor,
        count: torch.Tensor,
        stats: list[RouterStats],
    ) -> None:
        self.loss += loss
        self.ce += ce_sum
        self.count += count
        for layer, s in enumerate(stats):
            self.aux += s.aux_loss.detach() / len(stats)
            self.z_loss += s.z_loss.detach() / len(stats)
            self.entropy += s.entropy / len(stats)
            if layer not in self.counts:
                self.counts[layer] = torch.zeros_like(s.counts)
            self.counts[layer] += s.counts

    def add_grad_norm(self, grad_norm: torch.Tensor) -> None:
        self.grad_norm += grad_norm

    def end_step(self, micro_batches: int) -> None:
        self.micro += micro_batches
        self.steps += 1

    def flush(self, tokens_per_step: int, lr: float) -> dict:
        """The window's record: means over its steps, ``lr`` the rate its last step used."""
        self._sync()
        seconds = time.perf_counter() - self.t0 - self.untimed
        steps = max(1, self.steps)
        rate = tokens_per_step * steps / seconds
        self.total_tokens += tokens_per_step * steps
        self.total_seconds += seconds
        self.last_loss = (self.ce / self.count.clamp_min(1)).item()
        record = {
            "loss": self.last_loss,
            "total_loss": (self.loss / self.micro).item(),
            "aux_loss": (self.aux / self.micro).item(),
            "z_loss": (self.z_loss / self.micro).item(),
            "router_entropy": (self.entropy / self.micro).item(),
            "grad_norm": (self.grad_norm / steps).item(),
            "lr": lr,
            "tokens_per_s": rate,
            "step_ms": 1e3 * seconds / steps,
            "peak_mem_mib": self.peak_mib(),
            "expert_load": {
                layer: (c.float() / c.sum()).tolist() for layer, c in self.counts.items()
            },
        }
        sums = (self.loss, self.ce, self.count, self.grad_norm, self.aux, self.z_loss, self.entropy)
        for t in (*sums, *self.counts.values()):
            t.zero_()
        self._restart()
        return record

    def peak_mib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def overall_tokens_per_s(self) -> float | None:
        """All the steps' tokens over all their time (not a mean of the windows' rates)."""
        return self.total_tokens / self.total_seconds if self.total_seconds else None
