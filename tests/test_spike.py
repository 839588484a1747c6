"""Loss-spike recovery: an injected spike is detected, the merge of the last good checkpoints is
restored, and the run returns to the spike-free trajectory; a run that keeps spiking stops."""

from __future__ import annotations

import pytest

from tests.launch import train

RUN = ["train.iters=60", "train.global_batch_size=8", "train.micro_batch_size=4", "train.seq_length=64",
       "train.log_interval=5", "train.eval_interval=60", "train.eval_iters=4", "checkpoint.interval=5",
       "schedule.warmup_iters=5", "seed=2"]
SPIKE = ["spike.inject_at=30", "spike.inject_iters=3", "spike.inject_lr_mult=1000"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return train(tmp_path_factory.mktemp("clean") / "run", RUN, nproc=1)


def test_spike_is_detected_and_recovered(clean, tmp_path):
    broken = train(tmp_path / "broken", RUN + SPIKE, nproc=1)
    # guard_iters=6: the checkpoint at 30 is not trusted and is set aside; the merge of 15, 20, 25 restored.
    recovered = train(tmp_path / "recovered", RUN + SPIKE + ["spike.enabled=true", "spike.guard_iters=6"], nproc=2)
    base, bad, good = (r.val_losses()[60] for r in (clean, broken, recovered))
    assert bad > 2 * base, (base, bad)  # without recovery the run is ruined (the test can fail)
    assert abs(good - base) < 0.05 * base, (base, good)  # with it, back on the spike-free trajectory
    events = recovered.records("recovery")
    assert events and all("sigma above the recent median" in e["cause"] for e in events)
    assert events[0]["restored_iteration"] == 25 and events[0]["merged_iterations"] == [15, 20, 25]
    assert events[0]["skipped_samples"] > 0
    assert events[0]["set_aside_iterations"] == [30]
    spiked = recovered.run_dir / "checkpoints" / f"spiked-at-{events[0]['step']}" / "iter_0000030"
    assert spiked.is_dir()  # kept, out of resume's way; the run itself saved a fresh iteration 30 later
    assert (recovered.run_dir / "checkpoints" / "iter_0000030").is_dir()


def test_a_run_that_keeps_spiking_stops_with_a_clear_message(tmp_path):
    run = train(tmp_path / "run", RUN + SPIKE + ["spike.enabled=true", "spike.max_recoveries=1"], nproc=None,
                check=False)
    assert run.returncode != 0
    assert "more than 1 recoveries within 1000 iterations, the run does not recover: stopping" in run.output
