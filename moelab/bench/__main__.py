"""``python -m moelab.bench <benchmark> [options]``; benchmarks: ``experts``."""

from __future__ import annotations

import argparse
import sys

from moelab.bench import experts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelab.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    experts.add_arguments(sub.add_parser("experts", help="one MoE block, fwd+bwd, per backend"))
    args = parser.parse_args(argv)
    rows = experts.run(args)
    experts.print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
