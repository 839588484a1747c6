"""Starting a job's parallel runtime: the device, torch.distributed's default process group,
megatron-core's model-parallel groups, and RNG seeding.

megatron-core is imported inside the functions that use it: pma-merge and pma-export start a
process group here without paying for (or depending on) megatron-core's import.
"""

from __future__ import annotations

import logging
import os
import random
from datetime import timedelta

import torch
import torch.distributed as dist

from pma_train import cpu_compat
from pma_train.config import ParallelConfig
from pma_train.platform import Platform
from pma_train.slurm_env import free_port, torch_env_from_slurm

# megatron-core warnings that say nothing actionable about a pma-train run.
_QUIET_LOGGERS = ("megatron.core.rerun_state_machine", "megatron.core.dist_checkpointing.strategies.torch")


def use_platform(platform: Platform) -> None:
    """Make `platform` this process's device for the rest of its life: select the GPU, or on a CPU
    host install the compatibility layer megatron-core needs there (cpu_compat.py)."""
    if platform.is_cuda:
        torch.cuda.set_device(platform.device)
    else:
        cpu_compat.install()


def init_process_group(backend: str, device: torch.device | None = None) -> None:
    """The default process group; a single process without torchrun gets a world of one."""
    if dist.is_initialized():
        return
    torch_env_from_slurm()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), device_id=device)


def set_cuda_device_max_connections(value: int | None, explicit: bool) -> None:
    """Set CUDA_DEVICE_MAX_CONNECTIONS (read when CUDA starts: call before the process group and any
    CUDA work). An environment that says otherwise is an error unless the value was set explicitly
    (perf.cuda_device_max_connections): the automatic value is one megatron-core's TP overlap needs."""
    if value is None:
        return
    current = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if current is not None and current != str(value) and not explicit:
        from pma_train.config import ConfigError

        raise ConfigError(f"perf.cuda_device_max_connections: the environment sets CUDA_DEVICE_MAX_CONNECTIONS="
                          f"{current}, and megatron-core needs {value} here (TP > 1 or TP communication "
                          f"overlap); unset it, or set perf.cuda_device_max_connections={current} to keep it")
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = str(value)


def init_distributed(parallel: ParallelConfig, platform: Platform, seed: int, te_rng_tracker: bool = False) -> None:
    """Start (or reuse) the default process group and megatron-core's parallel groups on `platform`.

    te_rng_tracker: Transformer Engine's RNG tracker (CUDA graphs need it)."""
    from megatron.core import parallel_state

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    use_platform(platform)
    init_process_group(platform.backend, platform.device if platform.is_cuda else None)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        expert_model_parallel_size=parallel.ep,
    )
    seed_everything(seed, te_rng_tracker)


def seed_everything(seed: int, te_rng_tracker: bool = False) -> None:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed_host(seed)
    model_parallel_cuda_manual_seed(seed, te_rng_tracker=te_rng_tracker)


def seed_host(seed: int) -> None:
    """Same seed on every rank: data order and layout-invariant init depend on it only. Python's and
    numpy's generators too (checkpoints carry their states, and user code may draw from them)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
