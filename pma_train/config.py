"""Typed configuration of a pma-train job, and its validation.

Hydra composes these dataclasses with the YAML files in `pma_train/conf/` and `model_configs/`.
`validate()` runs before any process group or model exists and raises `ConfigError` naming the
offending field. This module imports nothing of the trainer, the model or megatron-core.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


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
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: bool = False
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


@dataclass
class EvalConfig(JobConfig):
    """`pma-eval`: validation loss of checkpoints under a pma-train job config (model, data, parallel,
    train.eval_iters / micro_batch_size / seq_length), the same numbers the trainer logs."""

    # Checkpoint roots or iter_* dirs, any parallel layout.
    checkpoints: list[str] = field(default_factory=list)
    # Also write the results as JSON here.
    output: Optional[str] = None


@dataclass
class DataPrepConfig:
    """`pma-data`: tokenize documents into <output_prefix>.bin/.idx (megatron-core indexed dataset)."""

    # Input files, read in this order, streamed: .jsonl / .jsonl.gz (one JSON object per line, the
    # text under `json_key`) or .txt / .txt.gz (documents separated by blank lines).
    inputs: list[str] = field(default_factory=list)
    json_key: str = "text"
    # Writes <output_prefix>.bin and <output_prefix>.idx; give pma-train data.paths=[<output_prefix>].
    output_prefix: Optional[str] = None
    # Replace an existing <output_prefix>.bin/.idx.
    overwrite: bool = False
    # type=byte (UTF-8 bytes, no file) | huggingface with path=<local tokenizer.json>; the same
    # settings as pma-train's data.tokenizer, which must match when training on the output.
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Tokenizing processes; null = the CPUs this process may use. The output is byte-identical for any number.
    workers: Optional[int] = None
    # Documents per batch handed to a worker (a batch also ends at 1 MiB of text).
    batch_size: int = 256
    # A tqdm bar (documents, tokens/s) on stderr when it is a terminal.
    progress_bar: bool = True


def to_job_config(cfg: Any) -> JobConfig:
    """An OmegaConf node (or a JobConfig) as a plain JobConfig object with resolved values."""
    from omegaconf import OmegaConf

    if isinstance(cfg, JobConfig):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(JobConfig), cfg)
    return OmegaConf.to_object(merged)


# ----------------------------------------------------------------------------- validation

_DENSE_SYMBOLS = set("*-")
_PATTERN_SYMBOLS = set("*-E|")


def _fail(field_name: str, message: str) -> None:
    raise ConfigError(f"{field_name}: {message}")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def track_spacing_iters(cfg: JobConfig) -> int:
    """The tracked merge's grid spacing in iterations."""
    tr, t = cfg.track, cfg.train
    if tr.v_tokens is not None:
        tokens_per_iter = t.global_batch_size * t.seq_length
        if tr.v_tokens % tokens_per_iter:
            _fail("track.v_tokens", f"{tr.v_tokens} is not a multiple of the {tokens_per_iter} tokens per iteration")
        return tr.v_tokens // tokens_per_iter
    return tr.v_iterations or cfg.checkpoint.interval


METHODS = ("sma", "ema", "wma", "decay")
MERGE_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def _check_method(prefix: str, w: MergeWeighting, allowed=METHODS) -> None:
    if w.method not in allowed:
        _fail(prefix + "method", f"'{w.method}' is not one of {', '.join(allowed)}")
    if w.method == "ema" and not 0.0 < w.alpha <= 1.0:
        _fail(prefix + "alpha", f"must be in (0, 1], got {w.alpha}")
    if w.method == "decay" and w.decay_shape not in MERGE_DECAY_SHAPES:
        _fail(prefix + "decay_shape", f"'{w.decay_shape}' is not one of {', '.join(MERGE_DECAY_SHAPES)}")


def _check_optimizer(t: TrainConfig) -> None:
    # Comparisons written so that NaN fails them too.
    if not 0 <= t.min_lr <= t.lr:
        _fail("train.min_lr", f"must be in [0, train.lr={t.lr}], got {t.min_lr}")
    if not t.weight_decay >= 0:
        _fail("train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    # beta1 = 0 is Adam without momentum (torch accepts it); beta2 must average something.
    if not 0 <= t.adam_beta1 < 1:
        _fail("train.adam_beta1", f"must be in [0, 1), got {t.adam_beta1}")
    if not 0 < t.adam_beta2 < 1:
        _fail("train.adam_beta2", f"must be in (0, 1), got {t.adam_beta2}")
    if not t.adam_eps > 0:
        _fail("train.adam_eps", f"must be > 0, got {t.adam_eps}")
    if not t.clip_grad >= 0:
        _fail("train.clip_grad", f"must be >= 0 (0 = no clipping), got {t.clip_grad}")


# Signals a scheduler sends to ask a job to stop (SIGKILL and SIGSTOP cannot be caught).
EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")


def _check_exit_signals(t: TrainConfig) -> None:
    for name in t.exit_signals:
        if name not in EXIT_SIGNALS:
            _fail("train.exit_signals", f"'{name}' is not one of {', '.join(EXIT_SIGNALS)}")


def _check_intervals(t: TrainConfig) -> None:
    for name in ("log_interval", "eval_interval"):
        if getattr(t, name) < 1:
            _fail(f"train.{name}", f"must be >= 1, got {getattr(t, name)}")
    if t.eval_iters < 0:
        _fail("train.eval_iters", f"must be >= 0 (0 = no evaluation), got {t.eval_iters}")


def validate(cfg: JobConfig, world_size: Optional[int] = None) -> None:
    """Check that the job can run; raise ConfigError naming the first field that cannot."""
    world_size = world_size_from_env() if world_size is None else world_size
    m, p, t, s = cfg.model, cfg.parallel, cfg.train, cfg.schedule

    for name in ("tp", "pp", "ep"):
        if getattr(p, name) < 1:
            _fail(f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}")
    pattern = m.pattern().replace("|", "")
    if not pattern or set(pattern) - _PATTERN_SYMBOLS:
        _fail("model.layer_pattern", f"'{m.pattern()}' may only use the symbols * - E |")
    if "E" in pattern and not m.num_experts:
        _fail("model.num_experts", "the layer pattern has MoE layers ('E') but num_experts is not set")
    if m.num_attention_heads % p.tp:
        _fail("parallel.tp", f"{p.tp} does not divide model.num_attention_heads={m.num_attention_heads}")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        _fail("model.num_query_groups", f"{groups} does not divide num_attention_heads={m.num_attention_heads}")
    if groups % p.tp:
        _fail("parallel.tp", f"{p.tp} does not divide model.num_query_groups={groups}")
    if m.make_vocab_size_divisible_by % p.tp:
        _fail("parallel.tp", f"{p.tp} does not divide model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by}")
    if m.ffn_hidden_size % p.tp:
        _fail("parallel.tp", f"{p.tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")
    if m.num_experts and m.num_experts % p.ep:
        _fail("parallel.ep", f"{p.ep} does not divide model.num_experts={m.num_experts}")
    if p.ep > 1 and not m.num_experts:
        _fail("parallel.ep", f"{p.ep} > 1 needs an MoE model (model.num_experts is not set)")

    stages = p.pp * (p.vpp or 1)
    if "|" in m.pattern():
        if m.pattern().count("|") + 1 != stages:
            _fail("parallel.pp", f"pp*vpp={stages} does not match the {m.pattern().count('|') + 1} stages marked "
                                 "in the layer pattern")
    elif len(pattern) % (2 * stages) and len(pattern) % stages:
        _fail("parallel.pp", f"pp*vpp={stages} does not divide the {len(pattern)} layers of '{pattern}'")
    if p.vpp is not None and (p.vpp < 2 or p.pp < 2):
        _fail("parallel.vpp", f"interleaving needs vpp >= 2 and pp >= 2 (vpp={p.vpp}, pp={p.pp})")

    model_parallel = p.tp * p.pp
    if world_size % model_parallel:
        _fail("parallel", f"world size {world_size} is not a multiple of tp*pp={model_parallel}")
    dp = world_size // model_parallel
    if dp % p.ep:
        # Experts are sharded over EP ranks taken from the data-parallel ranks of each TP x PP slice.
        _fail("parallel.ep", f"{p.ep} does not divide the data-parallel size {dp} (world {world_size} / tp*pp)")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        _fail("train.global_batch_size", "batch sizes must be >= 1")
    if t.global_batch_size % (t.micro_batch_size * dp):
        _fail("train.global_batch_size",
              f"{t.global_batch_size} is not a multiple of micro_batch_size*dp = {t.micro_batch_size}*{dp}")
    if p.vpp and (t.global_batch_size // (t.micro_batch_size * dp)) % p.pp:
        _fail("train.global_batch_size", f"interleaved PP needs the number of micro-batches to be a multiple of pp={p.pp}")
    if t.iters < 1:
        _fail("train.iters", f"must be >= 1, got {t.iters}")
    if t.seq_length < 2:
        _fail("train.seq_length", f"must be >= 2, got {t.seq_length}")
    # RoPE tables are sized for max_position_embeddings, and exports record it as the context length.
    if m.position_embedding_type != "none" and t.seq_length > m.max_position_embeddings:
        _fail("train.seq_length", f"{t.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    if not (t.lr > 0 and math.isfinite(t.lr)):
        _fail("train.lr", f"must be a positive number, got {t.lr}")
    _check_optimizer(t)
    _check_intervals(t)
    _check_exit_signals(t)
    if not 0 <= cfg.seed < 2**32:  # numpy's seed range; megatron-core adds per-rank offsets below that
        _fail("seed", f"must be in [0, 2**32), got {cfg.seed}")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        _fail("train.precision", f"'{t.precision}' is not one of auto, fp32, bf16, fp16")

    if s.name not in ("constant", "wsd", "cosine", "anneal"):
        _fail("schedule.name", f"'{s.name}' is not one of constant, wsd, cosine, anneal")
    if s.name == "anneal":
        if s.decay_shape not in ("linear", "cosine", "1-sqrt"):
            _fail("schedule.decay_shape", f"'{s.decay_shape}' is not one of linear, cosine, 1-sqrt")
        if cfg.checkpoint.load is None:
            _fail("checkpoint.load", "schedule=anneal forks from a checkpoint: set checkpoint.load")
        if Path(cfg.checkpoint.dir).resolve() in (Path(cfg.checkpoint.load).resolve(),
                                                  Path(cfg.checkpoint.load).resolve().parent):
            _fail("checkpoint.dir", "an annealing branch writes its own checkpoints: give it another checkpoint.dir")
    tr = cfg.track
    if tr.enabled:
        if t.eval_iters == 0:
            _fail("track.enabled", "the tracked merge is evaluated at every eval, and train.eval_iters=0 turns "
                                   "evaluation off")
        if tr.n < 1:
            _fail("track.n", f"must be >= 1, got {tr.n}")
        _check_method("track.", tr)
        if tr.save_keep_last is not None and tr.save_keep_last < 1:
            _fail("track.save_keep_last", f"must be >= 1 (or null: keep all), got {tr.save_keep_last}")
        spacing = track_spacing_iters(cfg)
        if spacing % cfg.checkpoint.interval:
            _fail("track.v_iterations" if tr.v_tokens is None else "track.v_tokens",
                  f"the grid spacing ({spacing} iterations) must be a multiple of checkpoint.interval={cfg.checkpoint.interval}")
    sp = cfg.spike
    if sp.enabled:
        if sp.merge_last < 1 or sp.window < 2 or sp.min_history < 2 or sp.zscore <= 0:
            _fail("spike", "merge_last >= 1, window >= 2, min_history >= 2 and zscore > 0 are required")
        if sp.min_history > sp.window:
            _fail("spike.min_history", f"{sp.min_history} exceeds spike.window={sp.window}")
    im = cfg.checkpoint.init_merge
    if im.root is not None:
        if not Path(im.root).is_dir():
            _fail("checkpoint.init_merge.root", f"{im.root} is not a directory")
        if cfg.checkpoint.init_from is not None:
            _fail("checkpoint.init_merge.root", "give checkpoint.init_from or checkpoint.init_merge.root, not both")
        _check_method("checkpoint.init_merge.", im)
    if s.warmup_iters < 0:
        _fail("schedule.warmup_iters", f"must be >= 0, got {s.warmup_iters}")
    if s.name != "constant" and s.warmup_iters >= t.iters:
        _fail("schedule.warmup_iters", f"{s.warmup_iters} must be below train.iters={t.iters} for a decaying schedule")
    if s.name == "wsd":
        if s.decay_shape not in ("linear", "cosine", "1-sqrt", "exponential"):
            _fail("schedule.decay_shape", f"'{s.decay_shape}' is not one of linear, cosine, 1-sqrt, exponential")
        if not 0.0 < s.decay_fraction <= 1.0:
            _fail("schedule.decay_fraction", f"must be in (0, 1], got {s.decay_fraction}")

    if cfg.checkpoint.interval < 1:
        _fail("checkpoint.interval", f"must be >= 1, got {cfg.checkpoint.interval}")
    for name in ("load", "init_from"):
        path = getattr(cfg.checkpoint, name)
        if path is not None and not Path(path).exists():
            _fail(f"checkpoint.{name}", f"{path} does not exist")
    if cfg.checkpoint.load is not None and cfg.checkpoint.init_from is not None:
        # init_from starts a new run from weights, load resumes one: together one would be ignored.
        _fail("checkpoint.init_from", "give checkpoint.load (resume: weights, optimizer, iteration) or "
                                      "checkpoint.init_from (weights only, iteration 0), not both")

    d = cfg.data
    for prefix in d.paths:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                _fail("data.paths", f"{prefix + suffix} does not exist (give dataset prefixes, without .bin/.idx)")
    if d.weights and len(d.weights) != len(d.paths):
        _fail("data.weights", f"{len(d.weights)} weights for {len(d.paths)} data.paths")
    if any(not (w >= 0 and math.isfinite(w)) for w in d.weights) or (d.weights and sum(d.weights) <= 0):
        _fail("data.weights", f"must be finite, non-negative and not all zero: {d.weights}")
    if d.tokenizer.type not in ("byte", "huggingface"):
        _fail("data.tokenizer.type", f"'{d.tokenizer.type}' is not one of byte, huggingface")
    if d.tokenizer.type == "huggingface":
        if not d.tokenizer.path or not Path(d.tokenizer.path).is_file():
            _fail("data.tokenizer.path", f"a local tokenizer.json is required, got {d.tokenizer.path}")
    if cfg.logging.wandb.mode not in ("disabled", "offline", "online"):
        _fail("logging.wandb.mode", f"'{cfg.logging.wandb.mode}' is not one of disabled, offline, online")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(field_name: str, directory: str) -> None:
    """`directory`, or the nearest existing parent it would be created under, can be written.

    Creates nothing: a job that fails here has written nothing either.
    """
    target = Path(directory)
    existing = _nearest_existing(target)
    where = "" if existing == target.absolute() else f" (it would be created under {existing})"
    if not existing.is_dir():
        _fail(field_name, f"{existing} is not a directory{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        _fail(field_name, f"{existing} is not writable{where}")


def check_output_dirs(cfg: JobConfig) -> None:
    """The directories a training job writes to: found at the start, not at the first save after training."""
    check_writable("run.dir", cfg.run.dir)
    check_writable("checkpoint.dir", cfg.checkpoint.dir)


# ----------------------------------------------------------------------------- pma-merge


@dataclass
class MergeConfig(MergeWeighting):
    """`pma-merge`: average checkpoints (PMA). Inputs are explicit dirs, or a root plus a selection."""

    # Explicit checkpoint directories (iter_* dirs or roots; merged oldest first whatever the order listed,
    # each checkpoint once) ...
    inputs: list[str] = field(default_factory=list)
    # ... or a checkpoint root: the last `n` checkpoints spaced `v_tokens` (or `v_iterations`) apart,
    # the newest at or before `end_iteration` (default: the root's latest).
    root: Optional[str] = None
    n: int = 10
    v_tokens: Optional[int] = None
    v_iterations: Optional[int] = None
    end_iteration: Optional[int] = None
    # method=explicit (besides MergeWeighting's): these weights, one per input in the order inputs are
    # listed (a weight moves with its input when inputs are sorted oldest first); with root, oldest first.
    weights: list[float] = field(default_factory=list)
    normalize: bool = True
    allow_negative_weights: bool = False
    # Output checkpoint root: <output>/iter_XXXXXXX (the newest input's iteration) + latest tracker.
    output: Optional[str] = None
    overwrite: bool = False
    # One merge writes `output` at a time (lock file <output>/.pma-lock); take over a lock another
    # host left behind (that host's merge must no longer run: this host cannot check).
    force_unlock: bool = False
    # Per-rank memory for merge buffers; pieces of tensors are sized to fit.
    memory_budget_mb: int = 256
    # Accumulation precision fp32 | fp64; output dtype: "input" keeps each tensor's dtype.
    accumulate_dtype: str = "fp32"
    output_dtype: str = "input"
    # Carry the optimizer state so training resumes from the merge: main params merged, moments of the newest input.
    carry_optimizer: bool = False
    # Print the selection and weights, merge nothing.
    dry_run: bool = False
    progress_bar: bool = True


def validate_merge(cfg: MergeConfig) -> None:
    """Static checks of a merge request (the inputs themselves are checked by the engine)."""
    if bool(cfg.inputs) == bool(cfg.root):
        _fail("inputs", "give either inputs=[dir,...] or root=<checkpoint root>, not both / neither")
    _check_method("", cfg, METHODS + ("explicit",))
    if cfg.method == "explicit" and not cfg.weights:
        _fail("weights", "method=explicit needs weights=[...]")
    if cfg.weights and cfg.method != "explicit":
        _fail("weights", f"weights are given but method={cfg.method}; use method=explicit")
    if cfg.root:
        if cfg.n < 1:
            _fail("n", f"must be >= 1, got {cfg.n}")
        if cfg.v_tokens is not None and cfg.v_iterations is not None:
            _fail("v_tokens", "give v_tokens or v_iterations, not both")
        for name in ("v_tokens", "v_iterations"):
            value = getattr(cfg, name)
            if value is not None and value <= 0:
                _fail(name, f"must be > 0, got {value}")
    if cfg.memory_budget_mb < 1:
        _fail("memory_budget_mb", f"must be >= 1, got {cfg.memory_budget_mb}")
    if cfg.accumulate_dtype not in ("fp32", "fp64"):
        _fail("accumulate_dtype", f"'{cfg.accumulate_dtype}' is not one of fp32, fp64")
    if cfg.output_dtype not in ("input", "fp32", "bf16", "fp16", "fp64"):
        _fail("output_dtype", f"'{cfg.output_dtype}' is not one of input, fp32, bf16, fp16, fp64")
    if not cfg.dry_run and not cfg.output:
        _fail("output", "an output checkpoint root is required (or dry_run=true)")
