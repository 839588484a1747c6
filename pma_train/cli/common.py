"""Hydra callback shared by the entry points (config registration: pma_train/conf)."""

from __future__ import annotations

from hydra.experimental.callback import Callback

from pma_train.slurm_env import torch_env_from_slurm


class SlurmEnv(Callback):
    """Hydra callback (conf/train.yaml, conf/merge.yaml): torch_env_from_slurm() in the job's process,
    before its config is validated (validation reads WORLD_SIZE)."""

    def on_job_start(self, config, **kwargs) -> None:
        torch_env_from_slurm()


def check_perf_for_host(job) -> None:
    """The perf settings this host cannot honour, named before anything starts (training resolves them
    again, pma_train/train/components.py); on CUDA, CUDA_DEVICE_MAX_CONNECTIONS is set first. A CPU
    host decides without importing megatron-core."""
    import torch

    from pma_train.config.perf import CPU, resolve

    if torch.cuda.is_available():  # as platform.detect decides
        from pma_train.config.perf import cuda_connections
        from pma_train.model.spec import detect_host
        from pma_train.parallel import set_cuda_device_max_connections

        # Before Transformer Engine's import (detect_host) may start CUDA.
        set_cuda_device_max_connections(cuda_connections(job, True),
                                        explicit=job.perf.cuda_device_max_connections is not None)
        resolve(job, detect_host(True))
    else:
        resolve(job, CPU)
