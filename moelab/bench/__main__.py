"""``python -m moelab.bench <experts|stages|plot|load|train> [options]``: benchmarks of moelab."""

from __future__ import annotations

import argparse
import logging
import sys

from moelab.bench import experts, load_memory, plot, stages, train_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelab.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    experts.add_arguments(sub.add_parser("experts", help="one MoE block, fwd+bwd, per backend"))
    load_memory.add_arguments(sub.add_parser("load", help="peak RSS of load_pretrained on CPU"))
    train_step.add_arguments(sub.add_parser("train", help="a training step vs Transformers"))
    stages.add_arguments(sub.add_parser("stages", help="the triton backend's stages, timed"))
    plot.add_arguments(sub.add_parser("plot", help="ms against tokens from experts --json files"))
    args = parser.parse_args(argv)
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
    sys.exit(main())
