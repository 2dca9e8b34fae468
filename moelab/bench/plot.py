"""Plot benchmark rows.

``python -m moelab.bench plot sweep_*.json --out sweep.png [--mode lora]`` reads ``--json``
files of ``python -m moelab.bench experts`` (rows with ``ms``: milliseconds against tokens per
backend, one panel per shape and mode) or of ``python -m moelab.bench train`` (rows with
``tokens_per_s``: tokens/s and peak memory against sequence length per system and model).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def ms_series(rows: list[dict]) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """Timed rows as ``{(shape, mode): {backend: [(tokens, ms), ...]}}``, tokens ascending; a
    later row of the same backend and token count replaces an earlier one, so sweeps merged
    from several runs list the newest run last. Rows timed with fresh gradients (``--grads
    fresh``) or replayed from a CUDA graph (``--graph``) are series of their own, never merged
    with the eager rows under the anchor's protocol."""
    latest = {(r["shape"], r["mode"], _series(r), r["tokens"]): r["ms"] for r in rows if "ms" in r}
    panels: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = defaultdict(dict)
    for (shape, mode, backend, tokens), ms in sorted(latest.items()):
        panels[shape, mode].setdefault(backend, []).append((tokens, ms))
    return dict(panels)


def _series(row: dict) -> str:
    fresh = ", fresh grads" if row.get("grads") == "fresh" else ""
    return row["backend"] + fresh + (", CUDA graph" if row.get("graph") else "")


def plot_rows(rows: list[dict], out: str) -> None:
    """ms against tokens, one panel per (shape, mode), one line per backend (``ms_series``)."""
    panels = ms_series(rows)
    if not panels:
        raise ValueError("no timed rows (with 'ms') to plot")
    cols = min(2, len(panels))
    rows_ = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(6 * cols, 4.2 * rows_), squeeze=False)
    backends = sorted({b for series in panels.values() for b in series})
    color = {b: f"C{i}" for i, b in enumerate(backends)}  # one colour per backend everywhere
    for ax, ((shape, mode), series) in zip(axes.flat, sorted(panels.items())):
        for backend, points in sorted(series.items()):
            ax.plot(*zip(*points), marker="o", label=backend, color=color[backend])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms per forward + backward")
        ax.set_title(f"{shape}, {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_train_rows(rows: list[dict], out: str) -> None:
    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for r in rows:
        if "tokens_per_s" in r:
            series[f"{r['model']} {r['system']}"].append(
                (r["seq"], r["tokens_per_s"], r.get("peak_gib") or float("nan"))
            )
    if not series:
        raise ValueError("no training-step rows (with 'tokens_per_s') to plot")
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (name, points) in enumerate(sorted(series.items())):
        points.sort()
        seq, tps, gib = zip(*points)
        speed.plot(seq, tps, marker="o", label=name, color=f"C{i}")
        memory.plot(seq, gib, marker="o", label=name, color=f"C{i}")
    for ax, label in ((speed, "tokens/s"), (memory, "peak GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    speed.set_title("training step throughput")
    memory.set_title("peak GPU memory")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    rows = []
    for path in args.files:
        with open(path) as f:
            rows.extend(json.load(f))
    if args.mode:
        rows = [r for r in rows if r.get("mode") == args.mode]
    if any("tokens_per_s" in r for r in rows):
        plot_train_rows(rows, args.out)
    else:
        plot_rows(rows, args.out)
    print(f"wrote {args.out}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="--json outputs of the experts or train benchmark")
    p.add_argument("--out", default="experts_sweep.png")
    p.add_argument("--mode", choices=("lora", "full"), help="only the experts rows of this mode")
