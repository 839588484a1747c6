"""Every random number generator a training step draws from: captured, saved per rank, restored.

A resumed run is exact only if each rank's generators stand where an uninterrupted run has them
at that step. Two things break that unless handled: work between a checkpoint and the next step
that draws random numbers in one run but not the other (evaluation, data loader iterators: every
`iter(DataLoader)` draws a seed from torch's default generator, which on a CPU host is also the
one dropout draws from), and ranks whose generators differ (expert-parallel ranks seed their
expert tracker state by rank). The trainer runs such work under `preserved()`; checkpoints hold
the states of all data-parallel ranks, as Megatron-LM does with --data-parallel-random-init (a
list per (pp, tp) shard, entry i for data-parallel rank i), so either trainer reads the other's.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject


def capture() -> dict:
    """This rank's generator states, in Megatron-LM's `rng_state` layout."""
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        # The tracker mutates the dict it is given: keep our own copy.
        "rng_tracker_states": {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in tracker.items()},
    }


def restore(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tracker = state["rng_tracker_states"]
    if tracker is not None:
        tensor_parallel.get_cuda_rng_tracker().set_states(
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in tracker.items()})


def transferable(saved_tracker: dict, current_tracker: dict) -> bool:
    """Whether a checkpoint's tracker states fit this host's generators. A CUDA host's tracker holds
    CUDA generator states (16 bytes), a CPU host's CPU generator states (docs/cpu-compat.md): a
    checkpoint moved between the two resumes with this host's own device streams instead."""
    return all(key in current_tracker and isinstance(value, torch.Tensor)
               and value.numel() == current_tracker[key].numel() for key, value in saved_tracker.items())


@contextlib.contextmanager
def preserved():
    """Leave every generator as it was: what runs inside does not shift training's random streams."""
    state = capture()
    try:
        yield
    finally:
        restore(state)


def _data_parallel_group():
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def sharded_object() -> ShardedObject:
    """The states of every data-parallel rank of this (pp, tp) shard, written once (replica 0)."""
    group = _data_parallel_group()
    states = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, capture(), group=group)
    pp, tp = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", states, (pp, tp),
                         (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
                         replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def restore_saved(states: list[dict]) -> None:
    """This rank's entry of a checkpoint's list; the first when the data-parallel size changed
    (or the checkpoint holds one entry, as Megatron-LM writes by default)."""
    rank, size = dist.get_rank(_data_parallel_group()), dist.get_world_size(_data_parallel_group())
    state = states[rank] if len(states) == size else states[0]
    if not transferable(state["rng_tracker_states"], tensor_parallel.get_cuda_rng_tracker().get_states()):
        state = {**state, "rng_tracker_states": None, "cuda_rng_state": None}
    restore(state)
