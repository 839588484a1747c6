"""A training run's checkpoints: the root it owns (under a lock), what each save holds, and the
state a job starts from (its own latest checkpoint, checkpoint.load, init_from, or PMA-init)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from pma_train.checkpoint import layout, readers
from pma_train.checkpoint.layout import CheckpointError
from pma_train.checkpoint.lock import RootLock
from pma_train.checkpoint.megatron_args import megatron_args
from pma_train.checkpoint.origin import INIT_FROM_KEY, init_from_record
from pma_train.checkpoint.sidecar import TrainState
from pma_train.checkpoint.state import load_checkpoint, model_sharded_state_dict, save_checkpoint
from pma_train.config import JobConfig
from pma_train.merge.ds import accept


class Checkpointer:
    def __init__(self, cfg: JobConfig, lock: RootLock | None, padded_vocab_size: int, in_background: bool = False,
                 run_lock: RootLock | None = None):
        self.cfg = cfg
        self.in_background = in_background  # checkpoint.async_save: written behind training, published later
        self.root = Path(cfg.checkpoint.dir)
        self.lock = lock  # held by global rank 0 from before the root was first touched
        self.run_lock = run_lock  # run.dir's (metrics, tracked merges), where it is not the root
        self.padded_vocab_size = padded_vocab_size
        self.last_saved_iteration: int | None = None

    def release_locks(self) -> None:
        for lock in (self.run_lock, self.lock):
            if lock is not None:
                lock.release()

    def path(self, iteration: int) -> Path:
        return self.root / layout.iter_dir_name(iteration)

    def iterations(self) -> list[int]:
        return layout.list_iterations(self.root)

    def save(self, model, optimizer, scheduler, state: TrainState) -> Path:
        """A checkpoint of the run at state.iteration (the optimizer unless checkpoint.save_optimizer=false)."""
        c = self.cfg.checkpoint
        path = save_checkpoint(self.root, model, optimizer if c.save_optimizer else None, scheduler, state,
                               megatron_args(self.cfg, state, self.padded_vocab_size), check_space=c.check_free_space,
                               optim_format=c.optimizer_format, in_background=self.in_background)
        self.last_saved_iteration = state.iteration
        return path

    def save_weights(self, root: Path, model, state: TrainState, records: dict) -> Path:
        """Model weights only (a merge), under another root, with extra records in its sidecar."""
        return save_checkpoint(root, model, None, None, state, megatron_args(self.cfg, state, self.padded_vocab_size),
                               records=records)

    def load_initial(self, model, optimizer, scheduler) -> tuple[TrainState, Path | None, list[str]]:
        """(state, the checkpoint this job continues from or None, lines for the log) of a job's start.

        The run's own checkpoints win over checkpoint.load (a restart resumes itself); an annealing
        branch (schedule=anneal) loads weights, optimizer and data position without a scheduler,
        whose state the branch's own schedule replaces.
        """
        c = self.cfg.checkpoint
        own = self.root if self.iterations() else None
        if self.cfg.schedule.name == "anneal":
            resumed_from = layout.resolve_checkpoint(own or c.load)
            return load_checkpoint(resumed_from, model, optimizer, None), resumed_from, []
        resume_from = own if c.load is None else c.load
        if resume_from is not None:
            kept_optimizer = None if c.no_load_optim else optimizer
            state = load_checkpoint(resume_from, model, kept_optimizer, scheduler)
            if kept_optimizer is None:
                optimizer.reload_model_params()
            resumed_from = layout.resolve_checkpoint(resume_from)
            notes = []
            if c.init_from is not None:  # pma-train's CLI checked these checkpoints started from it
                notes.append(f"checkpoint.init_from: this run started from {c.init_from}; a restart "
                             f"resumes from its own checkpoint {resumed_from}")
            return state, resumed_from, notes
        state, notes = TrainState(), []
        if c.init_from is not None:
            notes += self._load_init_from(model)
            # Recorded in every checkpoint, so a restart knows its own checkpoints (pma_train/checkpoint/origin.py).
            state.extra[INIT_FROM_KEY] = init_from_record(c.init_from)
        elif c.init_merge.root is not None:
            notes.append(self._init_from_merge(model))
        # Mixed precision keeps fp32 main weights in the optimizer: refresh them from the model.
        optimizer.reload_model_params()
        return state, None, notes

    def _load_init_from(self, model) -> list[str]:
        """checkpoint.init_from's weights; a DeepSpeed checkpoint converted first (merge/ds/accept.py) into
        a temporary root under run.dir, checked against this model before. Returns the lines for the log."""
        c = self.cfg.checkpoint
        if not accept.is_deepspeed_checkpoint(c.init_from):
            load_checkpoint(c.init_from, model)
            return []
        _check_fits(model, accept.check_convertible(c.init_from, "checkpoint.init_from"),
                    f"checkpoint.init_from: the DeepSpeed checkpoint {c.init_from}", self.cfg.model.name)
        run_dir = Path(self.cfg.run.dir)
        if dist.get_rank() == 0:  # run.dir's lock is held: what is there was left by a killed job
            accept.remove_leftovers(run_dir, "init_from")
        with accept.converted(c.init_from, run_dir, "init_from", "checkpoint.init_from") as conversion:
            load_checkpoint(conversion.root, model)
        return [conversion.describe("checkpoint.init_from")]

    def _init_from_merge(self, model) -> str:
        """PMA-init: the average of a run's last n checkpoints, loaded shard by shard into this model."""
        from pma_train.merge import merge_weights, select_spaced
        from pma_train.merge.live import average_into_model

        m = self.cfg.checkpoint.init_merge
        chosen = select_spaced(m.root, m.n, m.v_tokens, m.v_iterations, m.end_iteration)
        weights = merge_weights(m.method, len(chosen), m.alpha, decay_shape=m.decay_shape)
        with readers.reading([c.path for c in chosen]):
            average_into_model(model, [c.path for c in chosen], weights)
        return f"PMA-init: {m.method} of iterations {[c.iteration for c in chosen]} of {m.root}"


def _check_fits(model, shapes: dict[str, tuple[int, ...]], what: str, model_name: str) -> None:
    """On every rank alike: `shapes` (a checkpoint's tensors, by key) are exactly this model's tensors in
    their global shapes; else CheckpointError naming the first key that differs."""
    mine: dict[str, tuple[int, ...] | None] = {}
    for leaf in nested_values(model_sharded_state_dict(model)):
        if isinstance(leaf, ShardedTensor):
            mine[leaf.key] = tuple(leaf.global_shape)
        elif isinstance(leaf, ShardedTensorFactory):  # built into tensors at load: the key is what is known
            mine.setdefault(leaf.key, None)
    every = [None] * dist.get_world_size()  # each rank holds its pipeline stage's keys
    dist.all_gather_object(every, mine)
    wanted: dict[str, tuple[int, ...] | None] = {}
    for ranks in every:
        for key, shape in ranks.items():
            wanted[key] = shape if shape is not None else wanted.get(key)
    problems = [f"{key}: {list(shapes[key])} in the checkpoint, {list(shape)} in model {model_name}"
                for key, shape in wanted.items() if key in shapes and shape is not None and shapes[key] != shape]
    problems += [f"has no tensor {key}, which model {model_name} needs" for key in wanted if key not in shapes]
    problems += [f"holds {key}, which model {model_name} lacks" for key in shapes if key not in wanted]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{what} is not of this model's architecture: {problems[0]}{more}")
