"""Loss spikes: detection (robust z-score of the loss against its recent history, and grad norm) and
recovery (the merge of the last good checkpoints), as a training callback; and the testing aid that
provokes one.

Every rank sees the same (all-reduced) loss and grad norm, so every rank decides alike.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch.distributed as dist

from pma_train.checkpoint import async_save, layout
from pma_train.checkpoint.state import load_checkpoint
from pma_train.config import SpikeConfig
from pma_train.train.hooks import Callback


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


class SpikeRecovery(Callback):
    """After each step: on a spike, restore the merge of the last good checkpoints (the optimizer from
    the newest of them) and go on from there; the step is undone."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.detector = SpikeDetector(cfg)
        self.budget = RecoveryBudget(cfg)

    def after_step(self, trainer, result) -> bool:
        cause = self.detector.check(result.loss, result.grad_norm)
        if cause is None:
            return False
        self._recover(trainer, trainer.state.iteration, cause)
        return True

    def _recover(self, trainer, iteration: int, cause: str) -> None:
        from pma_train.merge.live import average_into_model
        from pma_train.merge.weights import sma

        sp, checkpoints = self.cfg, trainer.checkpointer
        async_save.wait()  # the checkpoint in flight may be one to recover from
        good = [i for i in checkpoints.iterations() if i <= iteration - sp.guard_iters][-sp.merge_last:]
        if not good:
            raise RuntimeError(f"loss spike at iteration {iteration} ({cause}) and no checkpoint saved at least "
                               f"{sp.guard_iters} iterations before it to recover from: stopping")
        if not self.budget.allow(iteration):
            raise RuntimeError(f"loss spike at iteration {iteration} ({cause}): more than {sp.max_recoveries} "
                               f"recoveries within {sp.recovery_window} iterations, the run does not recover: stopping")
        samples, tokens = trainer.state.consumed_samples, trainer.state.consumed_tokens
        paths = [checkpoints.path(i) for i in good]
        state = load_checkpoint(paths[-1], trainer.model, trainer.optimizer if sp.restore_optimizer else None,
                                trainer.scheduler)
        average_into_model(trainer.model, paths, sma(len(paths)))
        trainer.optimizer.reload_model_params()
        skipped = samples - state.consumed_samples if sp.skip_data else 0
        if sp.skip_data:  # go on past the data that led into the spike
            state.consumed_samples, state.consumed_tokens = samples, tokens
        trainer.rewind(state)
        # Checkpoints saved after the restored point may hold the spike: a job that died before
        # re-saving them would resume from one. Move them aside (not deleted).
        set_aside = layout.set_aside(checkpoints.root, state.iteration, f"spiked-at-{iteration}") if trainer.rank0 else []
        dist.barrier()
        trainer.log.log(iteration, {"cause": cause, "restored_iteration": state.iteration, "merged_iterations": good,
                                    "optimizer_from": good[-1] if sp.restore_optimizer else None,
                                    "skipped_samples": skipped, "set_aside_iterations": set_aside},
                        kind="recovery")


class SpikeInjection(Callback):
    """Testing aid (spike.inject_at): spike.inject_iters consecutive steps at LR x inject_lr_mult, once per run."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.steps_left: int | None = None

    def before_step(self, trainer) -> None:
        if self.steps_left == 0 or trainer.state.iteration < self.cfg.inject_at:
            return
        if self.steps_left is None:
            self.steps_left = self.cfg.inject_iters
        self.steps_left -= 1
        for group in trainer.optimizer.param_groups:
            group["lr"] *= self.cfg.inject_lr_mult
