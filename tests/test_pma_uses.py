"""PMA's uses inside training: PMA-init from a run's merged checkpoints, and annealing branches."""

from __future__ import annotations

import pytest

from tests.launch import train
from tests.test_merge import merge_cli

COMMON = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=64", "train.log_interval=1",
          "train.eval_interval=100", "train.eval_iters=2", "checkpoint.interval=4", "schedule.warmup_iters=2", "seed=5"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A constant-LR run with checkpoints every 4 iterations."""
    return train(tmp_path_factory.mktemp("src") / "run", COMMON + ["train.iters=16"], nproc=1)


def test_pma_init_starts_at_the_merged_models_validation_loss(source, tmp_path):
    root = source.run_dir / "checkpoints"
    merged = tmp_path / "merged"
    proc = merge_cli([f"root={root}", "n=3", "v_iterations=4", "method=wma", f"output={merged}"], nproc=None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    start = ["train.iters=2", "train.eval_at_start=true"]
    offline = train(tmp_path / "offline", COMMON + start + [f"checkpoint.init_from={merged}"], nproc=1)
    online = train(tmp_path / "online", COMMON + start + [f"checkpoint.init_merge.root={root}", "checkpoint.init_merge.n=3",
                                                          "checkpoint.init_merge.v_iterations=4",
                                                          "checkpoint.init_merge.method=wma"], nproc=2)
    assert "PMA-init: wma of iterations [8, 12, 16]" in online.output
    a, b = offline.records("val")[0], online.records("val")[0]
    assert a["step"] == b["step"] == 0  # a new run: fresh optimizer and schedule
    assert abs(a["loss"] - b["loss"]) < 1e-5
    # and it is not the live model: the merge changed the weights
    assert abs(source.val_losses()[16] - a["loss"]) > 1e-4


def test_annealing_branch_follows_its_schedule_and_resumes_exactly(source, tmp_path):
    fork = source.run_dir / "checkpoints" / "iter_0000008"
    branch = COMMON + ["schedule=anneal", "schedule.decay_shape=linear", f"checkpoint.load={fork}", "train.iters=16",
                       "train.lr=3e-3"]
    whole = train(tmp_path / "whole", branch, nproc=1)
    assert "start iteration 8" in whole.output
    lrs = {r["step"]: r["lr"] for r in whole.records("train")}
    for step in range(9, 17):  # the LR of the next update after `step` iterations
        assert lrs[step] == pytest.approx(3e-3 * (1 - (step - 8) / 8), abs=1e-12), (step, lrs[step])
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").glob("iter_*")) == [
        "iter_0000012", "iter_0000016"]
    assert not (source.run_dir / "checkpoints" / "iter_0000020").exists()
    # the fork's first step equals the constant-LR run's step 9 (same weights, optimizer, data, LR)
    assert whole.losses()[9] == pytest.approx(source.losses()[9], abs=1e-6)
    # stopped and restarted, the branch continues where it was
    parts = tmp_path / "parts"
    train(parts, branch + ["train.exit_after_iters=4"], nproc=1)
    resumed = train(parts, branch, nproc=1)
    assert "start iteration 12" in resumed.output
    for step in range(9, 17):
        assert resumed.losses()[step] == pytest.approx(whole.losses()[step], abs=1e-6), step


def test_annealing_branch_needs_a_fork_beyond_its_end(source, tmp_path):
    fork = source.run_dir / "checkpoints" / "iter_0000008"
    run = train(tmp_path / "bad", COMMON + ["schedule=anneal", f"checkpoint.load={fork}", "train.iters=8"],
                nproc=None, check=False)
    assert run.returncode == 2
    assert "train.iters: 8 must be beyond the fork's iteration 8" in run.output
