"""benchmarks/gpu_acceptance.sh --dry runs every check that has a CPU meaning end to end (tiny sizes),
so the GPU acceptance script cannot rot between GPU sessions, and says what it skipped."""

from __future__ import annotations

import subprocess
import sys

from tests import launch

CPU_CHECKS = ["environment", "tiny on cpu/gloo", "perf settings resolved (CPU: all off)", "stop at 4 + resume = uninterrupted", "pma-merge of cpu/gloo checkpoints",
              "PMA-init from the merge", "annealing branch from 6 to 8", "spike recovery"]
GPU_CHECKS = ["tiny_moe on cuda/nccl", "initial weights: GPU build = CPU build", "GPU checkpoint resumes on CPU",
              "CPU checkpoint resumes on GPU", "TP=2 / DP=2 on two GPUs", "dense_411m-shaped performance table"]


def test_dry_mode_runs_every_cpu_check_and_lists_the_gpu_ones(tmp_path):
    env = launch.test_env(tmp_path / "cache")
    env["PYTHON"] = sys.executable
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_acceptance.sh", "--dry", str(out)], cwd=launch.REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    table = (out / "gpu_acceptance.md").read_text()
    assert proc.returncode == 0, table + proc.stderr[-3000:]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in table.splitlines()
            if line.startswith("| ") and " | " in line and not line.startswith("| check")}
    for check in CPU_CHECKS:
        assert rows.get(check) == "PASS", (check, table)
    skipped = table.split("Skipped:")[1]
    for check in GPU_CHECKS:
        assert rows.get(check) == "SKIP", (check, table)
        assert f"- {check}: " in skipped, (check, table)
    assert "DRY run on the CPU (GPU parts skipped)" in table
    assert "1 recovery event(s)" in table or "2 recovery event(s)" in table, table
    assert "max train-loss difference 0.0" in table
    # The initial-weights comparison ran (on the CPU build against itself) and found every tensor.
    assert "tensors equal (float32->float32)" in table
    assert "Performance settings not toggled in this table:" in table
    assert (out / "logs" / "spike.log").stat().st_size > 0 and (out / "gpu_acceptance.log").stat().st_size > 0
