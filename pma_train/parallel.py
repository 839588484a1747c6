"""Starting a job's parallel runtime: the device, torch.distributed's default process group,
megatron-core's model-parallel groups, and RNG seeding.

megatron-core is imported inside the functions that use it: pma-merge and pma-export start a
process group here without paying for (or depending on) megatron-core's import.
"""

from __future__ import annotations

import logging
import os
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


def init_distributed(parallel: ParallelConfig, platform: Platform, seed: int) -> None:
    """Start (or reuse) the default process group and megatron-core's parallel groups on `platform`."""
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
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    # Same seed on every rank: data order and layout-invariant init depend on it only.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
