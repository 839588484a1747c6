"""Real training runs (torchrun, gloo ranks): layouts agree, resume is exact, checkpoints reshard."""

from __future__ import annotations

import pytest

from pma_train.checkpoint import layout
from tests.launch import train

STEPS = 10
# Identical data and weights; only the order of floating-point reductions differs between layouts.
TOL = 2e-4
COMMON = [f"train.iters={STEPS}", "train.log_interval=1", "train.eval_interval=5", "train.eval_iters=2",
          "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=64",
          "schedule.warmup_iters=2", "checkpoint.interval=5", "seed=7"]


def assert_same_losses(a: dict, b: dict, tol: float = TOL) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (sorted(a), sorted(b))
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst < tol, f"losses differ by up to {worst}:\n{a}\n{b}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache):
    """Single rank, tiny model."""
    return train(tmp_path_factory.mktemp("tp1") / "run", COMMON, nproc=1, cache_dir=cache)


@pytest.fixture(scope="module")
def baseline4(tmp_path_factory, cache):
    """Single rank, 4-block model (for pipeline layouts)."""
    return train(tmp_path_factory.mktemp("pp1") / "run", COMMON + ["model=tiny4"], nproc=1, cache_dir=cache)


def test_loss_falls(baseline):
    losses = baseline.losses()
    assert losses[STEPS] < losses[1] - 0.5, losses
    assert baseline.val_losses()[STEPS] < baseline.val_losses()[5]


def test_tp2_matches_tp1(baseline, tmp_path, cache):
    tp2 = train(tmp_path / "run", COMMON + ["parallel.tp=2"], nproc=2, cache_dir=cache)
    assert_same_losses(tp2.losses(), baseline.losses())


def test_dp2_distributed_optimizer_matches_single_rank(baseline, tmp_path, cache):
    dp2 = train(tmp_path / "run", COMMON, nproc=2, cache_dir=cache)
    assert "dp 2" in dp2.output
    assert_same_losses(dp2.losses(), baseline.losses())


def test_pp2_matches_pp1(baseline4, tmp_path, cache):
    pp2 = train(tmp_path / "run", COMMON + ["model=tiny4", "parallel.pp=2"], nproc=2, cache_dir=cache)
    assert_same_losses(pp2.losses(), baseline4.losses())


def test_interleaved_pp2_matches_pp1(baseline4, tmp_path, cache):
    vpp = train(tmp_path / "run", COMMON + ["model=tiny4", "parallel.pp=2", "parallel.vpp=2"], nproc=2, cache_dir=cache)
    assert_same_losses(vpp.losses(), baseline4.losses())


def test_resume_matches_uninterrupted(baseline, tmp_path, cache):
    run_dir = tmp_path / "run"
    first = train(run_dir, COMMON + ["train.exit_after_iters=5"], nproc=1, cache_dir=cache)
    assert max(first.losses()) == 5
    assert layout.read_tracker(run_dir / "checkpoints") == 5
    second = train(run_dir, COMMON, nproc=1, cache_dir=cache)
    assert "start iteration 5" in second.output
    assert_same_losses(second.losses(), baseline.losses(), tol=1e-6)


def test_tp2_checkpoint_resumes_at_tp1(baseline, tmp_path, cache):
    """A TP=2 checkpoint (weights + optimizer) resumed at TP=1 continues the same trajectory."""
    run_dir = tmp_path / "run"
    # Resumed under another layout: the optimizer state must be fully reshardable.
    train(run_dir, COMMON + ["parallel.tp=2", "train.exit_after_iters=5", "checkpoint.optimizer_format=fully_reshardable"], nproc=2, cache_dir=cache)
    resumed = train(run_dir, COMMON, nproc=1, cache_dir=cache)
    assert "start iteration 5" in resumed.output
    assert_same_losses(resumed.losses(), baseline.losses())


def test_tp2_pp2_checkpoint_evaluates_the_same_at_tp1_pp1(tmp_path, cache):
    """Weights and optimizer saved by a TP=2 x PP=2 run load at TP=1 x PP=1: same validation loss."""
    run_dir = tmp_path / "run"
    saved = train(run_dir, COMMON + ["model=tiny4", "parallel.tp=2", "parallel.pp=2", "train.exit_after_iters=5",
                                     "checkpoint.optimizer_format=fully_reshardable"],
                  nproc=4, cache_dir=cache)
    val_at_save = saved.val_losses()[5]
    resumed = train(run_dir, COMMON + ["model=tiny4", "train.eval_at_start=true", "train.exit_after_iters=1"],
                    nproc=1, cache_dir=cache)
    # The resumed run's evaluation at step 5 replaces the saving run's in what readers see.
    resume, first_val = resumed.records("resume")[0], resumed.records("val")[0]
    assert resume["step"] == 5 and first_val["step"] == 5 and first_val["time"] > resume["time"]
    assert abs(resumed.val_losses()[5] - val_at_save) < 1e-5, (resumed.val_losses(), val_at_save)
    assert 6 in resumed.losses()  # and training goes on from the loaded optimizer state
