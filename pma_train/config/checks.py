"""Validation of the configs in `schema.py`: runs before any process group or model exists and raises
`ConfigError` naming the offending field."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from pma_train.config.commands import EvalConfig, MergeConfig
from pma_train.config.perf import check_perf
from pma_train.config.schema import (
    ConfigError,
    JobConfig,
    MergeWeighting,
    ModelConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
)
from pma_train.decay import CURVE_SHAPES, DECAY_SHAPES

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


def track_rank_dir(cfg: JobConfig, rank: int) -> Path:
    """Where a rank keeps the tracked merge's snapshots with track.storage=disk (its own directory)."""
    return Path(cfg.track.dir or Path(cfg.run.dir) / "track") / f"rank_{rank:05d}"


METHODS = ("sma", "ema", "wma", "decay")
# pma_train/checkpoint/optimizer_format.py says what each means.
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


def _check_method(prefix: str, w: MergeWeighting, allowed=METHODS) -> None:
    if w.method not in allowed:
        _fail(prefix + "method", f"'{w.method}' is not one of {', '.join(allowed)}")
    if w.method == "ema" and not 0.0 < w.alpha <= 1.0:
        _fail(prefix + "alpha", f"must be in (0, 1], got {w.alpha}")
    if w.method == "decay" and w.decay_shape not in CURVE_SHAPES:
        _fail(prefix + "decay_shape", f"'{w.decay_shape}' is not one of {', '.join(CURVE_SHAPES)}")


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


def decay_window_iters(s: ScheduleConfig, t: TrainConfig, tokens_per_iter: int) -> int:
    """Length of the WSD decay window in iterations: decay_tokens, else decay_iters, else decay_fraction."""
    if s.decay_tokens is not None:
        name, window = "schedule.decay_tokens", round(s.decay_tokens / tokens_per_iter)
    elif s.decay_iters is not None:
        name, window = "schedule.decay_iters", s.decay_iters
    else:
        name, window = "schedule.decay_fraction", round(s.decay_fraction * t.iters)
    room = t.iters - s.warmup_iters
    if not 1 <= window <= room:
        _fail(name, f"gives a decay of {window} iterations; it must be between 1 and "
                    f"train.iters - schedule.warmup_iters = {room}")
    return window


def _check_shapes(m: ModelConfig, p: ParallelConfig, t: TrainConfig) -> None:
    """Shapes megatron-core's modules would reject further in, after the process groups exist."""
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        _fail("model.num_attention_heads", f"{m.num_attention_heads} does not divide hidden_size={m.hidden_size} "
                                           "(or set model.kv_channels)")
    if m.num_experts:
        if not 1 <= m.moe_router_topk <= m.num_experts:
            _fail("model.moe_router_topk", f"{m.moe_router_topk} is not in [1, num_experts={m.num_experts}]")
        # Experts are split over expert-TP ranks, as many as TP ranks.
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            value = getattr(m, name)
            if value and value % p.tp:
                _fail("parallel.tp", f"{p.tp} does not divide model.{name}={value}")
    if p.tp > 1 and p.sequence_parallel and t.seq_length % p.tp:
        _fail("train.seq_length", f"{t.seq_length} is not a multiple of parallel.tp={p.tp} "
                                  "(sequence parallelism splits the sequence over TP ranks)")


def validate(cfg: JobConfig, world_size: Optional[int] = None, *, local_files: bool = True) -> None:
    """Check that the job can run; raise ConfigError naming the first field that cannot.

    The one validator of a job: pma-train runs it before any process group starts, pma-plan with
    the world size it plans for and `local_files=False` (planning happens anywhere: the files the job
    reads, data, tokenizer, checkpoints, need not exist on this host; only that check is skipped)."""
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
    _check_shapes(m, p, t)

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
        if s.decay_shape not in CURVE_SHAPES:
            _fail("schedule.decay_shape", f"'{s.decay_shape}' is not one of {', '.join(CURVE_SHAPES)}")
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
        if tr.dtype not in ("fp32", "bf16", "param"):
            _fail("track.dtype", f"'{tr.dtype}' is not one of fp32, bf16, param")
        if tr.storage not in ("host", "disk"):
            _fail("track.storage", f"'{tr.storage}' is not one of host, disk")
        if tr.dir is not None and tr.storage != "disk":
            _fail("track.dir", f"is set, but track.storage={tr.storage} keeps the snapshots in memory: set "
                               "track.storage=disk (or leave track.dir unset)")
        if tr.buffer_mb < 1:
            _fail("track.buffer_mb", f"must be >= 1, got {tr.buffer_mb}")
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
        if local_files and not Path(im.root).is_dir():
            _fail("checkpoint.init_merge.root", f"{im.root} is not a directory")
        if cfg.checkpoint.init_from is not None:
            _fail("checkpoint.init_merge.root", "give checkpoint.init_from or checkpoint.init_merge.root, not both")
        _check_method("checkpoint.init_merge.", im)
    if s.warmup_iters < 0:
        _fail("schedule.warmup_iters", f"must be >= 0, got {s.warmup_iters}")
    if s.name != "constant" and s.warmup_iters >= t.iters:
        _fail("schedule.warmup_iters", f"{s.warmup_iters} must be below train.iters={t.iters} for a decaying schedule")
    if s.name == "wsd":
        if s.decay_shape not in DECAY_SHAPES:
            _fail("schedule.decay_shape", f"'{s.decay_shape}' is not one of {', '.join(DECAY_SHAPES)}")
        if not 0.0 < s.decay_fraction <= 1.0:
            _fail("schedule.decay_fraction", f"must be in (0, 1], got {s.decay_fraction}")
        decay_window_iters(s, t, t.global_batch_size * t.seq_length)

    if cfg.checkpoint.interval < 1:
        _fail("checkpoint.interval", f"must be >= 1, got {cfg.checkpoint.interval}")
    if cfg.checkpoint.optimizer_format not in OPTIMIZER_FORMATS:
        _fail("checkpoint.optimizer_format",
              f"'{cfg.checkpoint.optimizer_format}' is not one of {', '.join(OPTIMIZER_FORMATS)}")
    for name in ("load", "init_from"):
        path = getattr(cfg.checkpoint, name)
        if local_files and path is not None and not Path(path).exists():
            _fail(f"checkpoint.{name}", f"{path} does not exist")
    if cfg.checkpoint.async_save not in (None, True, False):
        _fail("checkpoint.async_save", f"must be true, false or null (on with CUDA), got {cfg.checkpoint.async_save!r}")
    if cfg.checkpoint.load is not None and cfg.checkpoint.init_from is not None:
        # init_from starts a new run from weights, load resumes one: together one would be ignored.
        _fail("checkpoint.init_from", "give checkpoint.load (resume: weights, optimizer, iteration) or "
                                      "checkpoint.init_from (weights only, iteration 0), not both")

    d = cfg.data
    for prefix in d.paths if local_files else ():
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                _fail("data.paths", f"{prefix + suffix} does not exist (give dataset prefixes, without .bin/.idx)")
    if d.num_workers < 0:
        _fail("data.num_workers", f"must be >= 0, got {d.num_workers}")
    if d.prefetch is not None and d.prefetch < 0:
        _fail("data.prefetch", f"must be >= 0 (0: no read-ahead thread), got {d.prefetch}")
    if d.weights and len(d.weights) != len(d.paths):
        _fail("data.weights", f"{len(d.weights)} weights for {len(d.paths)} data.paths")
    if any(not (w >= 0 and math.isfinite(w)) for w in d.weights) or (d.weights and sum(d.weights) <= 0):
        _fail("data.weights", f"must be finite, non-negative and not all zero: {d.weights}")
    if d.tokenizer.type not in ("byte", "huggingface"):
        _fail("data.tokenizer.type", f"'{d.tokenizer.type}' is not one of byte, huggingface")
    if d.tokenizer.type == "huggingface":
        if not d.tokenizer.path or (local_files and not Path(d.tokenizer.path).is_file()):
            _fail("data.tokenizer.path", f"a local tokenizer.json is required, got {d.tokenizer.path}")
    if cfg.logging.wandb.mode not in ("disabled", "offline", "online"):
        _fail("logging.wandb.mode", f"'{cfg.logging.wandb.mode}' is not one of disabled, offline, online")
    check_perf(cfg)


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
    if cfg.track.enabled and cfg.track.storage == "disk" and cfg.track.dir is not None:
        check_writable("track.dir", cfg.track.dir)


# ----------------------------------------------------------------------------- pma-eval


def validate_eval(cfg: EvalConfig) -> None:
    """The job's checks, then what evaluating checkpoints needs."""
    validate(cfg)
    if cfg.train.eval_iters < 1:  # 0 turns a training run's evaluation off; here it would give 0.0
        _fail("train.eval_iters", f"pma-eval needs at least 1, got {cfg.train.eval_iters}")
    if not cfg.checkpoints:
        _fail("checkpoints", "give at least one checkpoint, e.g. 'checkpoints=[ckpt/run1]'")


# ----------------------------------------------------------------------------- pma-merge


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
    if cfg.seq_length is not None and cfg.seq_length < 1:
        _fail("seq_length", f"must be >= 1, got {cfg.seq_length}")
    if cfg.memory_budget_mb < 1:
        _fail("memory_budget_mb", f"must be >= 1, got {cfg.memory_budget_mb}")
    if cfg.accumulate_dtype not in ("fp32", "fp64"):
        _fail("accumulate_dtype", f"'{cfg.accumulate_dtype}' is not one of fp32, fp64")
    if cfg.output_dtype not in ("input", "fp32", "bf16", "fp16", "fp64"):
        _fail("output_dtype", f"'{cfg.output_dtype}' is not one of input, fp32, bf16, fp16, fp64")
    if cfg.output_format not in ("input", "torch_dist"):
        _fail("output_format", f"'{cfg.output_format}' is not one of input, torch_dist")
    if not cfg.dry_run and not cfg.output:
        _fail("output", "an output checkpoint root is required (or dry_run=true)")
