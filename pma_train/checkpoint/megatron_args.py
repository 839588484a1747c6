"""The `args` entry of a checkpoint's common state: the subset of Megatron-LM's argparse namespace
that its loader and tools (tools/checkpoint/*, --use-checkpoint-args) read from a checkpoint."""

from __future__ import annotations

from argparse import Namespace

from pma_train.checkpoint.sidecar import TrainState
from pma_train.config import JobConfig


def megatron_args(cfg: JobConfig, state: TrainState, padded_vocab_size: int) -> Namespace:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    return Namespace(
        num_layers=len(m.pattern().replace("|", "")), hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        group_query_attention=m.num_query_groups is not None, kv_channels=m.kv_channels,
        hybrid_layer_pattern=m.pattern(), normalization=m.normalization, swiglu=m.activation == "swiglu",
        position_embedding_type=m.position_embedding_type, rotary_base=m.rotary_base,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights, add_bias_linear=m.add_bias_linear,
        num_experts=m.num_experts, moe_router_topk=m.moe_router_topk,
        max_position_embeddings=m.max_position_embeddings, seq_length=t.seq_length,
        padded_vocab_size=padded_vocab_size,
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp, expert_model_parallel_size=p.ep,
        use_distributed_optimizer=p.use_distributed_optimizer, ckpt_format="torch_dist",
        train_iters=t.iters, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
        consumed_train_samples=state.consumed_samples, consumed_valid_samples=0, iteration=state.iteration,
        lr=t.lr, min_lr=t.min_lr, seed=cfg.seed,
    )
