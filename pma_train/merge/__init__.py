"""PMA merging: weights, checkpoint selection, the sharded offline engine, and the in-job API."""

from pma_train.merge.select import CheckpointInfo, SelectionError, describe, resolve_inputs, select_spaced
from pma_train.merge.weights import WeightError, decay, ema, merge_weights, sma, wma

__all__ = ["CheckpointInfo", "SelectionError", "WeightError", "decay", "describe", "ema", "merge_weights",
           "resolve_inputs", "select_spaced", "sma", "wma"]
