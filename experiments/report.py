"""Compare the jobs of a Hydra multirun: ``python experiments/report.py <multirun folder>``.

Writes ``report.md`` (one row per finished job: overrides, losses, tokens/s, step time, peak
memory, trainable parameters; the jobs not finished named below it), ``loss.png`` (train and
eval loss against step) and ``throughput.png`` (tokens/s and peak GPU memory of each job, with
its backend and LoRA rank) into the folder (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from moelab.files import replace_text  # noqa: E402
from moelab.train.config import latest_recorded_config  # noqa: E402

# what a job folder holds from its first command on (Hydra's record) or from its run
JOB_FILES = (".hydra", "overrides.json", "metrics.jsonl", "summary.json")
PLOTS = ("loss.png", "throughput.png")
UNKNOWN_OVERRIDES = "unknown (resumed before overrides were recorded)"


def _job_order(job_dir: Path) -> tuple[int, int, str]:
    # Hydra numbers a sweep's jobs 0, 1, ..., 10: as text, 10 would come before 2
    name = job_dir.name
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _hydra_record(job_dir: Path, name: str) -> Path:
    """Hydra's ``name`` from the job's first command: ``.hydra/<name>``, or the oldest
    ``.hydra/<time>/<name>`` since each command has a record of its own."""
    single = job_dir / ".hydra" / name
    if single.exists():
        return single
    per_command = sorted(job_dir.glob(f".hydra/*/{name}"))  # time-stamped: name order
    return per_command[0] if per_command else single


def _read(path: Path, parse) -> object | None:
    """``path`` parsed, or None where it is missing or cut short (read while written)."""
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _resume_kind(overrides: list[str]) -> str | None:
    """``"resume"`` or ``"resume_from"`` where these overrides resume a run, else None."""
    for override in overrides:
        key, _, value = str(override).lstrip("+").partition("=")
        value = value.strip().lower()
        if key == "trainer.resume" and value in ("true", "yes", "on", "1"):
            return "resume"
        if key == "trainer.resume_from" and value not in ("", "null", "none", "~"):
            return "resume_from"
    return None


def _resumes_an_earlier_start(job_dir: Path, overrides: list[str]) -> bool:
    """Whether these overrides are a later command's, not the job's first: resume=true needs a
    checkpoint already in the folder, and run_config.json is written by a start that did not
    resume. A first command may resume from another run's checkpoint (resume_from)."""
    kind = _resume_kind(overrides)
    return kind == "resume" or (kind == "resume_from" and (job_dir / "run_config.json").exists())


def _first_overrides(job_dir: Path) -> list[str] | None:
    """The overrides the job was started with, or None where only a resume's are recorded."""
    # the run's own record first: Hydra rewrote its single .hydra/overrides.yaml on a resume
    overrides = _read(job_dir / "overrides.json", json.loads)
    # a run started before overrides.json existed has it from its first resume: that command's
    if overrides is None or _resumes_an_earlier_start(job_dir, overrides):
        overrides = _read(_hydra_record(job_dir, "overrides.yaml"), yaml.safe_load) or []
        if _resumes_an_earlier_start(job_dir, overrides):
            return None
    return overrides


def _valid_record(record: object) -> bool:
    # what the table and the loss plot read of a record
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return (
        isinstance(record, dict)
        and number(record.get("step"))
        and ("loss" not in record or (number(record["loss"]) and number(record.get("step_ms"))))
        and ("eval_loss" not in record or number(record["eval_loss"]))
    )


def _read_metrics(path: Path) -> tuple[list[dict], str | None]:
    """A finished job's records, or none and what is wrong with its file: a finished run
    wrote every record, so a damaged file is not a shorter run, and a part would pass for
    the whole."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return [], "metrics.jsonl missing"
    except (OSError, ValueError) as e:
        return [], f"metrics.jsonl unreadable: {e}"
    records = []
    for num, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not _valid_record(record):
            return [], f"metrics.jsonl corrupt at line {num}"
        records.append(record)
    return records, None if records else "metrics.jsonl empty"


def load_jobs(folder: Path) -> tuple[list[dict], list[dict]]:
    """The finished jobs under a multirun folder, and those not finished (no summary.json of
    their last start: failed, refused, still running or resumed and not done), in job order."""
    dirs = [d for d in folder.iterdir() if d.is_dir()] if folder.is_dir() else []
    dirs = [d for d in dirs if any((d / name).exists() for name in JOB_FILES)]
    finished, unfinished = [], []
    for job_dir in sorted(dirs, key=_job_order):
        overrides = _first_overrides(job_dir)
        shown = UNKNOWN_OVERRIDES if overrides is None else " ".join(overrides) or "(defaults)"
        job = {"job": job_dir.name, "overrides": shown}
        summary = _read(job_dir / "summary.json", json.loads)
        recorded = latest_recorded_config(job_dir)
        if recorded.exists():
            config = _read(recorded, json.loads)
        else:
            config = _read(_hydra_record(job_dir, "config.yaml"), yaml.safe_load)
        # a resume records its config before it trains and rewrites summary.json at its end:
        # until then summary.json is the start before's, and the records go past it
        if summary is None or config is None or summary.get("steps") != config["trainer"]["steps"]:
            unfinished.append(job)
            continue
        records, metrics_problem = _read_metrics(job_dir / "metrics.jsonl")
        job.update(
            summary=summary,
            metrics_problem=metrics_problem,  # None: the records are whole
            train=[r for r in records if "loss" in r],
            eval=[r for r in records if "eval_loss" in r],
            backend=summary["backend"],  # the one it ran (``auto`` resolved), as the table says
            rank=config["lora"]["rank"],
        )
        finished.append(job)
    if not finished:
        raise SystemExit(
            f"no finished jobs (*/summary.json) under {folder}\n{_unfinished_note(unfinished)}"
        )
    return finished, unfinished


def _inline(text: str) -> str:
    # a line break would end the table row (or the note's paragraph) it is written in
    return text.replace("\r\n", "\\n").replace("\r", "\\n").replace("\n", "\\n")


def _cell(text: str) -> str:
    """``text`` as one table cell: a ``|`` escaped, even in a code span, would split it."""
    return _inline(text).replace("|", "\\|")


def _overrides_md(job: dict) -> str:
    overrides = _inline(job["overrides"])
    return overrides if overrides == UNKNOWN_OVERRIDES else f"`{overrides}`"


def _unfinished_note(unfinished: list[dict]) -> str:
    if not unfinished:
        return ""
    jobs = ", ".join(f"{_inline(j['job'])} ({_overrides_md(j)})" for j in unfinished)
    return f"\nNot finished (failed, refused, running, or resumed and not done): {jobs}\n"


def _metrics_note(jobs: list[dict]) -> str:
    damaged = [
        f"{_inline(j['job'])} ({j['metrics_problem']})" for j in jobs if j["metrics_problem"]
    ]
    if not damaged:
        return ""
    return (
        "\nFinished, numbers from summary.json only (no step ms, not in loss.png): "
        f"{', '.join(damaged)}\n"
    )


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(jobs: list[dict], unfinished: list[dict] | None = None) -> str:
    lines = [
        "| job | overrides | backend | LoRA rank | final loss | eval loss | tokens/s | step ms "
        "| peak MiB | trainable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for j in jobs:
        s = j["summary"]
        step_ms = statistics.median(r["step_ms"] for r in j["train"]) if j["train"] else None
        lines.append(
            f"| {_cell(j['job'])} | {_cell(_overrides_md(j))} | {_cell(str(s['backend']))} "
            f"| {j['rank'] or 'full'} "
            f"| {_fmt(s['final_loss'], '.4f')} | {_fmt(s['eval_loss'], '.4f')} "
            f"| {_fmt(s['tokens_per_s'], ',.0f')} | {_fmt(step_ms, '.1f')} "
            f"| {_fmt(s['peak_mem_mib'], ',.0f')} | {s['trainable']:,} |"
        )
    return "\n".join(lines) + "\n" + _metrics_note(jobs) + _unfinished_note(unfinished or [])


def plot_losses(jobs: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = [j for j in jobs if not j["metrics_problem"]]  # the table names the others
    for j in plotted:
        label = _inline(f"{j['job']}: {j['overrides']}")
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
    if plotted:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no job has whole metrics (see report.md)", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


def plot_throughput(jobs: list[dict], out: Path) -> None:
    # the job names the bar: jobs of one backend and rank (a sweep over another key) would
    # share one category, their bars drawn over each other
    labels = [f"{j['job']}\n{j['backend']}\nr={j['rank'] or 'full'}" for j in jobs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(labels, [j["summary"]["tokens_per_s"] or 0 for j in jobs])
    axes[0].set(title="tokens/s by job (backend, LoRA rank)", ylabel="tokens/s")
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
    jobs, unfinished = load_jobs(args.folder)  # first: a mistyped folder is not made
    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(jobs, unfinished)
    # every file is made before any is replaced, each replaced whole, report.md last: a failure
    # half-way leaves the last report as it was, not a new table over old plots or a cut file
    with tempfile.TemporaryDirectory(dir=out, prefix=".report.") as tmp:
        plot_losses(jobs, Path(tmp))
        plot_throughput(jobs, Path(tmp))
        for name in PLOTS:
            os.replace(Path(tmp) / name, out / name)
    replace_text(
        out / "report.md",
        f"# {args.folder}\n\n{table}\n![loss](loss.png)\n\n![throughput](throughput.png)\n",
    )
    print(table)
    print(f"wrote {out / 'report.md'}, {out / 'loss.png'}, {out / 'throughput.png'}")


if __name__ == "__main__":
    main()
