"""Wrap model chunks in megatron-core DDP and build its (distributed) optimizer."""

from __future__ import annotations

import logging

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig

from pma_train.config import JobConfig

# DDP computes the distributed optimizer's buffer layout itself when not given one; fine for us.
logging.getLogger("megatron.core.distributed.distributed_data_parallel").setLevel(logging.ERROR)


def wrap_ddp(chunks: list[torch.nn.Module], config: TransformerConfig, cfg: JobConfig) -> list[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.bf16 or config.fp16,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        # Only the first chunk's buckets may overlap with the rest of the backward pass.
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
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
    config.no_sync_func = [chunk.no_sync for chunk in model] if len(model) > 1 else model[0].no_sync
    config.grad_scale_func = optimizer.scale_loss
    return optimizer
