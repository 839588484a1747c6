"""Hydra callback shared by the entry points (config registration: pma_train/conf)."""

from __future__ import annotations

from hydra.experimental.callback import Callback

from pma_train.slurm_env import torch_env_from_slurm


class SlurmEnv(Callback):
    """Hydra callback (conf/train.yaml, conf/merge.yaml): torch_env_from_slurm() in the job's process,
    before its config is validated (validation reads WORLD_SIZE)."""

    def on_job_start(self, config, **kwargs) -> None:
        torch_env_from_slurm()
