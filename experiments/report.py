"""Compare the jobs of a Hydra multirun: ``python experiments/report.py <multirun folder>``.

Writes ``report.md`` (one row per job: overrides, losses, tokens/s, step time, peak memory,
trainable parameters), ``loss.png`` (train and eval loss against step) and ``throughput.png``
(tokens/s and peak GPU memory by backend and LoRA rank) into the folder (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from moelab.train.config import latest_recorded_config  # noqa: E402


def load_jobs(folder: Path) -> list[dict]:
    jobs = []
    for summary_file in sorted(folder.glob("*/summary.json"), key=lambda p: p.parent.name):
        job_dir = summary_file.parent
        # the run's own records first: Hydra rewrites its .hydra files when a run is resumed
        ours, hydras = job_dir / "overrides.json", job_dir / ".hydra" / "overrides.yaml"
        if ours.exists():
            overrides = json.loads(ours.read_text())
        else:
            overrides = yaml.safe_load(hydras.read_text()) if hydras.exists() else []
        records = [
            json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()
        ]
        recorded = latest_recorded_config(job_dir)
        if recorded.exists():
            config = json.loads(recorded.read_text())
        else:
            config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
        jobs.append(
            {
                "job": job_dir.name,
                "overrides": " ".join(overrides) or "(defaults)",
                "summary": json.loads(summary_file.read_text()),
                "train": [r for r in records if "loss" in r],
                "eval": [r for r in records if "eval_loss" in r],
                "backend": config["backend"]["name"],
                "rank": config["lora"]["rank"],
            }
        )
    if not jobs:
        raise SystemExit(f"no finished jobs (*/summary.json) under {folder}")
    return jobs


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(jobs: list[dict]) -> str:
    lines = [
        "| job | overrides | backend | LoRA rank | final loss | eval loss | tokens/s | step ms "
        "| peak MiB | trainable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for j in jobs:
        s = j["summary"]
        step_ms = statistics.median(r["step_ms"] for r in j["train"]) if j["train"] else None
        lines.append(
            f"| {j['job']} | `{j['overrides']}` | {s['backend']} | {j['rank'] or 'full'} "
            f"| {_fmt(s['final_loss'], '.4f')} | {_fmt(s['eval_loss'], '.4f')} "
            f"| {_fmt(s['tokens_per_s'], ',.0f')} | {_fmt(step_ms, '.1f')} "
            f"| {_fmt(s['peak_mem_mib'], ',.0f')} | {s['trainable']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot_losses(jobs: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for j in jobs:
        label = f"{j['job']}: {j['overrides']}"
        (line,) = ax.plot(
            [r["step"] for r in j["train"]], [r["loss"] for r in j["train"]], label=label, alpha=0.8
        )
        ax.plot(
            [r["step"] for r in j["eval"]],
            [r["eval_loss"] for r in j["eval"]],
            "o--",
            color=line.get_color(),
            markersize=3,
        )
    ax.set(xlabel="step", ylabel="loss (train solid, eval dashed)", title="loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


def plot_throughput(jobs: list[dict], out: Path) -> None:
    labels = [f"{j['backend']}\nr={j['rank'] or 'full'}" for j in jobs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(labels, [j["summary"]["tokens_per_s"] or 0 for j in jobs])
    axes[0].set(title="tokens/s by backend and LoRA rank", ylabel="tokens/s")
    peaks = [j["summary"]["peak_mem_mib"] for j in jobs]
    if any(p is not None for p in peaks):
        axes[1].bar(labels, [p or 0 for p in peaks])
        axes[1].set(title="peak GPU memory", ylabel="MiB")
    else:
        axes[1].text(0.5, 0.5, "no GPU: peak memory not measured", ha="center", va="center")
        axes[1].set_axis_off()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a Hydra multirun folder")
    parser.add_argument("--out", type=Path, default=None, help="default: the folder itself")
    args = parser.parse_args(argv)
    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    jobs = load_jobs(args.folder)
    table = markdown(jobs)
    (out / "report.md").write_text(
        f"# {args.folder}\n\n{table}\n![loss](loss.png)\n\n![throughput](throughput.png)\n"
    )
    plot_losses(jobs, out)
    plot_throughput(jobs, out)
    print(table)
    print(f"wrote {out / 'report.md'}, {out / 'loss.png'}, {out / 'throughput.png'}")


if __name__ == "__main__":
    main()
