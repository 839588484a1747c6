"""The PMA features of a training run, as callbacks (pma_train/train/hooks.py), in the order the
trainer calls them: spike injection (a testing aid) and recovery, MoE router metrics, checkpoint
retention, the tracked merge, TE's CUDA graphs (perf.cuda_graph_impl).
Retention runs before the tracker's snapshot of the same save."""

from __future__ import annotations

from pma_train.checkpoint import async_save
from pma_train.checkpoint.retention import prune
from pma_train.config import JobConfig, track_spacing_iters
from pma_train.train.cuda_graphs import TECudaGraphs
from pma_train.train.hooks import Callback
from pma_train.train.moe_metrics import MoEMetrics
from pma_train.train.spike import SpikeInjection, SpikeRecovery
from pma_train.train.tracking import TrackedMerge


class Retention(Callback):
    """After each save (rank 0): delete the checkpoints checkpoint.retention no longer keeps."""

    def __init__(self, cfg: JobConfig):
        r, tr = cfg.checkpoint.retention, cfg.track
        self.grid_every = r.grid_every or (track_spacing_iters(cfg) if tr.enabled else None)
        self.grid_last = r.grid_last if r.grid_last is not None else (tr.n if tr.enabled else None)
        # Spike recovery merges the last few checkpoints: keep enough of them.
        self.keep_last = max(r.keep_last, cfg.spike.merge_last + 1 if cfg.spike.enabled else 0)

    def after_save(self, trainer, path) -> None:
        if trainer.rank0:  # once the save is published: retention counts published checkpoints
            async_save.after_current(lambda iteration=trainer.state.iteration: self._prune(trainer, iteration))

    def _prune(self, trainer, iteration: int) -> None:
        deleted = prune(trainer.checkpointer.root, self.keep_last, self.grid_every, self.grid_last)
        if deleted:
            trainer.log.log(iteration, {"deleted_iterations": deleted}, kind="retention")


def build_callbacks(cfg: JobConfig, model) -> list[Callback]:
    callbacks: list[Callback] = []
    if cfg.spike.inject_at is not None:
        callbacks.append(SpikeInjection(cfg.spike))
    if cfg.spike.enabled:
        callbacks.append(SpikeRecovery(cfg.spike))
    if cfg.model.num_experts:
        callbacks.append(MoEMetrics(model, model[0].config, cfg.model.pattern(), cfg.parallel.sequence_parallel))
    if cfg.checkpoint.retention.enabled:
        callbacks.append(Retention(cfg))
    if cfg.track.enabled:
        callbacks.append(TrackedMerge(cfg, model))
    if cfg.perf.cuda_graph_impl == "transformer_engine":
        callbacks.append(TECudaGraphs())
    return callbacks
