"""experiments/report.py on hand-made sweep folders: job order, unfinished jobs, the plots' bars,
and a report written over another."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import report  # noqa: E402

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
