"""Start real pma-train jobs (ranks over gloo, as torchrun starts them) from tests and read back what they wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pma_train.metrics import METRICS_FILE, read_metrics
from pma_train.slurm_env import free_port

REPO = Path(__file__).resolve().parents[1]


def test_env(cache_dir: Path | None = None) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled",
                "TORCH_CPP_LOG_LEVEL": "ERROR"})
    if cache_dir is not None:
        env["PMA_CACHE_DIR"] = str(cache_dir)
    return env


test_env.__test__ = False  # a helper, not a test, in every module that imports it


@dataclass
class Run:
    returncode: int
    output: str
    run_dir: Path

    def records(self, kind: str) -> list[dict]:
        """The run's records of one kind, newest per step (as pma-repro and the plots read them)."""
        return read_metrics(self.run_dir / METRICS_FILE, kind)

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records("train")}

    def val_losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records("val")}


def run_module(args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """python -m <args> on nproc ranks, as torchrun starts them (a plain process when nproc is None)."""
    if nproc:
        return run_ranks(args, nproc, env or test_env(), timeout)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env or test_env(), capture_output=True,
                          text=True, timeout=timeout)


def rank_env(env: dict, rank: int, nproc: int, port: int) -> dict:
    """The variables torchrun --nproc-per-node=nproc gives a rank (one node, no restarts)."""
    return {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
            "ROLE_NAME": "default", "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": "none", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}


def run_ranks(args: list[str], nproc: int, env: dict, timeout: int) -> subprocess.CompletedProcess:
    """What torchrun --nproc-per-node=nproc does for a test, without torchrun's agent process (it
    imports torch to watch its children: ~4 s of CPU per launch). Real ranks meet over env:// (rank 0
    hosts the store), each in its own session; when one fails, the others' process groups get SIGTERM
    (SIGKILL 30 s later), the job's status is 1 and stderr ends with each failed rank's
    `exitcode  : N`, as under torchrun. torchrun itself is tested where it is the subject
    (tests/test_launch.py, tests/test_preemption.py, benchmarks/fault_injection.py)."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        ranks = [subprocess.Popen([sys.executable, "-u", "-m", *args], cwd=REPO, env=rank_env(env, r, nproc, port),
                                  stdout=out, stderr=err, text=True, start_new_session=True) for r in range(nproc)]
        deadline, failed_at = time.monotonic() + timeout, None
        try:
            while any(p.poll() is None for p in ranks):
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(args, timeout)
                if failed_at is None and any(p.returncode not in (None, 0) for p in ranks):
                    failed_at = time.monotonic()
                    _signal_live(ranks, signal.SIGTERM)
                elif failed_at is not None and time.monotonic() > failed_at + 30:
                    _signal_live(ranks, signal.SIGKILL)
                time.sleep(0.02)
        finally:
            _signal_live(ranks, signal.SIGKILL)
            for p in ranks:
                p.wait()
        codes = [p.returncode for p in ranks]
        if any(codes):
            err.write(f"tests.launch: {' '.join(args[:1])} failed on {nproc} rank(s)\n" + "".join(
                f"  rank      : {r}\n  exitcode  : {c}\n" for r, c in enumerate(codes) if c))
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, 1 if any(codes) else 0, out.read(), err.read())


def _signal_live(ranks: list[subprocess.Popen], sig: int) -> None:
    """Signal each rank still running, with its children (torchrun starts each rank in its own session
    and signals its process group)."""
    for p in ranks:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def train(run_dir: Path, overrides: list[str], nproc: int = 1, cache_dir: Path | None = None,
          timeout: int = 600, check: bool = True) -> Run:
    base = [f"run.dir={run_dir}", "logging.progress_bar=false"]
    proc = run_module(["pma_train.cli.train", *base, *overrides], nproc=nproc, env=test_env(cache_dir),
                      timeout=timeout)
    run = Run(proc.returncode, proc.stdout + proc.stderr, run_dir)
    if check and proc.returncode != 0:
        raise AssertionError(f"pma-train failed ({proc.returncode}):\n{run.output[-6000:]}")
    return run


_HOLDER = """
import sys
from pathlib import Path
from pma_train.checkpoint.lock import Owner, acquire
acquire(Path(sys.argv[1]), Owner.this_process(), name=sys.argv[2])
print("held", flush=True)
sys.stdin.readline()
"""


def hold_lock(root: Path, name: str = ".pma-lock") -> subprocess.Popen:
    """Another process holding root's lock file `name` until a line is written to its stdin."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), name], cwd=REPO, env=test_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc
