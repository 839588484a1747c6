"""No process outlives a killed job: whatever pma-train spawns while it trains and saves dies with it
(schedulers often kill only the main process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from pma_train.checkpoint import layout
from tests.launch import REPO, test_env


def test_nothing_spawned_by_training_outlives_a_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pma_train.cli.train", f"run.dir={run_dir}", "logging.progress_bar=false",
            "train.iters=400", "checkpoint.interval=1", "train.eval_interval=1000", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.seq_length=32"]
    proc = subprocess.Popen(args, cwd=REPO, env=test_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while (layout.read_tracker(run_dir / "checkpoints") or 0) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be killed"
        children = psutil.Process(proc.pid).children(recursive=True)  # after two saves: writers started
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as a scheduler might
        proc.wait()
        time.sleep(2)
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [" ".join(c.cmdline())[:120] for c in alive]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
