"""Process groups: torch.distributed + megatron-core's model-parallel state, and RNG seeding."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from pma_train.config import ParallelConfig
from pma_train.platform import Platform, init_process_group


# megatron-core warnings that say nothing actionable about a pma-train run.
_QUIET_LOGGERS = ("megatron.core.rerun_state_machine", "megatron.core.dist_checkpointing.strategies.torch")


def init_distributed(parallel: ParallelConfig, platform: Platform, seed: int) -> None:
    """Start (or reuse) the default process group and megatron-core's parallel groups."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    init_process_group(platform.backend, platform.device if platform.is_cuda else None)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        expert_model_parallel_size=parallel.ep,
    )
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    # Same seed on every rank: data order and layout-invariant init depend on it only.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
