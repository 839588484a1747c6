"""Loss-spike detection: robust z-score of the loss against its recent history, and grad norm.

Every rank sees the same (all-reduced) loss and grad norm, so every rank decides alike.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from pma_train.config import SpikeConfig


class SpikeDetector:
    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """The cause if this step is a spike; else None (and the loss joins the history)."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        threshold = self.cfg.grad_norm_threshold
        if threshold is not None and not grad_norm <= threshold:
            return f"grad norm {grad_norm:.3g} exceeds {threshold:.3g}"
        if len(self.history) >= self.cfg.min_history:
            median = statistics.median(self.history)
            # 1.4826 * MAD estimates sigma for normal noise, robustly to earlier outliers.
            sigma = 1.4826 * statistics.median(abs(x - median) for x in self.history) + 1e-6
            score = (loss - median) / sigma
            if score > self.cfg.zscore:
                return f"loss {loss:.4f} is {score:.1f} sigma above the recent median {median:.4f}"
        self.history.append(loss)
        return None


class RecoveryBudget:
    """Refuses a recovery once too many happened within the window: the run cannot recover."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.recoveries: list[int] = []

    def allow(self, iteration: int) -> bool:
        recent = [i for i in self.recoveries if iteration - i < self.cfg.recovery_window]
        self.recoveries = recent + [iteration]
        return len(recent) < self.cfg.max_recoveries
