"""What a job is made of, built once from its config: `build(cfg)` for training (pma-train), and
`build(cfg, training=False)` for evaluation (pma-eval: the model and the validation data, nothing
that only training needs). Both evaluate with the same model, data and eval step, so a checkpoint
evaluated by pma-eval gives the validation loss its run logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import OmegaConf

from pma_train import platform as platform_mod
from pma_train.checkpoint import layout, rng
from pma_train.checkpoint.lock import LockError, RootLock, acquire_on_rank0
from pma_train.checkpoint.sidecar import TrainState
from pma_train.config import JobConfig, validate
from pma_train.config.perf import cuda_connections
from pma_train.data import EvalIterator, MicroBatchIterator, Prefetcher, build_datasets, build_tokenizer
from pma_train.metrics import MetricsLogger
from pma_train.model import build_model, padded_vocab_size
from pma_train.model.build import resolved
from pma_train.model.spec import initialize_userbuffers
from pma_train.parallel import init_distributed, set_cuda_device_max_connections
from pma_train.schedule import build_annealing_branch, build_scheduler
from pma_train.train.checkpointer import Checkpointer
from pma_train.train.optim import build_optimizer, wrap_ddp


@dataclass
class Components:
    cfg: JobConfig  # rank 0's, on every rank
    platform: platform_mod.Platform
    model: list  # the model chunks of this rank (one per virtual pipeline stage); DDP-wrapped to train
    valid_data: object | None  # None where data.split gives validation no share
    num_microbatches: int  # per global batch and data-parallel rank
    # Training only:
    optimizer: object | None = None
    scheduler: object | None = None
    train_data: object | None = None
    train_iters: object | None = None  # an iterator of micro-batches, or one per chunk (virtual pipeline)
    checkpointer: Checkpointer | None = None
    log: MetricsLogger | None = None
    state: TrainState = field(default_factory=TrainState)
    resumed_from: Path | None = None  # the checkpoint this job continues from, if any
    notes: list[str] = field(default_factory=list)  # lines for the start of the log

    @property
    def model_config(self):
        return self.model[0].config

    def train_iterators(self, consumed_samples: int):
        """Micro-batches of the training data from `consumed_samples` on (read ahead: data.prefetch)."""
        d = self.cfg.data
        sources = self._per_chunk(lambda: MicroBatchIterator(
            self.train_data, self.cfg.train.micro_batch_size, *_dp_rank_and_size(), consumed_samples,
            num_workers=d.num_workers))
        depth = d.prefetch if d.prefetch is not None else (2 if self.platform.is_cuda else 0)
        if depth == 0:
            return sources
        # Threads start only once every chunk's loader workers are forked (forking beside a running
        # thread may copy a lock it holds).
        if isinstance(sources, list):
            return [Prefetcher(s, depth, self.platform.device) for s in sources]
        return Prefetcher(sources, depth, self.platform.device)

    def eval_iterators(self):
        """The validation micro-batches, from the first one again."""
        return self._per_chunk(lambda: iter(EvalIterator(self.valid_data, self.cfg.train.micro_batch_size,
                                                         *_dp_rank_and_size())))

    def _per_chunk(self, make):
        # Each virtual pipeline chunk pulls its own copy of the same micro-batch sequence.
        return [make() for _ in self.model] if len(self.model) > 1 else make()


def build(cfg: JobConfig, *, training: bool = True) -> Components:
    validate(cfg)  # before any process group: bad input fails fast and touches nothing
    platform = platform_mod.detect(cfg.parallel.backend)
    # Before anything may start CUDA (detecting Transformer Engine imports it).
    set_cuda_device_max_connections(cuda_connections(cfg, platform.is_cuda),
                                    explicit=cfg.perf.cuda_device_max_connections is not None)
    cfg = resolved(cfg, platform)  # the perf settings for this host, or an error naming the key
    init_distributed(cfg.parallel, platform, cfg.seed, te_rng_tracker=cfg.perf.cuda_graph_impl != "none")
    cfg = _same_config_on_all_ranks(cfg)
    if cfg.perf.tp_comm_overlap:
        initialize_userbuffers(cfg)
    return _build_training(cfg, platform) if training else _build_evaluation(cfg, platform)


def _build_evaluation(cfg: JobConfig, platform) -> Components:
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, platform, tokenizer.vocab_size)
    _, valid = build_datasets(cfg.data, tokenizer, cfg.train.seq_length, cfg.seed,
                              (None, cfg.train.eval_iters * cfg.train.global_batch_size))
    return Components(cfg, platform, model, valid, _num_microbatches(cfg))


def _lock_run_dir(run_dir: Path, ckpt_root: Path, force: bool, ckpt_lock: RootLock | None) -> RootLock | None:
    """run.dir's own lock (two jobs would interleave metrics.jsonl and tracked merges), unless it is
    the checkpoint root, whose lock already covers it. A refusal frees the root's lock first."""
    if run_dir.resolve() == ckpt_root.resolve():
        return None
    try:
        return acquire_on_rank0(run_dir, force, "checkpoint.force_unlock=true", "pma-train")
    except LockError:
        if ckpt_lock is not None:
            ckpt_lock.release()
        raise


def _build_training(cfg: JobConfig, platform) -> Components:
    run_dir, ckpt_root = Path(cfg.run.dir), Path(cfg.checkpoint.dir)
    # Before anything touches the root (a second job would delete this one's in-flight save).
    lock = acquire_on_rank0(ckpt_root, cfg.checkpoint.force_unlock, "checkpoint.force_unlock=true", "pma-train")
    run_lock = _lock_run_dir(run_dir, ckpt_root, cfg.checkpoint.force_unlock, lock)
    rank0 = dist.get_rank() == 0
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        layout.remove_stale_temporaries(ckpt_root)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

    tokenizer = build_tokenizer(cfg.data.tokenizer)
    chunks = build_model(cfg, platform, tokenizer.vocab_size)
    model = wrap_ddp(chunks, chunks[0].config, cfg)
    optimizer = build_optimizer(model, cfg, chunks[0].config)
    t = cfg.train
    anneal = cfg.schedule.name == "anneal"
    scheduler = None if anneal else build_scheduler(optimizer, cfg.schedule, t, t.global_batch_size * t.seq_length)
    a = cfg.checkpoint.async_save  # None: asynchronous where the state lives on a GPU
    checkpointer = Checkpointer(cfg, lock, padded_vocab_size(tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by),
                                run_lock=run_lock,
                                in_background=platform.is_cuda if a is None else a)
    state, resumed_from, notes = checkpointer.load_initial(model, optimizer, scheduler)
    if anneal:  # the branch's schedule starts where it forked, which the loaded state says
        start = state.extra.setdefault("anneal_start_iteration", state.iteration)
        scheduler = build_annealing_branch(optimizer, t, cfg.schedule, start, state.iteration)
        notes.append(f"annealing branch: from iteration {start} (lr {t.lr:g}) to {t.iters} "
                     f"(lr {t.min_lr:g}, {cfg.schedule.decay_shape})")

    # What is built from here on draws random numbers (data loader seeds) that an uninterrupted
    # run drew before its checkpoint: undone here, so a resumed run steps on exactly.
    with rng.preserved():
        train, valid = build_datasets(cfg.data, tokenizer, t.seq_length, cfg.seed,
                                      (t.iters * t.global_batch_size, t.eval_iters * t.global_batch_size))
        parts = Components(cfg, platform, model, valid, _num_microbatches(cfg), optimizer, scheduler, train,
                           checkpointer=checkpointer, state=state, resumed_from=resumed_from, notes=notes)
        parts.train_iters = parts.train_iterators(state.consumed_samples)
        parts.log = MetricsLogger(cfg, run_dir, t.iters, state.iteration, enabled=rank0)
    if resumed_from is not None:
        # Readers let the records that follow replace those of the same steps (pma_train/metrics.py).
        parts.log.log(state.iteration, {"iteration": state.iteration, "checkpoint": str(resumed_from)}, kind="resume")
    return parts


def _num_microbatches(cfg: JobConfig) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * parallel_state.get_data_parallel_world_size())


def _dp_rank_and_size() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def _same_config_on_all_ranks(cfg: JobConfig) -> JobConfig:
    # Interpolations such as ${now:...} may resolve differently per rank: rank 0's version wins.
    holder = [cfg]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
