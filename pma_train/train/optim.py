"""Wrap model chunks in megatron-core DDP and build its (distributed) optimizer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig

from pma_train.config import JobConfig
from pma_train.config.perf import is_resolved, resolve
from pma_train.model.spec import detect_host

# DDP computes the distributed optimizer's buffer layout itself when not given one; fine for us.
logging.getLogger("megatron.core.distributed.distributed_data_parallel").setLevel(logging.ERROR)


def ddp_config(cfg: JobConfig, config: TransformerConfig) -> DistributedDataParallelConfig:
    if not is_resolved(cfg):  # callers other than build() (benchmarks): decide for this host as it would
        cfg = resolve(cfg, detect_host(torch.cuda.is_available()))
    pf = cfg.perf
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.bf16 or config.fp16,
        overlap_grad_reduce=bool(pf.overlap_grad_reduce),
        overlap_param_gather=bool(pf.overlap_param_gather),
        # Interleaved schedules start each chunk's gather themselves (param_sync_func), as Megatron-LM.
        align_param_gather=bool(pf.overlap_param_gather) and cfg.parallel.vpp is not None,
        bucket_size=pf.bucket_size,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )


def wrap_ddp(chunks: list[torch.nn.Module], config: TransformerConfig, cfg: JobConfig) -> list[DistributedDataParallel]:
    ddp = ddp_config(cfg, config)
    wrapped = []
    for index, chunk in enumerate(chunks):
        # Only the first chunk's buckets may overlap with the rest of the backward pass.
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp, module=chunk,
                                               disable_bucketing=index > 0))
    return wrapped


def optimizer_config(cfg: JobConfig, config: TransformerConfig) -> OptimizerConfig:
    t = cfg.train
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )


def build_optimizer(model: list[DistributedDataParallel], cfg: JobConfig, config: TransformerConfig) -> MegatronOptimizer:
    optimizer = get_megatron_optimizer(optimizer_config(cfg, config), model)
    # What megatron-core's pipeline schedules call around the backward passes.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = _per_chunk(model, "no_sync")
    ddp = model[0].ddp_config
    # Overlapped reduction / gather: the schedules start each chunk's as its last micro-batch's
    # backward (first forward) comes, as Megatron-LM's train loop sets them up.
    config.grad_sync_func = _per_chunk(model, "start_grad_sync") if ddp.overlap_grad_reduce else None
    config.param_sync_func = _per_chunk(model, "start_param_sync") if ddp.align_param_gather else None
    config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _per_chunk(model: list[DistributedDataParallel], method: str):
    return [getattr(chunk, method) for chunk in model] if len(model) > 1 else getattr(model[0], method)


@contextlib.contextmanager
def parameters_in_sync(model: list[DistributedDataParallel]) -> Iterator[None]:
    """With perf.overlap_param_gather, an optimizer step leaves the other ranks' parameter shards to be
    gathered by the next forward: gather them now (for a checkpoint, an evaluation, a snapshot) and
    let the forwards gather again afterwards, as Megatron-LM does around its saves and evaluations."""
    if not model[0].ddp_config.overlap_param_gather:
        yield
        return
    for chunk in model:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in model:
            chunk.enable_forward_pre_hook()
