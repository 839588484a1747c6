"""Validation loss of checkpoints with pma-train's own model, data and eval step (pma-eval)."""

from pma_train.evaluate.evaluator import Evaluator

__all__ = ["Evaluator"]
