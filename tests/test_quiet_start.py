"""A quiet start: pma-train's first line of output is its own, the known third-party warnings (Transformer
Engine / Apex absent, deprecations, no CUDA runtime) appear only with logging.verbose=true.

Cost: two 1-iteration tiny trainings (plain processes, no evaluation), run side by side.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.launch import REPO, test_env

TINY = ["train.iters=1", "train.eval_iters=0", "logging.progress_bar=false", "logging.jsonl=false"]


def first_run_output(run_dir, extra: list[str]) -> str:
    """stdout and stderr of `pma-train` together, in order, with Python's default warning filters
    (the test environment's PYTHONWARNINGS=ignore would hide what this test looks for)."""
    env = {k: v for k, v in test_env().items() if k not in ("PYTHONWARNINGS", "TORCH_CPP_LOG_LEVEL")}
    proc = subprocess.run([sys.executable, "-m", "pma_train.cli.train", f"run.dir={run_dir}", *TINY, *extra],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def test_first_line_is_ours_and_verbose_shows_the_rest(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        quiet, verbose = pool.map(lambda a: first_run_output(*a),
                                  [(tmp_path / "quiet", []), (tmp_path / "verbose", ["logging.verbose=true"])])
    lines = [line for line in quiet.splitlines() if line.strip()]
    assert lines[0].startswith("pma-train: model tiny"), quiet[-3000:]
    for noise in ("Warning", "Transformer Engine and Apex", "No CUDA runtime", "is deprecated"):
        assert noise not in quiet, (noise, quiet[-3000:])
    ours = verbose.index("pma-train: model tiny")
    assert "UserWarning" in verbose[:ours], verbose[-3000:]  # megatron-core's, before our first line
