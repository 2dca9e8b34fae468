"""Where a run's numbers go: ``metrics.jsonl`` in the run folder, and wandb (offline by default)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from moelab.files import replace_text
from moelab.train.config import LoggerConfig


class Tracker:
    """Appends every record to ``<run_dir>/metrics.jsonl`` and mirrors it to wandb.

    Per-expert load arrives as ``{layer: [fraction per expert]}`` and goes to wandb as one
    histogram per MoE layer (weights = fractions over expert ids).
    """

    def __init__(
        self, cfg: LoggerConfig, run_dir: Path, config: dict, resume_step: int | None = None
    ):
        path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and path.exists():
            _keep_records_to(path, resume_step)
        self.file = open(path, "a" if resume_step is not None else "w")
        self.run = None
        if cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            # a resumed run continues its wandb run (same id) instead of starting another
            id_file = Path(run_dir) / "wandb_id"
            resuming = resume_step is not None and id_file.exists()
            run_id = id_file.read_text().strip() if resuming else secrets.token_hex(4)
            replace_text(id_file, run_id + "\n")
            self.run = wandb.init(
                id=run_id,
                resume="allow",
                mode=cfg.mode,
                dir=str(run_dir),
                project=cfg.project,
                group=cfg.group,
                job_type=cfg.job_type,
                tags=list(cfg.tags) or None,
                config=config,
                reinit="finish_previous",
            )

    def log(self, record: dict[str, Any], step: int) -> None:
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        if self.run is None:
            return
        import wandb

        flat = {k: v for k, v in record.items() if k != "expert_load"}
        for layer, fractions in record.get("expert_load", {}).items():
            counts = np.asarray(fractions)
            flat[f"expert_load/layer_{layer}"] = wandb.Histogram(
                np_histogram=(counts, np.arange(len(counts) + 1))
            )
        self.run.log(flat, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        self.file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def _keep_records_to(path: Path, step: int) -> None:
    """Drop the records after ``step`` (logged before an interruption, past the checkpoint a run
    resumes from: it logs them again) and a line cut short by the interruption, replacing the
    file by rename."""
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (logged := _step(line)) is not None and logged <= step]
    if len(kept) < len(lines):
        replace_text(path, "".join(kept))


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
