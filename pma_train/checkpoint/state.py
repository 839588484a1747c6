"""Save and load training state as Megatron-LM compatible torch_dist checkpoints.

Top-level keys follow Megatron-LM (`model` / `model0..`, `optimizer`, `opt_param_scheduler`,
`rng_state`, `iteration`, `args`, `checkpoint_version`), so either trainer can read the other's
checkpoints. Each rank reads and writes only its shards (megatron-core dist_checkpointing); loading
under another TP / PP layout re-shards weights; the optimizer state follows its format
(optimizer_format.py: dp_reshardable by default, fully_reshardable on request).
"""

from __future__ import annotations

import copy
import queue
import shutil
import uuid
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from pma_train.checkpoint import async_save, extra_state, integrity, layout, optimizer_format, readers, rng, sidecar, space
from pma_train.checkpoint.layout import CheckpointError, is_gpt_checkpoint
from pma_train.checkpoint.sidecar import TrainState

CHECKPOINT_VERSION = 3.0
# Model weights are per-parameter whatever the optimizer's format.
SHARDED_METADATA = optimizer_format.sharded_metadata(optimizer_format.DEFAULT)


def _model_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    # A fresh dict per call: megatron caches the current data-parallel group in it (in place).
    return {_model_key(i, len(chunks)): unwrap(c).sharded_state_dict(metadata=dict(SHARDED_METADATA))
            for i, c in enumerate(chunks)}


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    # Sharded keys come from the bare model: the DDP wrapper would add 'module.'.
    return getattr(chunk, "module", chunk)


def build_state_dict(chunks, optimizer, scheduler, train_state: TrainState, args: Namespace | None,
                     is_loading: bool, with_rng: bool = True, optim_format: str = optimizer_format.DEFAULT) -> dict:
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        if is_loading or not _optimizer_has_state(optimizer):
            init_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                                          metadata=optimizer_format.sharded_metadata(optim_format))
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = rng.sharded_object()
    state["iteration"] = train_state.iteration
    state["checkpoint_version"] = CHECKPOINT_VERSION
    state["pma_train"] = asdict(train_state)
    state["num_floating_point_operations_so_far"] = 0
    if args is not None:
        state["args"] = args
    return state


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_has_state(optimizer) -> bool:
    inner = [o.optimizer for o in _inner_optimizers(optimizer) if getattr(o, "optimizer", None) is not None]
    return all(len(o.state) > 0 for o in inner)


def _torch_adam() -> bool:
    """megatron-core's own verdict: torch's Adam (no TE / apex), whose state has a per-parameter `step`."""
    from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER

    return bool(USING_PYTORCH_OPTIMIZER)


def init_optimizer_state(optimizer, per_param_step: bool | None = None) -> None:
    """Create the moments Adam makes lazily at its first step: the sharded state dict needs them
    (saving before any step, or loading into a fresh optimizer). torch's Adam also keeps a
    per-parameter `step`; TE's / apex's FusedAdam keep it in the param group, and a per-parameter one
    breaks their loading (KeyError 'step')."""
    per_param_step = _torch_adam() if per_param_step is None else per_param_step
    for inner in _inner_optimizers(optimizer):
        torch_opt = getattr(inner, "optimizer", None)
        if torch_opt is None:
            continue
        for group in torch_opt.param_groups:
            for param in group["params"]:
                state = torch_opt.state[param]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                if per_param_step:
                    state.setdefault("step", torch.tensor(0.0))


def integer_group_steps(optimizer) -> None:
    # FusedAdam counts steps in the param group as an int; a checkpoint written with torch's Adam
    # (e.g. on CPU) records it as a float.
    for inner in _inner_optimizers(optimizer):
        torch_opt = getattr(inner, "optimizer", None)
        for group in (torch_opt.param_groups if torch_opt is not None else ()):
            if "step" in group and not isinstance(group["step"], torch.Tensor):
                group["step"] = int(group["step"])


def _keep_state_the_loader_leaves_out() -> None:
    """Let both optimizer formats load into torch's Adam (no TE / apex).

    megatron restores Adam's per-parameter `step` from the param groups, then copies the loaded
    tensors into every tensor of the optimizer state, `step` included: the fully reshardable dict
    lacks it (KeyError 'step'), and the dp_reshardable one holds this rank's step from before the load
    (0 in a fresh optimizer), which would overwrite the restored one. `step` and missing keys keep the
    value already restored.
    """
    from collections import defaultdict

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    plain = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(plain, "_pma_tolerant", False):
        return

    def set_states(self, model_param, tensors):
        kept = defaultdict(lambda: None, {k: v for k, v in tensors.items() if k != "step"})
        return plain(self, model_param, kept)

    set_states._pma_tolerant = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _unshare_adam_steps(optimizer) -> None:
    # megatron hands every parameter the same `step` tensor; torch's foreach Adam then adds 1
    # to it once per parameter, and bias correction after a resume is wrong.
    for inner in _inner_optimizers(optimizer):
        torch_opt = getattr(inner, "optimizer", None)
        for state in (torch_opt.state.values() if torch_opt is not None else ()):
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def write_results_in_process() -> None:
    """megatron-core's checkpoint writer hands its results back through a multiprocessing Manager
    queue, started at the first save: a spawned server process (~575 MB, it re-imports the entry
    point) that nothing stops when the job is killed. A synchronous save writes from this process's
    threads, so an in-process queue serves, and no process is spawned."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_strategy():
    """megatron-core's torch_dist writer with each replicated tensor written by one data-parallel rank,
    spread by size (Megatron-LM's --ckpt-fully-parallel-save, its default). Without it the first DP
    rank writes every weight the DP replicas share, and on GPUs stages all of it in its host memory
    (~model bytes); with it each rank writes and stages ~1/DP of them. Which rank writes a tensor
    does not change the checkpoint's contents."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    strategy = get_default_save_sharded_strategy()
    if not parallel_state.model_parallel_is_initialized():  # a model built outside a job (tools, tests)
        return strategy
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    return strategy


def save_checkpoint(root: str | Path, chunks, optimizer, scheduler, train_state: TrainState,
                    args: Namespace | None = None, records: dict | None = None, check_space: bool = True,
                    optim_format: str = optimizer_format.DEFAULT, in_background: bool = False) -> Path:
    """Write iter_XXXXXXX under root on every rank; publish it and move `latest` only when complete.

    With check_space, a save that cannot fit on root's file system stops before writing; a full
    disk met anyway removes the partial temporary and raises DiskFullError on every rank.
    in_background: return once the data is staged in host memory; the write goes on behind training
    and a later async_save.maybe_finalize / wait publishes it (pma_train/checkpoint/async_save.py)."""
    async_save.wait()  # megatron's writer reports through one process-wide queue: one save at a time
    root = Path(root)
    rank = dist.get_rank()
    state = build_state_dict(chunks, optimizer, scheduler, train_state, args, is_loading=False,
                             optim_format=optim_format)
    if optimizer is not None:
        records = {**(records or {}), optimizer_format.SIDECAR_KEY: optimizer_format.record(optimizer, chunks, optim_format)}
    sizes = [0] * dist.get_world_size()
    dist.all_gather_object(sizes, space.state_dict_bytes(state))
    verdict = [_start_save(root, sum(sizes), check_space) if rank == 0 else None]
    dist.broadcast_object_list(verdict, src=0)
    token, need, refusal = verdict[0]
    if refusal is not None:
        raise space.DiskFullError(refusal)
    tmp = layout.temporary_dir(root, train_state.iteration, token)
    if rank == 0:
        tmp.mkdir()
    dist.barrier()
    write_results_in_process()
    final = root / layout.iter_dir_name(train_state.iteration)
    if in_background:
        request = dist_checkpointing.save(state, str(tmp), save_strategy(), async_sharded_save=True,
                                               async_strategy="mcore")
        # What the sidecar records is taken now: training moves train_state on before the publish.
        train_state, records = copy.deepcopy(train_state), copy.deepcopy(records)
        async_save.start(request, lambda complete: _finish_save(complete, tmp, final, root, train_state, records, need))
        return final
    _finish_save(lambda: dist_checkpointing.save(state, str(tmp), save_strategy(), async_sharded_save=False),
                 tmp, final, root, train_state, records, need)
    return final


def _finish_save(write, tmp: Path, final: Path, root: Path, train_state: TrainState, records: dict | None,
                 need: int) -> None:
    """On every rank: complete the write (write()), then rank 0 hashes, records and publishes."""
    rank = dist.get_rank()
    try:
        write()
        dist.barrier()  # rank 0 writes .metadata last: every rank reads it to hash its own files
        checksums = integrity.record_checksums(tmp, write=False)
    except (Exception, CheckpointException) as err:  # raised on every rank when any rank's write fails
        _abandon_save(err, tmp, root, rank, need)
    failure = [_publish_save(tmp, final, root, train_state, records, need, checksums) if rank == 0 else None]
    # A broadcast, not a barrier: every rank learns of a failure on rank 0 instead of waiting forever.
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        full, message = failure[0]
        raise space.DiskFullError(message) if full else CheckpointError(f"saving {final}: {message}")


def _publish_save(tmp: Path, final: Path, root: Path, train_state: TrainState, records: dict | None, need: int,
                  checksums: "integrity.Checksums"):
    """Rank 0: sidecars, completeness check, publish, tracker; None, or (disk full?, message) on failure."""
    try:
        integrity.write_checksums(tmp, checksums)
        sidecar.write(tmp, train_state, records)
        layout.verify_complete(tmp)
        layout.publish(tmp, final)
        layout.write_tracker(root, train_state.iteration)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        full = space.disk_full_message(err, tmp, root, need)
        return (True, full) if full else (False, f"{type(err).__name__}: {err}")
    return None


def _start_save(root: Path, estimate_bytes: int, check_space: bool) -> tuple[str | None, int, str | None]:
    """Rank 0: (token of the temporary, bytes the save needs, None), or (None, need, why it must not start)."""
    need = 0
    try:
        root.mkdir(parents=True, exist_ok=True)
        need, basis = space.expected_need(root, estimate_bytes)
        if check_space:
            space.check_room(root, need, basis)
    except (OSError, CheckpointError) as err:
        return None, need, str(err) if isinstance(err, CheckpointError) else f"checkpoint.dir: {root}: {err}"
    return uuid.uuid4().hex[:8], need, None


def _abandon_save(err: BaseException, tmp: Path, root: Path, rank: int, need: int) -> None:
    """Remove the partial temporary (`latest` still names the previous checkpoint) and raise on every
    rank: a DiskFullError naming the path when the disk filled up (rank 0 judges, from its file system)."""
    message = [None]
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        message = [space.disk_full_message(err, tmp, root, need)]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise space.DiskFullError(message[0]) from err
    raise err


def read_train_state(ckpt_dir: str | Path) -> TrainState:
    """The TrainState of a checkpoint (ours, or Megatron-LM's from its args)."""
    ckpt_dir = layout.resolve_checkpoint(ckpt_dir)
    recorded = sidecar.read_train_state(ckpt_dir)
    if recorded is not None:
        return recorded
    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    if "pma_train" in common:
        return TrainState(**common["pma_train"])
    args = common.get("args")
    samples = getattr(args, "consumed_train_samples", 0) if args is not None else 0
    seq = getattr(args, "seq_length", 0) if args is not None else 0
    return TrainState(iteration=int(common.get("iteration", 0)), consumed_samples=samples, consumed_tokens=samples * seq)


def _has_rng_state(ckpt_dir: Path) -> bool:
    """Megatron-LM runs with --no-save-rng write no rng_state: then there is none to restore."""
    keys = layout.read_metadata(ckpt_dir).state_dict_metadata.keys()
    return any(k == "rng_state" or k.startswith("rng_state/") for k in keys)


def _retarget_to_gpt(model_state: dict, chunks) -> dict:
    from megatron.core.dist_checkpointing.gpt_checkpoint_interop import (
        gpt_compatible_layer_maps,
        retarget_sharded_state_dict_to_gpt_checkpoint,
    )

    pattern = unwrap(chunks[0]).hybrid_layer_pattern.replace("|", "")
    maps = gpt_compatible_layer_maps(pattern)
    for chunk_state in model_state.values():
        retarget_sharded_state_dict_to_gpt_checkpoint(chunk_state, maps)  # in place; returns None
    return model_state


def load_checkpoint(path: str | Path, chunks, optimizer=None, scheduler=None,
                    same_layout_rng: bool = True) -> TrainState:
    """Load a checkpoint (root or iter_* dir) into this rank's shards; optimizer/scheduler if given."""
    async_save.wait()  # a save in flight may be the checkpoint asked for
    ckpt = layout.resolve_checkpoint(path)
    with readers.reading([ckpt]):  # another job's retention leaves it alone meanwhile
        return _load(ckpt, chunks, optimizer, scheduler, same_layout_rng)


def _load(ckpt: Path, chunks, optimizer, scheduler, same_layout_rng: bool) -> TrainState:
    layout.verify_complete(ckpt)
    # Every recorded checksum of what this load reads is verified while it runs (this rank's share, in a
    # thread), and checked before anything loaded is applied.
    verification = integrity.Verification(ckpt, with_optimizer=optimizer is not None)
    _keep_state_the_loader_leaves_out()
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    gpt = is_gpt_checkpoint(ckpt)
    if gpt and optimizer is not None:
        raise CheckpointError(f"{ckpt} is a GPTModel checkpoint: load it with checkpoint.init_from "
                              "(weights only); its optimizer state is keyed for GPTModel")
    with_rng = same_layout_rng and _same_layout(common.get("args")) and _has_rng_state(ckpt)
    train_state = read_train_state(ckpt)
    optim_format = optimizer_format.DEFAULT
    if optimizer is not None:
        optim_format = optimizer_format.check_loadable(ckpt, optimizer, chunks, sidecar.read_record(ckpt, optimizer_format.SIDECAR_KEY),
                                                       common.get("args"))
    state = build_state_dict(chunks, optimizer, scheduler, train_state, None, is_loading=True, with_rng=with_rng,
                             optim_format=optim_format)
    for key in ("iteration", "checkpoint_version", "pma_train", "num_floating_point_operations_so_far"):
        state.pop(key)
    if scheduler is None:
        state.pop("opt_param_scheduler", None)
    if gpt:
        state.update(_retarget_to_gpt({k: v for k, v in state.items() if k.startswith("model")}, chunks))
    # Written by the other layer spec (TE / local): `_extra_state` entries differ, tensors may not.
    extra_state.match_checkpoint({k: v for k, v in state.items() if k.startswith("model")}, ckpt)
    try:
        loaded = dist_checkpointing.load(state, str(ckpt))
    except Exception:
        verification.finish()  # corrupted data is named as such, not by the loader's symptom of it
        raise
    verification.finish()
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[_model_key(i, len(chunks))], strict=False)
    if optimizer is not None:
        with torch.no_grad():  # dp_reshardable copies into fp32 main params that are the model's leaves
            optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
        if not _torch_adam():
            integer_group_steps(optimizer)
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if with_rng and "rng_state" in loaded:
        rng.restore_saved(loaded["rng_state"])
    return train_state


def _same_layout(args: Namespace | None) -> bool:
    if args is None:
        return False
    return (getattr(args, "tensor_model_parallel_size", None) == parallel_state.get_tensor_model_parallel_world_size()
            and getattr(args, "pipeline_model_parallel_size", None) == parallel_state.get_pipeline_model_parallel_world_size())
