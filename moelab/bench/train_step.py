"""End-to-end training step: moelab against Transformers v5 + PEFT, same model, same process.

``python -m moelab.bench train --model qwen3-30b-a3b --layers 4 --seq 8192 --mode lora``

Real-width models with reduced depth and random bf16 weights; LoRA r=16 on experts and attention
(or full fine-tune), AdamW, activation checkpointing per layer (system ``moelab:no-ckpt`` keeps
the activations instead), one sequence per step. Reports tokens/s and peak GPU memory (3 warm-up
and 5 timed steps, as ``shared/bench/anchor_e2e.py``) and the host synchronisations of one more
step (CUDA), for each of the comma-separated ``--seq`` (a system stops at its first OOM), and
with ``--budget-gb`` the longest sequence (4096 doubling, then bisection to 4096) that trains
within that much GPU memory. Transformers rows need transformers and peft.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from functools import partial

import torch

from moelab.bench.gpu_clock import clock_log, clock_text
from moelab.bench.step_probes import host_syncs, longest_sequence, profile_step, sync
from moelab.bench.timing import median_ms
from moelab.checkpoints import api
from moelab.kernels import registry
from moelab.models import tree
from moelab.models.options import ForwardOptions
from moelab.ops.attention import attention
from moelab.ops.moe import moe_block
from moelab.train.config import LoraConfig, OptimConfig
from moelab.train.graphs import CapturedStep
from moelab.train.lora import add_lora, trainable_predicate
from moelab.train.loss import chunked_cross_entropy
from moelab.train.optim import MasterWeights, build_optimizer

MODELS = {
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=6144,
        vocab_size=151936,
        max_position_embeddings=262144,
        rope_theta=1e6,
    ),
    "gpt-oss-20b": dict(
        model_type="gpt_oss",
        hidden_size=2880,
        intermediate_size=2880,
        num_local_experts=32,
        num_experts_per_tok=4,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=201088,
        max_position_embeddings=262144,
    ),
    "tiny-gpt-oss": dict(
        model_type="gpt_oss",
        hidden_size=64,
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        sliding_window=16,
        max_position_embeddings=4096,
    ),
    "tiny-qwen3": dict(
        model_type="qwen3_moe",
        hidden_size=64,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=4096,
    ),
}


def hf_config(name: str, layers: int) -> dict:
    return {**MODELS[name], "num_hidden_layers": layers}


class MoelabSystem:
    """moelab's model, LoRA (or full), fp32 masters of the trainable tensors, chunked loss."""

    def __init__(
        self,
        cfg: dict,
        mode: str,
        rank: int,
        backend: str,
        device: torch.device,
        dtype: torch.dtype,
        checkpoint: bool,
        graph: bool = False,
    ) -> None:
        family, _ = api.FAMILIES[cfg["model_type"]]
        self.family = family
        self.cfg = family.Config.from_hf(cfg)
        gen = torch.Generator(device=device).manual_seed(0)
        self.params = family.init_params(self.cfg, dtype=dtype, device=device, generator=gen)
        lora = LoraConfig(
            rank=rank if mode == "lora" else None,
            alpha=2.0 * rank,
            targets=["experts", "attention"],
        )
        if lora.rank is not None:
            add_lora(self.params, lora, gen)
        trains = trainable_predicate(lora)
        trainable = []
        for path, t in tree.leaves(self.params):
            t.requires_grad_(trains(path))
            if trains(path):
                trainable.append((path, t))
        self.masters = MasterWeights(trainable)
        optim = OptimConfig(lr=1e-4, weight_decay=0.0)
        self.optimizer = build_optimizer(self.masters, optim, capturable=graph)
        self.options = ForwardOptions(backend=backend, lora_scale=2.0, checkpoint_layers=checkpoint)
        self.vocab = self.cfg.vocab_size
        # replayed from a CUDA graph, captured by ``capture`` (or the first step of a new shape)
        self.captured = CapturedStep(self.eager_step) if graph else None

    def step(self, ids: torch.Tensor) -> None:
        (self.captured or self.eager_step)(ids)

    def capture(self, ids: torch.Tensor) -> None:
        if self.captured is not None:
            self.captured.capture(ids)

    def eager_step(self, ids: torch.Tensor) -> None:
        h, _ = self.family.hidden_states(self.cfg, self.params, ids, options=self.options)
        weight = self.family.lm_head_weight(self.cfg, self.params)
        loss_sum, count = chunked_cross_entropy(h[0, :-1], weight, ids[0, 1:])
        (loss_sum / count).backward()
        self.masters.grads_to_masters()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.masters.masters_to_params()


class TransformersSystem:
    """Transformers v5 with PEFT LoRA on the stacked experts and attention, as users run it."""

    def __init__(
        self,
        cfg: dict,
        mode: str,
        rank: int,
        experts: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        import transformers

        config_cls = transformers.AutoConfig.for_model(**cfg).__class__
        config = config_cls(**{k: v for k, v in cfg.items() if k != "model_type"})
        # Transformers offers GPT-OSS no sdpa path (sinks): eager is what runs without hub kernels
        attn = "eager" if cfg["model_type"] == "gpt_oss" else "sdpa"
        torch.set_default_dtype(dtype)
        try:  # built on the device: random init of billions of parameters on CPU takes minutes
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(
                    config, attn_implementation=attn
                )
        finally:
            torch.set_default_dtype(torch.float32)
        model.set_experts_implementation(experts)
        model.config.use_cache = False
        if mode == "lora":
            from peft import LoraConfig as PeftLora
            from peft import get_peft_model

            model = get_peft_model(
                model,
                PeftLora(
                    r=rank,
                    lora_alpha=2 * rank,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                ),
            )
        self.model = model.to(device)
        self.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        self.model.enable_input_require_grads()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.vocab = cfg["vocab_size"]

    def step(self, ids: torch.Tensor) -> None:
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def breakdown(runner: MoelabSystem, seq: int, device: torch.device) -> dict:
    """Where a moelab step's time goes: each part timed alone on the step's shapes, forward +
    backward plus the extra forward that per-layer checkpointing recomputes (when on), times
    the layers.
    ``other`` is the rest of the measured step (projections, norms, RoPE, router, launches)."""
    cfg, params, options = runner.cfg, runner.params, runner.options
    cuda = device.type == "cuda"
    dtype = params["embed"]["weight"].dtype
    gen = torch.Generator(device=device).manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_(True)

    def fwd_bwd(fn, *inputs):
        def run():
            out = fn(*inputs)
            out.backward(torch.ones_like(out))
            if options.checkpoint_layers:
                with torch.no_grad():  # the checkpoint's recomputed forward
                    fn(*inputs)

        return median_ms(run, 3, warmup=1, cuda=cuda)

    parts = {}
    layers = params["layers"]
    moe_layers = [p for p in layers if "experts" in p["mlp"]]
    x = rand(seq, cfg.hidden_size)
    parts["MoE blocks"] = len(moe_layers) * fwd_bwd(
        lambda t: moe_block(t, moe_layers[0]["mlp"], cfg.moe(options))[0], x
    )
    q = rand(1, cfg.num_heads, seq, cfg.head_dim)
    k, v = (
        rand(1, cfg.num_kv_heads, seq, cfg.head_dim),
        rand(1, cfg.num_kv_heads, seq, cfg.head_dim),
    )
    kinds = getattr(cfg, "layer_types", ("full_attention",) * len(layers))
    attn_ms = 0.0
    sinks, scale = layers[0]["attn"].get("sinks"), cfg.head_dim**-0.5
    for kind in set(kinds):
        window = cfg.sliding_window if kind == "sliding_attention" else None
        one = fwd_bwd(
            partial(attention, scale=scale, sliding_window=window, sinks_N=sinks), q, k, v
        )
        attn_ms += one * kinds.count(kind)
    parts["attention kernels"] = attn_ms
    head = runner.family.lm_head_weight(cfg, params)
    labels = torch.randint(0, cfg.vocab_size, (seq,), device=device)
    parts["LM head + loss"] = median_ms(
        lambda: chunked_cross_entropy(x, head, labels)[0].backward(), 3, warmup=1, cuda=cuda
    )
    zero_grads = [torch.zeros_like(t) for t in runner.masters.params]

    def optimizer_step():  # as the trainer's: gradients in, step, masters cleared, params out
        for t, g in zip(runner.masters.params, zero_grads):
            t.grad = g
        runner.masters.grads_to_masters()
        runner.optimizer.step()
        runner.optimizer.zero_grad(set_to_none=True)
        runner.masters.masters_to_params()

    parts["optimizer"] = median_ms(optimizer_step, 3, warmup=1, cuda=cuda)
    return {name: round(ms, 2) for name, ms in parts.items()}


SYSTEMS_HELP = (
    "comma-separated: moelab (activation checkpointing per layer), moelab:no-ckpt (activations "
    "kept), either with :graph (the step replayed from a CUDA graph), hf:grouped_mm, hf:eager "
    "(Transformers + PEFT, gradient checkpointing on)"
)
_MOELAB_SYSTEMS = ("moelab", "moelab:no-ckpt", "moelab:graph", "moelab:no-ckpt:graph")


def build(
    system: str, cfg: dict, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> MoelabSystem | TransformersSystem:
    if system in _MOELAB_SYSTEMS:
        flags = system.split(":")[1:]
        if "graph" in flags and device.type != "cuda":
            raise ValueError(f"{system} needs a CUDA device")
        # fmt: off
        return MoelabSystem(cfg, args.mode, args.rank, args.backend, device, dtype,
                            checkpoint="no-ckpt" not in flags, graph="graph" in flags)
        # fmt: on
    if system not in ("hf:grouped_mm", "hf:eager"):
        raise ValueError(f"unknown system {system!r}; {SYSTEMS_HELP}")
    return TransformersSystem(cfg, args.mode, args.rank, system.split(":")[1], device, dtype)


def measure(
    runner: MoelabSystem | TransformersSystem,
    seq: int,
    device: torch.device,
    warmup: int = 3,
    steps: int = 5,
) -> dict:
    ids = torch.randint(0, runner.vocab, (1, seq), device=device)
    for _ in range(warmup):
        runner.step(ids)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if hasattr(runner, "capture"):
        # a graphed step records here, through the allocator: the peak below is the step's own,
        # as replays allocate nothing
        runner.capture(ids)
        sync(device)
    with clock_log(device) as clock:  # the SM clock the steps ran at (power cap, heat)
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step(ids)
        sync(device)
        seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    sites = host_syncs(lambda: runner.step(ids)) if device.type == "cuda" else None
    return dict(
        step_s=round(seconds, 4),
        tokens_per_s=round(seq / seconds, 1),
        peak_gib=None if peak is None else round(peak, 2),
        host_syncs=None if sites is None else len(sites),
        host_sync_sites=sites,
        clock=clock.summary(),
    )


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = hf_config(args.model, args.layers)
    seqs = [int(s) for s in str(args.seq).split(",")]
    rows = []
    for system in args.systems.split(","):
        runner, built = None, False
        for i, seq in enumerate(seqs):
            row = dict(model=args.model, layers=args.layers, system=system, mode=args.mode, seq=seq)
            try:
                if not built:
                    runner, built = build(system, cfg, args, device, dtype), True
                row.update(measure(runner, seq, device, args.warmup, args.steps))
                if args.breakdown and system.startswith("moelab"):
                    row["breakdown_ms"] = breakdown(runner, seq, device)
                    row["breakdown_ms"]["other"] = round(
                        row["step_s"] * 1e3 - sum(row["breakdown_ms"].values()), 2
                    )
                if args.profile:
                    profile_step(
                        runner, seq, device, f"{args.profile}_{args.model}_{system}_{seq}.txt"
                    )
                if args.budget_gb and device.type == "cuda" and i == len(seqs) - 1:
                    row["max_seq_in_budget"] = longest_sequence(runner, args.budget_gb, device)
                    row["budget_gb"] = args.budget_gb
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
            except ImportError as e:
                row["error"] = f"skipped: {e}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.json:  # after every row: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
            if "error" in row:  # skipped, or out of memory: longer sequences will not fit either
                break
        runner = None
        gc.collect()  # a graphed system and its captured step refer to each other
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'model':<15}{'system':<18}{'mode':<6}{'seq':>7}{'tokens/s':>11}{'peak GiB':>10}"
        f"{'max seq':>9}{'syncs':>7}{'SM MHz':>8}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<15}{r['system']:<18}{r['mode']:<6}{r['seq']:>7}  {r['error']}")
            continue
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        syncs = "n/a" if r.get("host_syncs") is None else r["host_syncs"]
        print(
            f"{r['model']:<15}{r['system']:<18}{r['mode']:<6}{r['seq']:>7}"
            f"{r['tokens_per_s']:>11,.0f}{peak:>10}{r.get('max_seq_in_budget', 'n/a')!s:>9}"
            f"{syncs!s:>7}{clock_text(r.get('clock')):>8}"
        )
    for r in rows:
        if r.get("host_sync_sites"):
            print(f"host syncs of {r['system']} at {r['seq']}: {', '.join(r['host_sync_sites'])}")
    for r in rows:
        if "breakdown_ms" in r:
            print(f"\nwhere a moelab step goes ({r['model']}, {r['seq']} tokens, ms):")
            for name, ms in r["breakdown_ms"].items():
                print(f"  {name:<20}{ms:>10.2f}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", default="8192", help="comma-separated sequence lengths")
    p.add_argument("--mode", default="lora", choices=["lora", "full"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", *registry.BACKENDS),
        help="moelab's expert backend",
    )
    p.add_argument("--systems", default="moelab,hf:grouped_mm,hf:eager", help=SYSTEMS_HELP)
    p.add_argument("--budget-gb", type=float, default=0.0, help="search the longest sequence")
    p.add_argument("--breakdown", action="store_true", help="time moelab's parts separately")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--profile", default=None, help="path prefix: profile one step per row")
