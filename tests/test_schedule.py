"""LR schedules: values against formulas written out here, independent of megatron's code."""

import io
import math

import pytest
import torch

from pma_train.config import ConfigError, ScheduleConfig, TrainConfig
from pma_train.schedule import build_annealing_scheduler, build_scheduler

LR, MIN_LR, WD = 1e-3, 1e-4, 0.1
TOKENS_PER_ITER = 16 * 128


def optimizer(megatron_groups=False):
    """AdamW over one dummy parameter. With megatron_groups, a second group shaped like those of
    megatron's get_megatron_optimizer (max_lr/min_lr from OptimizerConfig, wd_mult 0 for norms)."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]}]
    if megatron_groups:
        groups.append({"params": [torch.nn.Parameter(torch.zeros(1))], "max_lr": LR, "min_lr": MIN_LR,
                       "wd_mult": 0.0, "lr_mult": 1.0, "default_config": True})
    return torch.optim.AdamW(groups, lr=123.0)


def train_config(iters=100):
    return TrainConfig(iters=iters, lr=LR, min_lr=MIN_LR, weight_decay=WD)


def lrs(scheduler, steps):
    """The LR of the update of each iteration 0..steps-1, stepping as the trainer does."""
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return out


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-18)


# The decay shapes as functions of the decay progress r in [0, 1] (1 at r=0, 0 at r=1).
SHAPES = {
    "linear": lambda r: 1 - r,
    "cosine": lambda r: (1 + math.cos(math.pi * r)) / 2,
    "1-sqrt": lambda r: 1 - math.sqrt(r),
    "exponential": lambda r: 2 ** (1 - r) - 1,
}


@pytest.mark.parametrize("megatron_groups", [False, True])
def test_constant(megatron_groups):
    opt = optimizer(megatron_groups)
    got = lrs(build_scheduler(opt, ScheduleConfig(name="constant", warmup_iters=10), train_config(), TOKENS_PER_ITER), 250)
    assert got[0] == 0.0  # warmup starts at 0
    assert close(got[5], 5e-4)  # warmup middle
    assert close(got[10], LR)  # warmup end
    assert all(close(got[i], LR * i / 10) for i in range(11))
    assert all(lr == LR for lr in got[10:])  # stable, also past train.iters
    for group in opt.param_groups:  # every group follows the schedule; weight decay is constant
        assert group["lr"] == LR and group["weight_decay"] == WD * group.get("wd_mult", 1.0)


def test_constant_without_warmup():
    got = lrs(build_scheduler(optimizer(), ScheduleConfig(name="constant", warmup_iters=0), train_config(), TOKENS_PER_ITER), 3)
    assert got == [LR, LR, LR]


def expected_wsd(i, warmup, window, iters, shape):
    if i <= warmup:
        return LR * i / warmup
    if i <= iters - window:
        return LR
    r = min(1.0, (i - (iters - window)) / window)
    return MIN_LR + SHAPES[shape](r) * (LR - MIN_LR)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant, window", [
    (dict(decay_fraction=0.2), 20),
    (dict(decay_iters=30, decay_fraction=0.5), 30),  # iters win over the fraction
    (dict(decay_tokens=40 * TOKENS_PER_ITER + 100, decay_iters=30), 40),  # tokens win, rounded
])
def test_wsd(shape, variant, window):
    schedule = ScheduleConfig(name="wsd", warmup_iters=10, decay_shape=shape, **variant)
    got = lrs(build_scheduler(optimizer(), schedule, train_config(), TOKENS_PER_ITER), 110)
    start, middle = 100 - window, 100 - window // 2
    assert got[0] == 0.0 and close(got[5], 5e-4) and close(got[10], LR)  # warmup
    assert all(lr == LR for lr in got[10:start + 1])  # stable, up to the decay start
    assert close(got[middle], MIN_LR + SHAPES[shape](0.5) * (LR - MIN_LR))  # decay middle
    assert close(got[100], MIN_LR) and all(close(lr, MIN_LR) for lr in got[100:])  # end = train.iters
    assert all(close(got[i], expected_wsd(i, 10, window, 100, shape)) for i in range(110))


def test_wsd_middle_values_by_hand():
    # Decay 80 -> 100; at iteration 90 the decay is half done.
    half = {}
    for shape in SHAPES:
        schedule = ScheduleConfig(name="wsd", warmup_iters=10, decay_shape=shape, decay_fraction=0.2)
        half[shape] = lrs(build_scheduler(optimizer(), schedule, train_config(), TOKENS_PER_ITER), 91)[90]
    assert close(half["linear"], 5.5e-4)
    assert close(half["cosine"], 5.5e-4)
    assert close(half["1-sqrt"], 1e-4 + (1 - 0.5 ** 0.5) * 9e-4)
    assert close(half["exponential"], 1e-4 + (2 ** 0.5 - 1) * 9e-4)


def test_cosine():
    got = lrs(build_scheduler(optimizer(), ScheduleConfig(name="cosine", warmup_iters=10), train_config(), TOKENS_PER_ITER), 105)
    assert got[0] == 0.0 and close(got[5], 5e-4) and close(got[10], LR)
    assert close(got[40], 7.75e-4)  # a third of the decay: cos(pi/3) = 1/2
    assert close(got[55], 5.5e-4)  # decay middle
    assert close(got[100], MIN_LR) and close(got[104], MIN_LR)
    assert all(close(got[i], MIN_LR + SHAPES["cosine"]((i - 10) / 90) * (LR - MIN_LR)) for i in range(10, 101))


@pytest.mark.parametrize("variant", [dict(decay_iters=91), dict(decay_iters=0), dict(decay_tokens=100),
                                     dict(decay_fraction=1.0)])
def test_wsd_window_must_fit_after_warmup(variant):
    with pytest.raises(ConfigError, match="schedule.decay_"):
        build_scheduler(optimizer(), ScheduleConfig(name="wsd", warmup_iters=10, **variant), train_config(), TOKENS_PER_ITER)


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", ["constant", "wsd", "cosine"])
def test_state_dict_resumes_the_same_lrs(name):
    schedule = ScheduleConfig(name=name, warmup_iters=10, decay_shape="1-sqrt", decay_fraction=0.3)
    reference = lrs(build_scheduler(optimizer(), schedule, train_config(), TOKENS_PER_ITER), 120)

    first = build_scheduler(optimizer(), schedule, train_config(), TOKENS_PER_ITER)
    lrs(first, 37)
    state = roundtrip(first.state_dict())
    resumed = build_scheduler(optimizer(), schedule, train_config(), TOKENS_PER_ITER)
    resumed.step(increment=5)  # loading sets the position; megatron's own load would add to it
    resumed.load_state_dict(state)
    assert resumed.num_steps == 37
    assert lrs(resumed, 120 - 37) == reference[37:]


def test_resume_with_another_schedule_fails():
    first = build_scheduler(optimizer(), ScheduleConfig(name="cosine"), train_config(), TOKENS_PER_ITER)
    first.step(increment=30)
    changed = build_scheduler(optimizer(), ScheduleConfig(name="cosine"), TrainConfig(iters=100, lr=2e-3), TOKENS_PER_ITER)
    with pytest.raises(ValueError, match="differs"):
        changed.load_state_dict(first.state_dict())


def test_constant_run_can_be_extended_and_wsd_decay_chosen_on_resume():
    first = build_scheduler(optimizer(), ScheduleConfig(name="constant"), train_config(100), TOKENS_PER_ITER)
    first.step(increment=100)
    longer = build_scheduler(optimizer(), ScheduleConfig(name="constant"), train_config(500), TOKENS_PER_ITER)
    longer.load_state_dict(first.state_dict())
    assert longer.num_steps == 100 and longer.optimizer.param_groups[0]["lr"] == LR

    # The WSD window and shape are not in megatron's state dict: they may change on resume.
    wsd = build_scheduler(optimizer(), ScheduleConfig(name="wsd", decay_fraction=0.1), train_config(), TOKENS_PER_ITER)
    wsd.step(increment=50)
    later = build_scheduler(optimizer(), ScheduleConfig(name="wsd", decay_fraction=0.5, decay_shape="linear"),
                            train_config(), TOKENS_PER_ITER)
    later.load_state_dict(wsd.state_dict())
    assert lrs(later, 26)[25] == pytest.approx(MIN_LR + 0.5 * (LR - MIN_LR), rel=1e-12)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_annealing_branch(shape):
    start_lr, final_lr = 1e-3, 1e-5
    # The main run's param groups (max_lr = train.lr) must not leak into the branch.
    opt = optimizer(megatron_groups=True)
    opt.param_groups[1]["max_lr"] = 3e-3
    scheduler = build_annealing_scheduler(opt, start_iter=1000, start_lr=start_lr, final_lr=final_lr,
                                          anneal_iters=100, shape=shape, weight_decay=WD)
    assert scheduler.num_steps == 1000
    got = lrs(scheduler, 150)  # iterations 1000 .. 1149
    assert got[0] == start_lr  # the update of start_iter
    assert close(got[50], final_lr + SHAPES[shape](0.5) * (start_lr - final_lr))
    assert close(got[100], final_lr) and close(got[149], final_lr)  # constant after
    assert all(close(got[i], final_lr + SHAPES[shape](i / 100) * (start_lr - final_lr)) for i in range(101))
    assert all(group["lr"] == final_lr for group in opt.param_groups)
    assert [group["weight_decay"] for group in opt.param_groups] == [WD, 0.0]

    # Resume inside the branch.
    again = build_annealing_scheduler(optimizer(), 1000, start_lr, final_lr, 100, shape, weight_decay=WD)
    partial = build_annealing_scheduler(optimizer(), 1000, start_lr, final_lr, 100, shape, weight_decay=WD)
    lrs(partial, 30)
    again.load_state_dict(roundtrip(partial.state_dict()))
    assert lrs(again, 120) == got[30:]


def test_annealing_branch_from_zero_and_bad_input():
    got = lrs(build_annealing_scheduler(optimizer(), 0, 1e-3, 0.0, 4, "linear", weight_decay=0.0), 6)
    assert [round(lr, 12) for lr in got] == [1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0, 0.0]
    with pytest.raises(ValueError, match="shape"):
        build_annealing_scheduler(optimizer(), 0, 1e-3, 0.0, 4, "step", weight_decay=0.0)
    with pytest.raises(ValueError, match="final_lr"):
        build_annealing_scheduler(optimizer(), 0, 1e-3, 2e-3, 4, "linear", weight_decay=0.0)
