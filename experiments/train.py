"""Train a moelab model: ``python experiments/train.py [group=option ...] [key=value ...]``.

With no arguments: the tiny Qwen3-MoE-shaped model from scratch on this interpreter's
standard-library sources (byte tokens), GPU if present. Sweeps: ``-m backend=a,b lora.rank=4,16``
(jobs run one after another in this process), then ``python experiments/report.py <folder>``.
Composes the config with Hydra and hands a plain dataclass to ``moelab.train``; nothing else.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moelab.train.config import (
    RunConfig,
    check_run_dir,
    config_warnings,
    latest_recorded_config,
    resumes,
    validate,
)
from moelab.train.trainer import train

log = logging.getLogger("moelab")
ConfigStore.instance().store(name="schema", node=RunConfig)


def run_config(cfg: DictConfig) -> RunConfig:
    """The typed run config; wandb group, job type and tags filled from the Hydra job."""
    run: RunConfig = OmegaConf.to_object(cfg)
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and run.logger.group is None:
        run.logger.group = os.path.basename(os.path.normpath(hc.sweep.dir))
    if run.logger.job_type is None:
        run.logger.job_type = run.backend.name
    if not run.logger.tags:
        lora = f"lora_r{run.lora.rank}" if run.lora.rank else "full"
        run.logger.tags = [
            run.model.name,
            f"backend_{run.backend.name}",
            lora,
            *(f"{k}_{v}" for k, v in hc.runtime.choices.items() if k == "experiment" and v),
        ]
    return run


def task_overrides() -> list[str]:
    """This command's overrides of the run's config (Hydra's own settings left out)."""
    return [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")]


def resumed(cfg: DictConfig) -> DictConfig:
    """A resumed run's config: the one its folder recorded last, with this command's
    ``key=value`` overrides on top (``trainer.steps=...`` to go on longer), not the defaults
    recomposed, which would silently change the run. Config groups cannot change under a run;
    the ones it was started with may be repeated (a sweep resumed job by job)."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    saved = latest_recorded_config(run_dir)
    if not cfg.trainer.resume or cfg.trainer.resume_from is not None or not saved.exists():
        return cfg
    first = run_dir / "overrides.json"
    started_with = json.loads(first.read_text()) if first.exists() else []
    overrides = task_overrides()
    keys = [o.split("=", 1)[0].lstrip("+") for o in overrides]
    changed = [
        o
        for o, k in zip(overrides, keys)
        if o.startswith("~") or (k in hc.runtime.choices and o not in started_with)
    ]
    if changed:
        sys.exit(
            f"config error: a resumed run keeps its recorded config ({saved}); change single "
            f"values with key=value (e.g. backend.name=...), not config groups or deletions: "
            f"{changed}"
        )
    recorded = OmegaConf.merge(OmegaConf.structured(RunConfig), json.loads(saved.read_text()))
    for key in keys:  # the values as Hydra parsed them, not the strings re-read
        if key not in hc.runtime.choices:
            OmegaConf.update(recorded, key, OmegaConf.select(cfg, key), force_add=True)
    return recorded


def record_overrides(run_dir: Path, resuming: bool) -> None:
    """The command's overrides, kept for ``report.py`` as the run's first command gave them
    (Hydra rewrites ``.hydra/overrides.yaml`` when the run is resumed); a new run replaces
    those of an attempt that stopped before training. A resume of a run already recorded here
    writes nothing, even where that run's start predates this file: the resume's command is not
    how the run was started. A first command that resumes another run's checkpoint
    (``trainer.resume_from``) is this folder's start."""
    file = run_dir / "overrides.json"
    if resuming and (file.exists() or latest_recorded_config(run_dir).exists()):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(task_overrides()) + "\n")


def sweep_jobs() -> list[list[str]]:
    """Every job's overrides of this basic-sweeper multirun, as Hydra's sweeper expands them
    (``hydra.sweeper.params`` first, then the command's own, each key's values in order)."""
    hc = HydraConfig.get()
    command = OmegaConf.load(Path(hc.sweep.dir) / "multirun.yaml").hydra.overrides.task
    params = [f"{k}={v}" for k, v in (hc.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(GlobalHydra.instance().config_loader())
    values: dict[str, list[str]] = {}
    for o in parser.parse_overrides([*params, *command]):
        key = o.get_key_element()
        if o.is_discrete_sweep():
            values[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            values[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*values.values())]


def validate_sweep() -> None:
    """The first job of a multirun checks every job's values, so that a bad one stops the
    sweep before any job trains, not after the jobs before it."""
    hc = HydraConfig.get()
    basic = hc.sweeper.get("_target_", "").endswith(".BasicSweeper")
    if hc.mode != RunMode.MULTIRUN or hc.job.num != 0 or not basic:
        return
    for num, job in enumerate(sweep_jobs()):
        run = OmegaConf.to_object(hydra.compose(config_name=hc.job.config_name, overrides=job))
        try:
            validate(run)
        except ValueError as e:
            raise ValueError(f"sweep job #{num} ({' '.join(job)}): {e}") from None


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    run = run_config(resumed(cfg))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:  # a bad value stops the run before any work starts and before anything is written
        validate(run)
        validate_sweep()
        check_run_dir(run, run_dir)
    except ValueError as e:
        log.error("config error: %s", e)
        sys.exit(f"config error: {e}")
    for note in config_warnings(run):
        log.warning("moelab: %s", note)
    record_overrides(run_dir, resumes(run))
    summary = train(run, run_dir)
    return summary["eval_loss"]


if __name__ == "__main__":
    main()
