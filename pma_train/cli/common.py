"""Shared set-up of the hydra entry points: schema registration and model presets."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from pma_train.config import DataPrepConfig, EvalConfig, JobConfig, MergeConfig
from pma_train.repro.config import ReproConfig
from pma_train.slurm_env import torch_env_from_slurm

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def model_configs_dir() -> Path:
    """model_configs/ of the repo (or $PMA_MODEL_CONFIGS)."""
    env = os.environ.get("PMA_MODEL_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "model_configs"


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="job_schema", node=JobConfig)
    store.store(name="merge_schema", node=MergeConfig)
    store.store(name="data_schema", node=DataPrepConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="repro_schema", node=ReproConfig)
    directory = model_configs_dir()
    for path in sorted(directory.glob("*.yaml")):
        store.store(group="model", name=path.stem, node=OmegaConf.load(path))


class SlurmEnv(Callback):
    """Hydra callback (conf/train.yaml, conf/merge.yaml): torch_env_from_slurm() in the job's process,
    before its config is validated (validation reads WORLD_SIZE)."""

    def on_job_start(self, config, **kwargs) -> None:
        torch_env_from_slurm()
