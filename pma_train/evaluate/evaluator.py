"""Build the model and validation data once, then evaluate any number of checkpoints.

The numbers are the trainer's own (same model, validation data, eval step and reduction: see
pma_train/train/components.py), so a checkpoint evaluated here gives the validation loss its run
logged at that iteration. Nothing of training is built: no optimizer, training data or run directory.
"""

from __future__ import annotations

from pathlib import Path

from pma_train.checkpoint.state import load_checkpoint
from pma_train.config import JobConfig
from pma_train.train.components import build
from pma_train.train.step import DataTimer, make_forward_step, validation_loss


class Evaluator:
    def __init__(self, cfg: JobConfig):
        self.parts = build(cfg, training=False)
        self.forward_step = make_forward_step(self.parts.platform.device, DataTimer())

    def evaluate(self, checkpoint: str | Path) -> dict:
        """Validation loss of one checkpoint (root or iter_* dir, any parallel layout)."""
        state = load_checkpoint(checkpoint, self.parts.model)
        return {"checkpoint": str(checkpoint), "iteration": state.iteration,
                "consumed_tokens": state.consumed_tokens, "val_loss": validation_loss(self.parts, self.forward_step)}
