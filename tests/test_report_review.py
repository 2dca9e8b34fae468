"""experiments/report.py on hand-made sweep folders: job order, unfinished jobs, the plots' bars,
and a report written over another."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import report  # noqa: E402

from moelab.train.config import (  # noqa: E402
    LATEST_RECORD,
    latest_recorded_config,
    mark_latest_recorded,
)

HYDRA_TIME = "2026-11-30_18-04-35_158061"  # one command's record, .hydra/<time>/


def make_job(
    sweep: Path,
    name: str,
    overrides: list[str],
    *,
    steps: int = 6,
    backend: str = "native_torch",
    requested: str | None = None,
    rank: int | None = None,
    final_loss: float = 4.5,
    tokens_per_s: float = 20000.0,
    summary: bool = True,
) -> Path:
    """A job folder as experiments/train.py leaves it: Hydra's record, overrides.json,
    run_config.json, a train record per step, evals at 0 and the end, and summary.json."""
    job = sweep / name
    (job / ".hydra" / HYDRA_TIME).mkdir(parents=True)
    (job / ".hydra" / HYDRA_TIME / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "overrides.json").write_text(json.dumps(overrides) + "\n")
    config = {
        "backend": {"name": requested or backend},
        "lora": {"rank": rank},
        "trainer": {"steps": steps},
    }
    (job / "run_config.json").write_text(json.dumps(config) + "\n")
    records = [{"step": 0, "eval_loss": 5.5}]
    records += [{"step": s, "loss": 5.0 - s / 10, "step_ms": 10.0 * s} for s in range(1, steps)]
    records += [{"step": steps, "loss": final_loss, "step_ms": 10.0 * steps}]
    records += [{"step": steps, "eval_loss": final_loss + 0.2}]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        values = {
            "final_loss": final_loss,
            "eval_loss": final_loss + 0.2,
            "steps": steps,
            "tokens_per_s": tokens_per_s,
            "peak_mem_mib": None,
            "parameters": 559872,
            "trainable": 559872,
            "backend": backend,
            "mode": "full" if rank is None else f"LoRA r={rank} on experts, attention",
        }
        (job / "summary.json").write_text(json.dumps(values, indent=2) + "\n")
    return job


def table_rows(text: str) -> list[list[str]]:
    """The cells of the report table's rows (header and separator left out)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]


def test_jobs_are_in_sweep_order_past_ten(tmp_path):
    # Hydra names a sweep's jobs 0, 1, ..., 11: as text, 10 and 11 would come before 2
    for num in range(12):
        make_job(tmp_path, str(num), [f"optim.lr={num}e-4"], final_loss=1.0 + num / 100)
    report.main([str(tmp_path)])
    rows = table_rows((tmp_path / "report.md").read_text())
    assert [r[0] for r in rows] == [str(num) for num in range(12)]
    assert [r[1] for r in rows] == [f"`optim.lr={num}e-4`" for num in range(12)]
    assert [r[4] for r in rows] == [f"{1.0 + num / 100:.4f}" for num in range(12)]


@pytest.fixture
def figures(monkeypatch):
    """The figures report.py draws, kept open to be read."""
    kept, close = [], plt.close
    monkeypatch.setattr(report.plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def test_every_job_has_its_own_throughput_bar(tmp_path, figures):
    # a sweep over a key that is neither backend nor rank: both jobs asked for backend=auto,
    # which resolved to grouped_mm, at the same rank
    for num, rate in enumerate([1000.0, 3000.0]):
        make_job(
            tmp_path, str(num), [f"optim.lr={num + 1}e-3"], backend="grouped_mm",
            requested="auto", tokens_per_s=rate,
        )  # fmt: skip
    report.main([str(tmp_path)])
    (throughput,) = [f for f in figures if f.axes[0].patches]
    bars = sorted(throughput.axes[0].patches, key=lambda b: b.get_x())
    assert len({b.get_x() for b in bars}) == 2  # one bar each, not one drawn over the other
    assert [b.get_height() for b in bars] == [1000.0, 3000.0]
    labels = [t.get_text() for t in throughput.axes[0].get_xticklabels()]
    # the backend the jobs ran, as the table names it (summary.json), not the request
    assert len(labels) == 2 and all("grouped_mm" in t and "auto" not in t for t in labels)
    rows = table_rows((tmp_path / "report.md").read_text())
    assert [r[2] for r in rows] == ["grouped_mm", "grouped_mm"]


def _failed(job: Path) -> None:
    """Stopped (or still running) before its end: no summary, the last record cut short."""
    (job / "summary.json").unlink()
    with open(job / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 4.')


def _resuming(job: Path) -> None:
    """Finished at 6 steps, then resumed for 9 and not done: summary.json is the first
    start's, the records go past it."""
    config = json.loads((job / "run_config.json").read_text())
    config["trainer"]["steps"] = 9
    (job / "run_config.resume_000006.json").write_text(json.dumps(config) + "\n")
    with open(job / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 3.9, "step_ms": 70.0}) + "\n")


def _summary_cut_short(job: Path) -> None:
    """summary.json read while it was being written (or its write stopped half-way)."""
    text = (job / "summary.json").read_text()
    (job / "summary.json").write_text(text[: len(text) // 2])


def _refused(job: Path) -> None:
    """A job the config checks stopped: Hydra's record and nothing of the run's own."""
    for name in ("summary.json", "metrics.jsonl", "run_config.json", "overrides.json"):
        (job / name).unlink()


@pytest.mark.parametrize("damage", [_failed, _resuming, _summary_cut_short, _refused])
def test_unfinished_jobs_are_named_not_reported(tmp_path, damage):
    make_job(tmp_path, "0", ["backend=native_torch"], final_loss=4.25)
    damage(make_job(tmp_path, "1", ["backend=grouped_mm"], final_loss=4.75))
    report.main([str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    rows = table_rows(text)
    assert [(r[0], r[4]) for r in rows] == [("0", "4.2500")]  # only the finished job's numbers
    notes = [line for line in text.splitlines() if "not finished" in line.lower()]
    assert len(notes) == 1 and "`backend=grouped_mm`" in notes[0] and "1" in notes[0]


def test_a_sweep_of_unfinished_jobs_names_them(tmp_path):
    _refused(make_job(tmp_path, "0", ["lora.rank=0"]))
    with pytest.raises(SystemExit, match="0 .*lora.rank=0"):
        report.main([str(tmp_path)])
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("layout", ["one record", "a record per command"])
def test_overrides_without_overrides_json_from_either_hydra_layout(tmp_path, layout):
    job = make_job(tmp_path, "0", ["backend=native_torch", "trainer=smoke"])
    (job / "overrides.json").unlink()
    if layout == "one record":  # .hydra/overrides.yaml, before each command had its own
        (job / ".hydra" / HYDRA_TIME / "overrides.yaml").rename(job / ".hydra" / "overrides.yaml")
    else:  # and a later command's record beside the first (a resume, a refused command)
        later = job / ".hydra" / "2026-12-01_09-00-00_000001"
        later.mkdir()
        (later / "overrides.yaml").write_text(yaml.safe_dump(["trainer.resume=true"]))
    report.main([str(tmp_path)])
    (row,) = table_rows((tmp_path / "report.md").read_text())
    assert row[1] == "`backend=native_torch trainer=smoke`"


def test_a_failed_report_leaves_the_last_one_whole(tmp_path, monkeypatch):
    make_job(tmp_path, "0", ["backend=native_torch"])
    report.main([str(tmp_path)])
    names = ("report.md", "loss.png", "throughput.png")
    before = {name: (tmp_path / name).read_bytes() for name in names}
    make_job(tmp_path, "1", ["backend=grouped_mm"], backend="grouped_mm")

    def broken(jobs, out):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(report, "plot_throughput", broken)
    with pytest.raises(RuntimeError, match="the plot failed"):
        report.main([str(tmp_path)])
    # the last report, table and plots alike, and no temporary file left beside it
    assert {name: (tmp_path / name).read_bytes() for name in names} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", *sorted(names)]


def test_a_mistyped_folder_is_not_created(tmp_path):
    missing = tmp_path / "multirun" / "no such time"
    with pytest.raises(SystemExit, match="no finished jobs"):
        report.main([str(missing)])
    assert not (tmp_path / "multirun").exists()


def _cells(line: str) -> list[str]:
    """A table line's cells, split where markdown splits them: at pipes not escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _metrics_missing(job: Path) -> None:
    (job / "metrics.jsonl").unlink()


def _metrics_empty(job: Path) -> None:
    (job / "metrics.jsonl").write_text("")


def _metrics_corrupt_line(job: Path) -> None:
    lines = (job / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[3] = '{"step": 3, "loss": 4.\n'  # a damaged record between whole ones
    (job / "metrics.jsonl").write_text("".join(lines))


def _metrics_not_records(job: Path) -> None:
    with open(job / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n")  # JSON, and not a record


@pytest.mark.parametrize(
    "damage", [_metrics_missing, _metrics_empty, _metrics_corrupt_line, _metrics_not_records]
)
def test_a_finished_job_without_usable_metrics_is_reported_from_its_summary(
    tmp_path, figures, damage
):
    make_job(tmp_path, "0", ["backend=native_torch"], final_loss=4.25)
    damage(make_job(tmp_path, "1", ["backend=grouped_mm"], final_loss=4.75, tokens_per_s=900.0))
    report.main([str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    rows = table_rows(text)
    # both jobs, the damaged one with its summary's numbers and no step time
    assert [(r[0], r[4], r[6], r[7]) for r in rows] == [
        ("0", "4.2500", "20,000", "35.0"),
        ("1", "4.7500", "900", "n/a"),
    ]
    notes = [line for line in text.splitlines() if "metrics.jsonl" in line]
    assert len(notes) == 1 and "1 (" in notes[0] and "0 (" not in notes[0]
    (loss,) = [f for f in figures if f.axes[0].get_title() == "loss"]
    labels = [line.get_label() for line in loss.axes[0].get_lines()]
    assert [label for label in labels if not label.startswith("_")] == ["0: backend=native_torch"]
    assert len(loss.axes[0].get_lines()) == 2  # job 0's train and eval curves, nothing of job 1


def test_every_finished_job_without_metrics_still_makes_a_loss_plot(tmp_path, figures):
    _metrics_missing(make_job(tmp_path, "0", ["backend=native_torch"]))
    report.main([str(tmp_path)])
    (loss,) = [f for f in figures if f.axes[0].get_title() == "loss"]
    assert not loss.axes[0].get_lines() and loss.axes[0].get_legend() is None
    assert any("metrics" in t.get_text() for t in loss.axes[0].texts)
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("value", ["a|b", "a\nb", "a\r\nb|c"])
def test_an_override_with_a_pipe_or_newline_keeps_the_table_columns(tmp_path, value):
    make_job(tmp_path, "0", [f"model.name={value}", "backend=native_torch"], final_loss=4.25)
    make_job(tmp_path, "1", ["backend=grouped_mm"], final_loss=4.75)
    report.main([str(tmp_path)])
    table = [line for line in (tmp_path / "report.md").read_text().splitlines() if "|" in line]
    assert len(table) == 4  # header, separator, one line per job
    assert {len(_cells(line)) for line in table} == {10}
    first = _cells(table[2])
    assert first[0] == "0" and first[4] == "4.2500"
    # the value still readable: a pipe escaped, a line break written as \n
    shown = value.replace("|", "\\|").replace("\r\n", "\\n").replace("\n", "\\n")
    assert first[1] == f"`model.name={shown} backend=native_torch`"


UNKNOWN = "unknown (resumed before overrides were recorded)"


def _resumed_to(job: Path, steps: int, command: list[str]) -> None:
    """``job`` (6 steps) resumed at step 6 for ``steps`` and finished, by ``command``."""
    config = json.loads((job / "run_config.json").read_text())
    config["trainer"]["steps"] = steps
    (job / "run_config.resume_000006.json").write_text(json.dumps(config) + "\n")
    summary = json.loads((job / "summary.json").read_text())
    (job / "summary.json").write_text(json.dumps({**summary, "steps": steps}) + "\n")
    later = job / ".hydra" / "2026-12-01_09-00-00_000001"
    later.mkdir()
    (later / "overrides.yaml").write_text(yaml.safe_dump(command))


@pytest.mark.parametrize(
    "hydra_first, shown",
    [
        # the start's own Hydra record kept (.hydra/overrides.yaml, before per-command records)
        (["backend=grouped_mm", "optim.lr=1e-3"], "`backend=grouped_mm optim.lr=1e-3`"),
        # an older resume rewrote it: the start's overrides are nowhere
        (["trainer.resume=true"], UNKNOWN),
        (["trainer.resume_from=/runs/a/checkpoints"], UNKNOWN),
    ],
)
def test_a_run_resumed_before_overrides_were_recorded_shows_no_resume_command(
    tmp_path, hydra_first, shown
):
    make_job(tmp_path, "0", ["backend=native_torch"])
    job = make_job(tmp_path, "1", [])
    # started before overrides.json existed (one .hydra/overrides.yaml), resumed since: the
    # resume wrote its own command into overrides.json
    (job / ".hydra" / HYDRA_TIME / "overrides.yaml").unlink()
    (job / ".hydra" / HYDRA_TIME).rmdir()
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(hydra_first))
    command = ["trainer.resume=true", "trainer.steps=9"]
    (job / "overrides.json").write_text(json.dumps(command) + "\n")
    _resumed_to(job, 9, command)
    report.main([str(tmp_path)])
    rows = table_rows((tmp_path / "report.md").read_text())
    assert [(r[0], r[1]) for r in rows] == [("0", "`backend=native_torch`"), ("1", shown)]


def test_a_run_started_from_another_runs_checkpoint_keeps_its_overrides(tmp_path):
    # a new folder's first command may resume from elsewhere: that is its own command
    command = ["trainer.resume_from=/runs/a/checkpoints", "trainer.steps=9"]
    job = make_job(tmp_path, "0", command)
    (job / "run_config.json").rename(job / "run_config.resume_000006.json")
    config = json.loads((job / "run_config.resume_000006.json").read_text())
    config["trainer"]["steps"] = 9
    (job / "run_config.resume_000006.json").write_text(json.dumps(config) + "\n")
    summary = json.loads((job / "summary.json").read_text())
    (job / "summary.json").write_text(json.dumps({**summary, "steps": 9}) + "\n")
    report.main([str(tmp_path)])
    (row,) = table_rows((tmp_path / "report.md").read_text())
    assert row[1] == f"`{' '.join(command)}`"


def _recorded(run_dir: Path, name: str, config: dict) -> None:
    """A config recorded as the trainer records it: the file, then the name of the latest."""
    (run_dir / name).write_text(json.dumps(config) + "\n")
    mark_latest_recorded(run_dir, name)


def test_the_latest_recorded_config_is_the_one_recorded_last(tmp_path):
    """Started for 6 steps, resumed at 6 for 12, then resumed from its step-3 checkpoint for 8:
    the last resume has the lower step in its name. A copy of the folder (new file times, in
    any order) gives the same answer; a folder from before the index goes by step."""
    base = {"backend": {"name": "native_torch"}, "lora": {"rank": None}}
    run = tmp_path / "run"
    run.mkdir()
    _recorded(run, "run_config.json", {**base, "trainer": {"steps": 6}})
    assert latest_recorded_config(run) == run / "run_config.json"
    _recorded(run, "run_config.resume_000006.json", {**base, "trainer": {"steps": 12}})
    _recorded(run, "run_config.resume_000003.json", {**base, "trainer": {"steps": 8}})
    assert latest_recorded_config(run) == run / "run_config.resume_000003.json"
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in sorted(run.iterdir(), reverse=True):  # copied without times, in another order
        (copy / path.name).write_bytes(path.read_bytes())
    assert latest_recorded_config(copy) == copy / "run_config.resume_000003.json"
    # an index naming no recorded config (damaged, or its file removed): by step, as before it
    for text in ("../summary.json\n", "run_config.resume_000009.json\n", "\xff"):
        (copy / LATEST_RECORD).write_text(text)
        assert latest_recorded_config(copy) == copy / "run_config.resume_000006.json"
    (copy / LATEST_RECORD).unlink()
    assert latest_recorded_config(copy) == copy / "run_config.resume_000006.json"
    for name in ("run_config.resume_000006.json", "run_config.resume_000003.json"):
        (copy / name).unlink()
    assert latest_recorded_config(copy) == copy / "run_config.json"
    (copy / "run_config.json").unlink()
    assert latest_recorded_config(copy) == copy / "run_config.json"  # none yet: the first's name


def test_a_job_resumed_from_an_earlier_checkpoint_is_reported_by_its_last_config(tmp_path):
    job = make_job(tmp_path, "0", ["backend=native_torch"], steps=8, final_loss=3.5)
    config = json.loads((job / "run_config.json").read_text())
    config["trainer"]["steps"] = 6
    _recorded(job, "run_config.json", config)
    config["trainer"]["steps"] = 12
    _recorded(job, "run_config.resume_000006.json", config)
    config["trainer"]["steps"] = 8  # the summary's: this last command finished
    _recorded(job, "run_config.resume_000003.json", config)
    report.main([str(tmp_path)])
    (row,) = table_rows((tmp_path / "report.md").read_text())
    assert (row[0], row[4]) == ("0", "3.5000")


def test_a_resume_never_records_its_command_as_the_runs_overrides(tmp_path, monkeypatch):
    """A run started before overrides.json existed must not get its first resume's command
    recorded as how it was started; a new start records its own, a resume keeps it."""
    import train

    def record(run_dir, overrides: list[str], resuming: bool) -> None:
        monkeypatch.setattr(train, "task_overrides", lambda: overrides)
        train.record_overrides(run_dir, resuming)

    started, first = tmp_path / "started", tmp_path / "first"
    started.mkdir()
    (started / "run_config.json").write_text("{}")  # a run from before overrides.json
    record(started, ["trainer.resume=true"], resuming=True)
    assert not (started / "overrides.json").exists()
    record(first, ["lora.rank=8"], resuming=False)
    record(first, ["trainer.resume=true", "trainer.steps=20"], resuming=True)
    assert json.loads((first / "overrides.json").read_text()) == ["lora.rank=8"]
    # a folder's first command may go on from another run's checkpoint: it is the start
    record(tmp_path / "new", ["trainer.resume_from=/x/checkpoints/step_3"], resuming=True)
    recorded = json.loads((tmp_path / "new" / "overrides.json").read_text())
    assert recorded == ["trainer.resume_from=/x/checkpoints/step_3"]
