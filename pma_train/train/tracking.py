"""The merge tracked during training (track.enabled) as a training callback: a snapshot at every grid
checkpoint, the merge's validation loss next to the live one (and its save), its cost at the end."""

from __future__ import annotations

import time

import torch.distributed as dist

from pma_train.checkpoint.lock import LockError
from pma_train.checkpoint.retention import prune
from pma_train.config import JobConfig, track_rank_dir, track_spacing_iters
from pma_train.merge.track import MergeTracker
from pma_train.merge.track_store import open_store
from pma_train.train.hooks import Callback


class TrackedMerge(Callback):
    def __init__(self, cfg: JobConfig, model):
        tr = cfg.track
        self.cfg = cfg
        self.tracker = MergeTracker.for_model(model, tr, _store_on_every_rank(cfg))
        self.spacing = track_spacing_iters(cfg)
        self.seconds = 0.0  # what the snapshots cost the training loop

    def on_resume(self, trainer, rewound: bool) -> None:
        if rewound:  # snapshots past the restored state belong to the undone trajectory
            self.tracker.drop_after(trainer.state.iteration)
            return
        # A resumed run rebuilds its window from the grid checkpoints it already wrote (a disk store
        # started empty: what an earlier process left is deleted, never read).
        grid = [i for i in trainer.checkpointer.iterations() if i % self.spacing == 0 and i <= trainer.state.iteration]
        for iteration in grid[-self.cfg.track.n:]:
            with self.tracker.loaded(trainer.model, trainer.checkpointer.path(iteration)):
                self.tracker.add(iteration)

    def after_save(self, trainer, path) -> None:
        iteration = trainer.state.iteration
        if iteration % self.spacing == 0:
            start = time.perf_counter()
            self.tracker.add(iteration)
            self.seconds += time.perf_counter() - start

    def after_eval(self, trainer) -> dict:
        """Validation loss of the tracked merge (and its save), once its window is full."""
        if not self.tracker.ready:
            return {}
        tr = self.cfg.track
        with self.tracker.swapped_in():
            loss = trainer.evaluate()
            if tr.save:
                merged = trainer.run_dir / "merged"
                trainer.checkpointer.save_weights(merged, trainer.model, trainer.state, records={"pma_track": {
                    "iterations": self.tracker.iterations, "weights": self.tracker.weights(), "method": tr.method}})
                if tr.save_keep_last is not None and trainer.rank0:
                    prune(merged, tr.save_keep_last, None, None)
        return {"loss_merged": loss, "merged_iterations": self.tracker.iterations}

    def on_train_end(self, trainer, summary: dict) -> None:
        summary["track_seconds"] = self.seconds
        trainer.log.log(trainer.state.iteration, {"train_step_seconds": trainer.train_seconds,
                                                  "track_snapshot_seconds": self.seconds,
                                                  "track_overhead": self.seconds / max(trainer.train_seconds, 1e-9),
                                                  "track_snapshot_bytes": self.tracker.snapshot_bytes(),
                                                  "track_disk_bytes": self.tracker.disk_bytes()},
                        kind="track")
        self.tracker.close()  # a resumed run rebuilds its window from the checkpoints


def _store_on_every_rank(cfg: JobConfig):
    """The snapshots' store (track.storage=disk: in this rank's own directory, as its share differs
    from every other rank's). A directory another job holds refuses on every rank alike, naming it:
    no rank is left waiting in a collective for the one that failed."""
    tr, store, error = cfg.track, None, None
    if tr.storage == "host":
        return open_store("host", None, 0)
    try:
        store = open_store(tr.storage, track_rank_dir(cfg, dist.get_rank()), tr.buffer_mb << 20,
                           cfg.checkpoint.force_unlock)
    except LockError as err:
        error = str(err)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    refused = next((e for e in errors if e is not None), None)
    if refused is not None:
        if store is not None:
            store.close()
        raise LockError(f"track.dir: {refused}")
    return store
