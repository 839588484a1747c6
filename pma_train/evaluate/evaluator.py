"""Build the model and validation data once, then evaluate any number of checkpoints.

The numbers are the trainer's own (same datasets, same eval step, same reduction), so a
checkpoint evaluated here gives the validation loss its run logged at that iteration.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from pma_train.checkpoint.state import load_checkpoint
from pma_train.config import JobConfig, ScheduleConfig, SpikeConfig, TrackConfig


class Evaluator:
    def __init__(self, cfg: JobConfig, work_dir: str | Path | None = None):
        from pma_train.train.trainer import Trainer

        work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="pma-eval-"))
        # A fresh, empty checkpoint dir: the evaluator never resumes or writes checkpoints of its own.
        cfg = replace(cfg, run=replace(cfg.run, dir=str(work)),
                      checkpoint=replace(cfg.checkpoint, dir=str(work / "no-checkpoints"), load=None, init_from=None,
                                         init_merge=replace(cfg.checkpoint.init_merge, root=None)),
                      train=replace(cfg.train, eval_at_start=False),
                      schedule=ScheduleConfig(), track=TrackConfig(), spike=SpikeConfig(),
                      logging=replace(cfg.logging, progress_bar=False, wandb=replace(cfg.logging.wandb, mode="disabled")))
        self.trainer = Trainer(cfg)

    def evaluate(self, checkpoint: str | Path) -> dict:
        """Validation loss of one checkpoint (root or iter_* dir, any parallel layout)."""
        state = load_checkpoint(checkpoint, self.trainer.model)
        return {"checkpoint": str(checkpoint), "iteration": state.iteration,
                "consumed_tokens": state.consumed_tokens, "val_loss": self.trainer.evaluate()}

    def close(self) -> None:
        self.trainer.log.close()
