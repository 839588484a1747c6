"""Learning-rate schedules: megatron-core's OptimizerParamScheduler, configured from our config.

Units: the scheduler counts *iterations* (optimizer steps). The trainer calls
`scheduler.step(increment=1)` once after each optimizer step, so the
update of iteration i (0-based) uses the LR at `num_steps == i`: 0 at the first update of a
warmup, and `train.min_lr` reached at `num_steps == train.iters`, just after the last update.
(Megatron-LM counts samples instead, stepping by the global batch size; our configs are in
iterations, so counting iterations keeps every number in the checkpoint readable.)

Resuming follows Megatron-LM's defaults (`--override-opt_param-scheduler` and
`--use-checkpoint-opt_param-scheduler` both off): the checkpoint must agree with the config on
max/min LR, warmup, decay end, decay style and weight decay, else loading fails. The WSD decay
window and shape are not part of megatron's state dict, so they may change on resume (decide
when to decay after the stable phase has run).
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from pma_train.config import ConfigError, ScheduleConfig, TrainConfig, decay_window_iters
from pma_train.decay import DECAY_SHAPES


class Scheduler(OptimizerParamScheduler):
    """megatron's scheduler with a resume that sets, rather than adds to, the step count."""

    def load_state_dict(self, state_dict: dict) -> None:
        # megatron restores the position with `self.step(increment=num_steps)`, which adds to
        # wherever this scheduler already is; start from 0 so loading is absolute.
        self.num_steps = 0
        try:
            super().load_state_dict(state_dict)
        except AssertionError as error:  # megatron's strict check of config vs checkpoint
            raise ValueError(f"the checkpoint's LR schedule differs from this run's config: {error}") from error


def build_scheduler(optimizer, schedule: ScheduleConfig, train: TrainConfig, tokens_per_iter: int) -> Scheduler:
    """The LR / weight-decay scheduler of a training run, at iteration 0 (LR already set).

    `optimizer` is anything with `param_groups`: megatron's optimizer, or a torch one. megatron's
    groups carry `max_lr`/`min_lr` (from OptimizerConfig, i.e. train.lr/min_lr), which take
    precedence over the values given here, and `wd_mult` (0 for norms and biases); a torch
    optimizer's groups need no extra keys.
    """
    if not 0.0 <= train.min_lr <= train.lr:
        raise ConfigError(f"train.min_lr: {train.min_lr} must be in [0, train.lr={train.lr}]")
    decay_end, wsd_window, wsd_shape = train.iters, None, None
    if schedule.name == "constant":
        # 'constant' never decays, so the decay end only has to exceed the warmup. Keeping it
        # independent of train.iters lets a constant-LR run be extended on resume (megatron
        # checks it against the checkpoint).
        style, decay_end = "constant", schedule.warmup_iters + 1
    elif schedule.name == "cosine":
        style = "cosine"
    elif schedule.name == "wsd":
        if schedule.decay_shape not in DECAY_SHAPES:
            raise ConfigError(f"schedule.decay_shape: '{schedule.decay_shape}' is not one of {', '.join(DECAY_SHAPES)}")
        # megatron's WSD is stable from the end of warmup to decay_end - window, then decays.
        style, wsd_window = "WSD", decay_window_iters(schedule, train, tokens_per_iter)
        wsd_shape = DECAY_SHAPES[schedule.decay_shape].megatron_style
    else:
        raise ConfigError(f"schedule.name: '{schedule.name}' is not one of constant, wsd, cosine")
    return Scheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=schedule.warmup_iters,
        lr_decay_steps=decay_end,
        lr_decay_style=style,
        wsd_decay_steps=wsd_window,
        lr_wsd_decay_style=wsd_shape,
        # Constant weight decay; the steps only matter to megatron's resume check.
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=decay_end,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
    )


class _AnnealingScheduler(Scheduler):
    # The branch's start/final LR are absolute: ignore the `max_lr`/`min_lr` that megatron's
    # optimizer keeps in each param group (they are the main run's). Leaving the groups untouched
    # also keeps them matching the main run's optimizer checkpoint, which megatron pairs by them.
    def get_lr(self, param_group: dict) -> float:
        return super().get_lr({})


def build_annealing_scheduler(optimizer, start_iter: int, start_lr: float, final_lr: float,
                              anneal_iters: int, shape: str, *, weight_decay: float) -> Scheduler:
    """An annealing branch: start_lr until start_iter, then `shape` down to final_lr over
    anneal_iters iterations, final_lr after. Returned positioned at start_iter (the LR of that
    iteration's update is start_lr); resume it by building it the same way and loading its state.

    It is megatron's WSD with no warmup whose decay window is the last anneal_iters iterations
    before start_iter + anneal_iters.
    """
    if shape not in DECAY_SHAPES:
        raise ValueError(f"shape: '{shape}' is not one of {', '.join(DECAY_SHAPES)}")
    if start_iter < 0 or anneal_iters < 1:
        raise ValueError(f"need start_iter >= 0 and anneal_iters >= 1, got {start_iter} and {anneal_iters}")
    if not 0.0 <= final_lr <= start_lr:
        raise ValueError(f"need 0 <= final_lr <= start_lr, got final_lr={final_lr}, start_lr={start_lr}")
    scheduler = _AnnealingScheduler(
        optimizer,
        init_lr=start_lr,  # unused without warmup; megatron requires init_lr <= max_lr
        max_lr=start_lr,
        min_lr=final_lr,
        lr_warmup_steps=0,
        lr_decay_steps=start_iter + anneal_iters,
        lr_decay_style="WSD",
        wsd_decay_steps=anneal_iters,
        lr_wsd_decay_style=DECAY_SHAPES[shape].megatron_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=start_iter + anneal_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
    )
    scheduler.step(increment=start_iter)
    return scheduler


def build_annealing_branch(optimizer, train: TrainConfig, schedule: ScheduleConfig, start_iter: int,
                           iteration: int) -> Scheduler:
    """schedule=anneal: the scheduler of a branch forked at start_iter that anneals train.lr to
    train.min_lr by train.iters, positioned at `iteration` (a restarted branch resumes where it was)."""
    if train.iters <= start_iter:
        raise ConfigError(f"train.iters: {train.iters} must be beyond the fork's iteration {start_iter} "
                          "for an annealing branch")
    scheduler = build_annealing_scheduler(optimizer, start_iter, train.lr, train.min_lr, train.iters - start_iter,
                                          schedule.decay_shape, weight_decay=train.weight_decay)
    scheduler.step(increment=iteration - start_iter)
    return scheduler
