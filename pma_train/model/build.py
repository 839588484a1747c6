"""Build megatron-core's HybridModel (one chunk per virtual pipeline stage) from a ModelConfig."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer import TransformerConfig

from pma_train.config import JobConfig, ModelConfig
from pma_train.config.perf import is_resolved, resolve
from pma_train.model.init import initialise_layout_invariant
from pma_train.model.spec import (
    detect_host,
    have_transformer_engine,
    local_final_norm,
    local_stack_spec,
    te_stack_spec,
)
from pma_train.platform import Platform


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Pad independently of TP (unlike Megatron-LM) so checkpoints keep one shape across layouts."""
    return -(-vocab_size // multiple) * multiple


def staged_pattern(model: ModelConfig, stages: int) -> str:
    """The layer pattern with '|' between pipeline (and virtual pipeline) stages."""
    pattern = model.pattern()
    if "|" in pattern or stages == 1:
        return pattern
    per_stage = len(pattern) // stages
    return "|".join(pattern[i * per_stage:(i + 1) * per_stage] for i in range(stages))


def params_dtype(cfg: JobConfig, platform: Platform) -> torch.dtype:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if platform.is_cuda else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolved(cfg: JobConfig, platform: Platform) -> JobConfig:
    """cfg with its `perf` settings decided for this host (once per job: build() does it first)."""
    return cfg if is_resolved(cfg) else resolve(cfg, detect_host(platform.is_cuda))


def perf_kwargs(cfg: JobConfig, platform: Platform) -> dict:
    """TransformerConfig's fields for the (resolved) `perf` settings."""
    pf = cfg.perf
    return dict(
        bias_activation_fusion=pf.bias_activation_fusion,
        bias_dropout_fusion=pf.bias_dropout_fusion,
        masked_softmax_fusion=pf.masked_softmax_fusion,
        apply_rope_fusion=pf.apply_rope_fusion,
        gradient_accumulation_fusion=pf.gradient_accumulation_fusion,
        cross_entropy_loss_fusion=pf.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=pf.cross_entropy_fusion_impl,
        deallocate_pipeline_outputs=pf.deallocate_pipeline_outputs,
        overlap_p2p_comm=pf.overlap_p2p_comm,
        # Batched p2p and overlapped p2p exclude each other (megatron-core); gloo pairs batched p2p
        # ops wrongly when both neighbours are one peer (interleaved PP).
        batch_p2p_comm=platform.backend != "gloo" and not pf.overlap_p2p_comm,
        tp_comm_overlap=pf.tp_comm_overlap,
        fp8=pf.fp8,
        fp8_recipe=pf.fp8_recipe,
        fp8_amax_history_len=pf.fp8_amax_history_len,
        fp8_amax_compute_algo=pf.fp8_amax_compute_algo,
        fp8_margin=pf.fp8_margin,
        recompute_granularity=pf.recompute_granularity,
        recompute_method=pf.recompute_method,
        recompute_num_layers=pf.recompute_num_layers,
        recompute_modules=list(pf.recompute_modules) or None,  # None: megatron-core's default, core_attn
        cuda_graph_impl=pf.cuda_graph_impl,
        # Graph capture needs TE's RNG tracker (Megatron-LM turns it on for CUDA graphs too).
        use_te_rng_tracker=pf.cuda_graph_impl != "none",
        persist_layer_norm=False,
    )


def transformer_config(cfg: JobConfig, platform: Platform) -> TransformerConfig:
    cfg = resolved(cfg, platform)
    m, p = cfg.model, cfg.parallel
    dtype = params_dtype(cfg, platform)
    moe = {}
    if m.num_experts:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_z_loss_coeff=m.moe_z_loss_coeff,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_flex_dispatcher_backend=m.moe_flex_dispatcher_backend,
            moe_grouped_gemm=m.moe_grouped_gemm,
            moe_permute_fusion=cfg.perf.moe_permute_fusion,
            moe_router_dtype=None if cfg.perf.moe_router_dtype == "param" else cfg.perf.moe_router_dtype,
            moe_expert_capacity_factor=m.moe_capacity_factor,
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
        )
    return TransformerConfig(
        num_layers=len(m.pattern().replace("|", "")),
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=m.add_bias_linear,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        is_hybrid_model=True,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        sequence_parallel=p.sequence_parallel and p.tp > 1,
        expert_model_parallel_size=p.ep,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        **perf_kwargs(cfg, platform),
        **moe,
    )


def _mark_experts(chunk: torch.nn.Module) -> None:
    """Treat expert weights as expert-parallel at EP=1 too (megatron only does for EP > 1).

    megatron then always builds separate dense and expert optimizers, so the optimizer state in a
    checkpoint has one structure whatever the EP size, and EP=2 checkpoints resume at EP=1 (and back).
    At EP=1 the expert data-parallel group is the data-parallel group: gradients reduce the same way.
    """
    for name, param in chunk.named_parameters():
        if ".experts." in name and ".shared_experts." not in name:
            param.allreduce = False


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    """megatron-core's init_method when ours redraws the tensor anyway."""
    return tensor


def _leave_matrices_to_us(config: TransformerConfig) -> None:
    """megatron-core allocates and zeroes as usual, but draws no matrix: our init redraws each one.

    Its CPU initialisation would first draw every matrix full-size, in fp32, on every rank (then keep
    this rank's slice); without it, each rank allocates only its shard, on its own device.
    """
    config.use_cpu_initialization = False
    config.init_method = config.output_layer_init_method = config.embedding_init_method = _keep


def build_chunks(cfg: JobConfig, config: TransformerConfig, platform: Platform, vocab_size: int) -> list[HybridModel]:
    """This rank's HybridModel chunks (one, or one per virtual stage), initialised as `config` says."""
    use_te = platform.is_cuda and have_transformer_engine()
    experts = cfg.model.num_experts
    grouped = config.moe_grouped_gemm
    spec = te_stack_spec(experts, grouped) if use_te else \
        local_stack_spec(experts, grouped, cfg.perf.attention_backend or "local")
    vpp = cfg.parallel.vpp
    pattern = staged_pattern(cfg.model, cfg.parallel.pp * (vpp or 1))
    chunks = []
    with local_final_norm(not have_transformer_engine()):
        for vp_stage in range(vpp or 1):
            stage = vp_stage if vpp else None
            chunks.append(HybridModel(
                config=config,
                hybrid_stack_spec=spec,
                vocab_size=padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by),
                max_sequence_length=cfg.train.seq_length,
                hybrid_layer_pattern=pattern,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
                position_embedding_type=cfg.model.position_embedding_type,
                rotary_base=cfg.model.rotary_base,
                vp_stage=stage,
            ))
    for chunk in chunks:
        _params_in(chunk, config.params_dtype)
    return chunks


def _params_in(chunk: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter in the run's parameter dtype, as Megatron-LM's Float16Module and
    TE's modules make them. megatron-core's torch norms are created in fp32 whatever params_dtype
    says; megatron's non-distributed mixed-precision optimizer cannot checkpoint fp32 parameters
    next to bf16 ones (its state dict maps the bf16 ones only)."""
    for param in chunk.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def build_model(cfg: JobConfig, platform: Platform, vocab_size: int, *, initialise: bool = True) -> list[HybridModel]:
    """Model chunks of this rank (one, or one per virtual stage), initialised layout-invariantly.

    initialise=False builds the modules only (no weight init, no device move): for shape-only
    builds under `torch.device("meta")`, e.g. by pma-plan.
    """
    config = transformer_config(cfg, platform)
    if initialise:
        _leave_matrices_to_us(config)
    else:
        config.perform_initialization = False
    chunks = build_chunks(cfg, config, platform, vocab_size)
    for chunk in chunks:
        if initialise:
            chunk.to(platform.device)
            initialise_layout_invariant(chunk, cfg.seed, config)
        _mark_experts(chunk)
    return chunks
