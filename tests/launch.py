"""Start real pma-train jobs (torchrun over gloo) from tests and read back what they wrote."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pma_train.metrics import METRICS_FILE, read_metrics

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    """python -m <args> under torchrun with nproc ranks (a plain process when nproc is None)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}"] if nproc else [sys.executable]
    proc = subprocess.run(cmd + ["-m"] + args, cwd=REPO, env=env or test_env(), capture_output=True,
                          text=True, timeout=timeout)
    return proc


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
