"""The typed configuration of every command: dataclasses that hydra composes with the YAML files in
`pma_train/conf/` and `model_configs/`. Their checks live beside them in `checks.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A dense transformer block is one attention layer ('*') and one MLP layer ('-').
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 352
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = 2  # GQA; None = multi-head attention
    kv_channels: Optional[int] = None
    # Explicit hybrid layer pattern (e.g. "*-*-" dense, "*E*E" MoE). Empty = "*-" * num_layers.
    layer_pattern: str = ""
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: str = "swiglu"
    add_bias_linear: bool = False
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    max_position_embeddings: int = 4096
    untie_embeddings_and_output_weights: bool = True
    # The vocabulary is padded to a multiple of this (independent of TP, so shapes never change).
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # MoE (used by 'E' layers of the pattern)
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_aux_loss_coeff: float = 1e-2
    moe_z_loss_coeff: Optional[float] = None
    # allgather | alltoall | flex (flex: DeepEP / HybridEP kernels, CUDA only; backend below)
    moe_token_dispatcher_type: str = "alltoall"
    moe_flex_dispatcher_backend: str = "deepep"
    # Experts as one grouped GEMM (TE's GroupedLinear); null = on with CUDA + Transformer Engine.
    # Checkpoints are the same either way (megatron-core stores grouped experts per expert).
    moe_grouped_gemm: Optional[bool] = None
    moe_capacity_factor: Optional[float] = None
    moe_router_load_balancing_type: str = "aux_loss"
    # Free text: how the parameter count of a preset comes out.
    notes: str = ""

    def pattern(self) -> str:
        return self.layer_pattern or "*-" * self.num_layers


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # Virtual pipeline stages per rank (interleaved 1F1B); None = not interleaved.
    vpp: Optional[int] = None
    ep: int = 1
    # Sequence parallel with TP > 1 (Megatron-LM's usual setting). Ignored at TP = 1.
    sequence_parallel: bool = True
    use_distributed_optimizer: bool = True
    # Override the automatic choice: "nccl" on CUDA hosts, "gloo" elsewhere.
    backend: Optional[str] = None


@dataclass
class TrainConfig:
    iters: int = 600
    global_batch_size: int = 16
    micro_batch_size: int = 4
    seq_length: int = 128
    lr: float = 3e-3
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # "auto" = bf16 on GPUs, fp32 on CPU.
    precision: str = "auto"
    eval_interval: int = 100
    eval_iters: int = 8
    # Evaluate once before the first step (e.g. to see where a loaded checkpoint stands).
    eval_at_start: bool = False
    log_interval: int = 10
    # Stop after this many iterations of this process (for tests of resume); None = run to iters.
    exit_after_iters: Optional[int] = None
    # On these signals, finish the step, save a checkpoint (checkpoint.save_on_signal) and exit with
    # status 75 (pma_train/train/preemption.py); [] = the signals' default action (killed at once).
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM"])


@dataclass
class ScheduleConfig:
    # constant | wsd | cosine | anneal. `anneal` is an annealing branch: fork from checkpoint.load
    # (weights + optimizer) and decay from train.lr to train.min_lr with decay_shape, from the
    # fork's iteration to train.iters, in a run (and checkpoint.dir) of its own.
    name: str = "constant"
    warmup_iters: int = 20
    # WSD decay: shape linear | cosine | 1-sqrt | exponential; length as a fraction of train.iters,
    # or an explicit number of iterations or tokens (the first one set wins: tokens, iters, fraction).
    decay_shape: str = "1-sqrt"
    decay_fraction: float = 0.2
    decay_iters: Optional[int] = None
    decay_tokens: Optional[int] = None


@dataclass
class MergeWeighting:
    """How the merged checkpoints are weighted (pma_train/merge/weights.py): sma | ema (alpha) | wma |
    decay (decay_shape: linear | cosine | 1-sqrt; weights equivalent to annealing the LR, WSM)."""

    method: str = "sma"
    alpha: float = 0.2
    decay_shape: str = "linear"


@dataclass
class InitMergeConfig(MergeWeighting):
    """PMA-init: start from the average of a run's last n checkpoints (fresh optimizer, iteration 0)."""

    root: Optional[str] = None
    n: int = 10
    v_tokens: Optional[int] = None
    v_iterations: Optional[int] = None
    end_iteration: Optional[int] = None


@dataclass
class RetentionConfig:
    """Delete old checkpoints, keeping the latest, the last `keep_last`, and the merge grid."""

    enabled: bool = False
    keep_last: int = 2
    # Grid spacing in iterations and how many grid points to keep (None: all). By default the
    # tracked merge's grid (track.v_*, track.n) when tracking is on.
    grid_every: Optional[int] = None
    grid_last: Optional[int] = None


@dataclass
class CheckpointConfig:
    # Checkpoint root (Megatron-LM layout: <dir>/iter_0000100/, latest_checkpointed_iteration.txt).
    dir: str = "${run.dir}/checkpoints"
    interval: int = 100
    save_optimizer: bool = True
    # How the distributed optimizer's state is written. dp_reshardable: each rank writes and reads its
    # own shard in place (no gather, no extra host copy; resumes under the same TP/PP/EP layout, DP may
    # change while the optimizer's buckets stay the same). fully_reshardable: gathered into per-parameter
    # tensors (resumes under any layout, pma-merge carry_optimizer needs it; O(model) host memory per
    # rank at save and resume). Model weights are reshardable either way.
    optimizer_format: str = "dp_reshardable"
    save_at_end: bool = True
    # Resume from this root (its latest) or an iter_* directory. Default: auto-resume from `dir`.
    load: Optional[str] = None
    # Initialise the model weights only (fresh optimizer, iteration 0) from a checkpoint root or
    # iter_* directory. A Megatron-LM GPTModel checkpoint works too.
    init_from: Optional[str] = None
    # Load the model only when resuming (optimizer re-initialised).
    no_load_optim: bool = False
    init_merge: InitMergeConfig = field(default_factory=InitMergeConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    # One job writes `dir` at a time (lock file <dir>/.pma-lock). Take over a lock that another host
    # left behind (that host's job must no longer run: this host cannot check).
    force_unlock: bool = False
    # Before each save, stop with a clear error unless the file system has room for a checkpoint
    # (the previous one's size). Off where free space is not what limits you (per-user quotas).
    check_free_space: bool = True
    # Save before stopping on one of train.exit_signals (unless this iteration was just saved).
    save_on_signal: bool = True
    # Write checkpoints behind training (megatron-core's async save): the save call returns once the
    # tensors are copied to host memory; the checkpoint is published (and becomes `latest`) at a later
    # step, once every rank has written it. null = on with CUDA, off on CPU.
    async_save: Optional[bool] = None


@dataclass
class TokenizerConfig:
    # byte | huggingface
    type: str = "byte"
    # tokenizer.json of a Hugging Face tokenizer (local file, never downloaded)
    path: Optional[str] = None


@dataclass
class DataConfig:
    # Indexed dataset prefixes (path/to/name for name.bin + name.idx). Empty = built-in corpus.
    paths: list[str] = field(default_factory=list)
    # Blending weights, one per path (empty = equal).
    weights: list[float] = field(default_factory=list)
    # train,valid,test split of every dataset, as Megatron-LM writes it.
    split: str = "949,50,1"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Where prepared data (built-in corpus, dataset index caches) goes.
    cache_dir: str = "${oc.env:PMA_CACHE_DIR,${oc.env:HOME}/.cache/pma-train}"
    num_workers: int = 0
    # Training micro-batches read ahead on a background thread (on CUDA: pinned and copied to the
    # GPU ahead of the step); 0 = read on the main thread when the step asks; null (auto): 2 on CUDA,
    # 0 on CPU (where the thread only competes with the step's compute threads for the cores).
    prefetch: Optional[int] = None


@dataclass
class WandbConfig:
    # disabled | offline | online
    mode: str = "disabled"
    project: str = "pma-train"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class LoggingConfig:
    jsonl: bool = True
    progress_bar: bool = True
    # Show third-party start-up warnings (Transformer Engine / Apex absent, deprecations: cli/quiet.py).
    verbose: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrackConfig(MergeWeighting):
    """Track the PMA merge of the run's last n grid checkpoints and evaluate it next to the live model."""

    enabled: bool = False
    n: int = 5
    # Grid spacing: every v_iterations (default checkpoint.interval) or v_tokens; a multiple of
    # checkpoint.interval, since snapshots are taken when checkpoints are.
    v_iterations: Optional[int] = None
    v_tokens: Optional[int] = None
    # Snapshot precision: fp32 | bf16 (half the host memory, merge within bf16 rounding) | param (the
    # parameters' own dtype: as exact as fp32, and half of it for bf16 mixed-precision training).
    # Per rank: n x model-parallel shard / data-parallel size x bytes per element.
    dtype: str = "fp32"
    # Where the snapshots (and, while the merge is evaluated, the rank's live share) are kept:
    # host (memory: the per-rank figure above, plus the live share during an evaluation) | disk (one
    # file per snapshot in <dir>/rank_XXXXX, the global rank; the host memory is then the buffer, and
    # the disk holds the figure above plus the live share during an evaluation). Put `dir` on a fast
    # local disk (NVMe scratch): the default, <run.dir>/track, is unique to the run but often on a
    # shared file system. The files are deleted at the end of training and by the next run.
    storage: str = "host"
    dir: Optional[str] = None
    # Block of the merge's all-gathers and of the disk reads / writes, MiB per rank.
    buffer_mb: int = 64
    # Also save the merged weights (model only) under <run.dir>/merged at every eval, keeping the
    # newest `save_keep_last` of them (null: all).
    save: bool = False
    save_keep_last: Optional[int] = 1


@dataclass
class SpikeConfig:
    """Loss-spike recovery: restore the merge of the last good checkpoints and skip the bad data."""

    enabled: bool = False
    # A step is a spike when its loss is `zscore` robust sigmas (MAD) above the median of the last
    # `window` good losses (after `min_history` of them), or not finite, or its grad norm exceeds
    # `grad_norm_threshold`.
    window: int = 50
    min_history: int = 20
    zscore: float = 8.0
    grad_norm_threshold: Optional[float] = None
    # Restore the SMA of the last `merge_last` checkpoints saved at least `guard_iters` before the spike.
    merge_last: int = 3
    guard_iters: int = 2
    restore_optimizer: bool = True
    # Continue with the data after the spike instead of replaying the window that led to it.
    skip_data: bool = True
    # Stop the run when more than `max_recoveries` happen within `recovery_window` iterations.
    max_recoveries: int = 3
    recovery_window: int = 1000
    # Testing aid: multiply the LR by inject_lr_mult for inject_iters iterations from inject_at (once).
    inject_at: Optional[int] = None
    inject_iters: int = 3
    inject_lr_mult: float = 1000.0


@dataclass
class PerfConfig:
    """megatron-core's performance settings; null = auto, decided once for the host by
    pma_train/config/perf.py (on with CUDA, and TE / apex where megatron-core needs them; off on CPU).
    The keys, the auto table and their requirements: README (performance settings), docs/performance.md."""

    # Fusions (TransformerConfig)
    bias_activation_fusion: Optional[bool] = None
    bias_dropout_fusion: Optional[bool] = None
    masked_softmax_fusion: Optional[bool] = None
    apply_rope_fusion: Optional[bool] = None
    gradient_accumulation_fusion: Optional[bool] = None
    cross_entropy_loss_fusion: Optional[bool] = None
    cross_entropy_fusion_impl: str = "native"  # native | te
    # Core attention: null (auto: te with TE, sdpa on other CUDA hosts, local on CPU) | te | sdpa | local
    attention_backend: Optional[str] = None
    # DDP overlap; bucket size in elements (null: megatron-core's max(40M, 1M x DP))
    overlap_grad_reduce: Optional[bool] = None
    overlap_param_gather: Optional[bool] = None
    bucket_size: Optional[int] = None
    # Pipeline; CUDA_DEVICE_MAX_CONNECTIONS (null: 1 with TP > 1 on CUDA, as Megatron-LM requires)
    deallocate_pipeline_outputs: Optional[bool] = None
    overlap_p2p_comm: Optional[bool] = None
    cuda_device_max_connections: Optional[int] = None
    # MoE: fused permutation; router dtype fp32 | fp64 | param (the params' dtype)
    moe_permute_fusion: Optional[bool] = None
    moe_router_dtype: Optional[str] = None
    # FP8 (CUDA + TE): null | hybrid | e4m3; recipe delayed | tensorwise | mxfp8 | blockwise
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"  # most_recent | max
    fp8_margin: int = 0
    # Activation recomputation: null | selective (modules) | full (method uniform | block, num_layers)
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: list[str] = field(default_factory=list)
    # CUDA graphs: none | local | transformer_engine; TP comm overlap (TE userbuffers, TP > 1 + SP)
    cuda_graph_impl: str = "none"
    tp_comm_overlap: bool = False


@dataclass
class RunConfig:
    dir: str = "runs/${model.name}-${now:%Y%m%d-%H%M%S}"
    name: str = "${model.name}"


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    seed: int = 1234
    perf: PerfConfig = field(default_factory=PerfConfig)


Schema = TypeVar("Schema")


def to_config(schema: type[Schema], node: Any) -> Schema:
    """A hydra / OmegaConf node (or already a `schema` object) as a plain `schema` object with resolved
    values: the node merged onto the dataclass's defaults, so OmegaConf refuses unknown keys and wrong
    types by name. Every entry point takes this one step from its hydra config to its typed one."""
    from omegaconf import OmegaConf

    if isinstance(node, schema):
        return node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def to_job_config(cfg: Any) -> JobConfig:
    """An OmegaConf node (or a JobConfig) as a plain JobConfig object with resolved values."""
    return to_config(JobConfig, cfg)
