"""``python -m moelab.bench <experts|stages|plot|load|train> [options]``: benchmarks of moelab."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import torch

from moelab.bench import compiled, experts, load_memory, plot, stages, train_step
from moelab.kernels import registry

# the systems ``train --systems`` takes
_TRAIN_SYSTEMS = (*train_step._MOELAB_SYSTEMS, "hf:grouped_mm", "hf:eager")


class UsageError(ValueError):
    """A bad argument, found before any work starts: the command line shows it as a usage
    error, without a traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelab.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    experts.add_arguments(sub.add_parser("experts", help="one MoE block, fwd+bwd, per backend"))
    load_memory.add_arguments(sub.add_parser("load", help="peak RSS of load_pretrained on CPU"))
    train_step.add_arguments(sub.add_parser("train", help="a training step vs Transformers"))
    stages.add_arguments(sub.add_parser("stages", help="the triton backend's stages, timed"))
    plot.add_arguments(sub.add_parser("plot", help="ms against tokens from experts --json files"))
    args = parser.parse_args(argv)
    check_arguments(args)
    if args.bench == "load":
        load_memory.run(args)
        return 0
    if args.bench == "plot":
        plot.run(args)
        return 0
    if args.bench == "stages":
        stages.print_table(stages.run(args))
        return 0
    if args.bench == "train":
        train_step.print_table(train_step.run(args))
        return 0
    rows = experts.run(args)
    experts.print_table(rows)
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Raise UsageError naming the first argument the benchmark cannot run with."""
    if args.bench == "experts":
        _ints("--tokens", args.tokens, 1)
        modes = _names("--mode", args.mode, ("lora", "full"))
        _int("--rank", args.rank, 1 if "lora" in modes else 0)
        if args.backends:
            _names("--backends", args.backends, (*registry.BACKENDS, compiled.NAME))
        _int("--iters", args.iters, 1)
        _int("--check-tokens", args.check_tokens, 1)
        _int("--sustain", args.sustain, 0)
        if not math.isfinite(args.cooldown) or args.cooldown < 0:
            raise UsageError(f"--cooldown {args.cooldown}: expected seconds >= 0")
        if args.graph and args.graphed_block:
            raise UsageError(
                "--graph (the whole step from one graph) and --graphed-block (an eager loop over "
                "the block's own graphs) time different things: pass one"
            )
        unrecordable = set(experts.NOT_RECORDABLE) & set((args.backends or "").split(","))
        if args.graphed_block and unrecordable:
            raise UsageError(
                f"--graphed-block with --backends {','.join(sorted(unrecordable))}: "
                "native_torch reads expert counts on the host and the compiled pipeline is "
                "torch.compile's; neither can be recorded as the block's graphs"
            )
        device = _device(args.device)
        for flag, on in (("--graph", args.graph), ("--graphed-block", args.graphed_block)):
            if on and device.type != "cuda":
                raise UsageError(
                    f"{flag} replays CUDA graphs: it needs a CUDA device, not {device}"
                )
        dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        if compiled.NAME in (args.backends or "").split(",") and dtype != "bfloat16":
            raise UsageError(
                f"--backends {compiled.NAME}: torch.compile traces torch {torch.__version__}'s "
                f"grouped_mm in bfloat16 only, not {dtype} (--dtype bfloat16)"
            )
    elif args.bench == "stages":
        _int("--tokens", args.tokens, 1)
        _int("--rank", args.rank, 1 if args.mode == "lora" else 0)
        _int("--iters", args.iters, 1)
        _int("--repeat", args.repeat, 1)
        reason = registry.machine_reason("triton")
        if reason is not None:
            raise UsageError(f"stages times the triton backend's kernels, which {reason}")
    elif args.bench == "train":
        _int("--layers", args.layers, 1)
        _ints("--seq", str(args.seq), 1)
        _int("--rank", args.rank, 1 if args.mode == "lora" else 0)
        _int("--warmup", args.warmup, 0)
        _int("--steps", args.steps, 1)
        if not args.budget_gb >= 0:
            raise UsageError(f"--budget-gb {args.budget_gb}: expected >= 0 (0: no search)")
        systems = _names("--systems", args.systems, _TRAIN_SYSTEMS)
        device = _device(args.device)
        graphed = [s for s in systems if s.endswith(":graph")]
        if graphed and device.type != "cuda":
            raise UsageError(f"--systems {','.join(graphed)} needs a CUDA device, not {device}")
    elif args.bench == "load":
        if not args.gb > 0:
            raise UsageError(f"--gb {args.gb}: expected the checkpoint's size in GB, > 0")
        if args.dir is not None and not os.path.isdir(args.dir):
            raise UsageError(f"--dir {args.dir}: not a folder")
    elif args.bench == "plot":
        missing = [f for f in args.files if not os.path.isfile(f)]
        if missing:
            raise UsageError(f"no such file: {', '.join(missing)}")


def _int(flag: str, value: int, least: int) -> None:
    if value < least:
        raise UsageError(f"{flag} {value}: expected an integer >= {least}")


def _ints(flag: str, text: str, least: int) -> list[int]:
    """``text``'s comma-separated integers, each >= ``least``."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < least:
        raise UsageError(f"{flag} {text}: expected comma-separated integers >= {least}")
    return values


def _names(flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UsageError(f"{flag}: unknown {', '.join(unknown)}; expected some of {allowed}")
    return names


def _device(name: str | None) -> torch.device:
    """``--device`` (default: CUDA where there is one), a device this machine has."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UsageError(f"--device {name}: {e}") from None
    present = device.type == "cpu" or (
        device.type == "cuda"
        and torch.cuda.is_available()
        and (device.index or 0) < torch.cuda.device_count()
    )
    if not present:
        raise UsageError(f"--device {name}: expected cpu or a CUDA device this machine has")
    return device


def show_log() -> None:
    """moelab's log lines on stderr: the backend chosen, each launch's first-run tuning cost
    and measured choices (minutes at a new shape, so the wait is visible), as the trainer
    shows them through Hydra's logging."""
    logger = logging.getLogger("moelab")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


if __name__ == "__main__":
    show_log()
    try:
        code = main()
    except UsageError as e:  # a bad argument: the message, not a traceback
        sys.exit(f"python -m moelab.bench: error: {e}")
    sys.exit(code)
