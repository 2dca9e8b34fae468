"""Train a moelab model: ``python experiments/train.py [group=option ...] [key=value ...]``.

With no arguments: the tiny Qwen3-MoE-shaped model from scratch on this interpreter's
standard-library sources (byte tokens), GPU if present. Sweeps: ``-m backend=a,b lora.rank=4,16``
(jobs run one after another in this process), then ``python experiments/report.py <folder>``.
Composes the config with Hydra and hands a plain dataclass to ``moelab.train``; nothing else.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moelab.train.config import RunConfig, validate
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


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    run = run_config(cfg)
    try:
        validate(run)
    except ValueError as e:  # a bad value stops the run before any work starts
        log.error("config error: %s", e)
        sys.exit(f"config error: {e}")
    summary = train(run, HydraConfig.get().runtime.output_dir)
    return summary["eval_loss"]


if __name__ == "__main__":
    main()
