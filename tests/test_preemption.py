"""Preemption: on SIGTERM a real 2-rank job finishes its step, saves, exits 75; a rerun resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from pma_train.checkpoint import layout
from pma_train.metrics import METRICS_FILE, read_metrics
from pma_train.train.preemption import PREEMPTED_EXIT_CODE, StopSignals
from tests.launch import REPO, free_port, test_env, train

STEPS = 60
# Constant LR, no evaluation, no interval checkpoints: each saved checkpoint comes from a signal.
COMMON = [f"train.iters={STEPS}", "train.log_interval=1", "train.eval_iters=0", "train.global_batch_size=4",
          "train.micro_batch_size=2", "train.seq_length=32", "checkpoint.interval=1000",
          "checkpoint.save_at_end=false", "schedule.warmup_iters=2", "seed=7"]


def _start(run_dir, cache) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "pma_train.cli.train", f"run.dir={run_dir}", "logging.progress_bar=false", *COMMON]
    return subprocess.Popen(cmd, cwd=REPO, env=test_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, run_dir, step: int, timeout: float = 240) -> None:
    """Until the job has logged `step` (its training loop, with the handlers, is running)."""
    deadline = time.monotonic() + timeout
    while max((r["step"] for r in read_metrics(run_dir / METRICS_FILE, "train")), default=0) < step:
        assert proc.poll() is None, f"the job ended before step {step}:\n{proc.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the job did not stop within {timeout} s of the signal:\n{proc.communicate()[0][-4000:]}")


def _rank(proc: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no rank {rank} among torchrun's children")


def _assert_preempted(run_dir, after: int) -> int:
    """The job recorded a stop after step `after`, with a complete checkpoint of that iteration as latest."""
    records = read_metrics(run_dir / METRICS_FILE, "preempted")
    assert records, "no preempted record"
    stopped = records[-1]["step"]
    assert after < stopped < STEPS, (after, stopped)
    assert records[-1]["exit_code"] == PREEMPTED_EXIT_CODE
    root = run_dir / "checkpoints"
    assert layout.read_tracker(root) == stopped
    assert records[-1]["checkpoint"] == str(root / layout.iter_dir_name(stopped))
    layout.check_loadable(root)  # every file the metadata names is there and whole
    # Every rank stopped at the same step: nothing was logged beyond it.
    assert max(r["step"] for r in read_metrics(run_dir / METRICS_FILE, "train")) == stopped
    return stopped


def test_sigterm_saves_stops_and_the_rerun_resumes_exactly(tmp_path, cache):
    """SIGTERM (twice) to rank 1 only: rank 0 stops at the same step, a checkpoint of that step is
    published, both ranks exit 75. (torchrun, when it is the one signalled, forwards SIGTERM to every
    rank, the same path with both ranks signalled, and then exits 1 itself whatever its ranks did.)"""
    reference = train(tmp_path / "reference", COMMON, nproc=2, cache_dir=cache)
    run_dir = tmp_path / "run"

    job = _start(run_dir, cache)
    _wait_for_step(job, run_dir, 2)
    rank1 = _rank(job, 1)
    rank1.send_signal(signal.SIGTERM)
    rank1.send_signal(signal.SIGTERM)  # a second one only adds to the record
    output = _finish(job)
    stopped = _assert_preempted(run_dir, 2)
    # torchrun reports its ranks' exit status in its failure summary (and exits 1 itself).
    assert job.returncode == 1 and f"exitcode  : {PREEMPTED_EXIT_CODE}" in output, output[-4000:]
    assert "[preempted]" in output and "signal on another rank" in output  # rank 0 did not receive it

    resumed = train(run_dir, COMMON, nproc=2, cache_dir=cache)
    assert f"start iteration {stopped}" in resumed.output
    # Bit for bit: the trajectory of the run nobody interrupted.
    assert resumed.losses() == reference.losses()
    assert sorted(resumed.losses()) == list(range(1, STEPS + 1))


def test_handlers_record_repeated_signals_and_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignals(["SIGUSR1", "SIGUSR1"]).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second one (e.g. while saving) is only recorded
        time.sleep(0.01)
        assert stop.received == ["SIGUSR1", "SIGUSR1"] and stop.requested and stop.first() == "SIGUSR1"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
