"""benchmarks/train_throughput.py runs end to end and writes its table, JSON and plot (a few steps)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests import launch


def test_train_throughput_smoke(tmp_path):
    env = launch.test_env(tmp_path / "cache")
    args = [sys.executable, "benchmarks/train_throughput.py", "--warmup", "1", "--rounds", "2", "--steps", "1",
            "--global-batch", "4", "--micro-batch", "2", "--seq-len", "32", "--results-dir", str(tmp_path / "out")]
    proc = subprocess.run(args, cwd=launch.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    case = json.loads((tmp_path / "out" / "train_throughput.json").read_text())["cases"][0]
    assert case["same_initial_weights"] and case["max_loss_diff"] == 0.0
    assert case["pma"]["steps"] == case["bare"]["steps"] == 2 and case["ratio"] > 0
    assert set(case["pma"]["breakdown_ms"]) >= {"data", "fwd_bwd", "optimizer", "loss_reduce", "loop_logging"}
    assert "| tiny-tp1-pp1-dp1 |" in (tmp_path / "out" / "train_throughput.md").read_text()
    assert (tmp_path / "out" / "train_throughput.png").stat().st_size > 0
