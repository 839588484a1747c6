"""What every part of the merge benchmark shares: constants, subprocess launching, RSS sampling, reading inputs."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "merge_throughput.py"  # every worker subprocess runs it: `SCRIPT _<worker> ...`
RESULTS_DIR = REPO / "benchmarks" / "results"
BASENAME = "merge_throughput"
TARGET_GBPS = 3.0
GB = 1e9
MiB = 2**20
GiB = 2**30

# ~56M parameters in fp32: 224 MB per checkpoint, 10 checkpoints = 2.24 GB (>= 2 GiB).
FULL_MODEL = dict(num_layers=4, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12, num_query_groups=4,
                  vocab_size=20000, make_vocab_size_divisible_by=128)
QUICK_MODEL = dict(num_layers=2, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4, num_query_groups=2,
                   vocab_size=4000, make_vocab_size_divisible_by=128)
ITER_STEP = 100  # checkpoints at iterations 100, 200, ...
GLOBAL_BATCH, SEQ_LEN = 64, 1024  # recorded in the sidecars: tokens = iteration * 64 * 1024
V_TOKENS = ITER_STEP * GLOBAL_BATCH * SEQ_LEN


def child_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", "TORCH_CPP_LOG_LEVEL": "ERROR",
                "WANDB_MODE": "disabled"})
    return env


def torchrun(nproc: int) -> list[str]:
    from pma_train.slurm_env import free_port  # as the other pma_train imports here: not at module load

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]


def run(cmd: list[str], env: dict | None = None, timeout: int = 900) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc, wall


def median(values):
    return statistics.median(values) if values else None


def parse(proc: subprocess.CompletedProcess, tag: str):
    for line in proc.stdout.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    raise RuntimeError(f"no {tag} line in the output:\n{(proc.stdout + proc.stderr)[-3000:]}")


class RssSampler:
    """Peak RSS of this process, sampled in a thread (like the engine's own sampler)."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def checkpoint_files(root: Path, n: int) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.name.startswith("iter_"))[-n:]
    return [f for d in dirs for f in sorted(d.glob("*.distcp"))]


def read_all(files: list[Path], block: int = 16 * MiB) -> tuple[int, float]:
    """Every file with large sequential preadv calls into one reused buffer: (bytes, seconds)."""
    buffer = bytearray(block)
    view = memoryview(buffer)
    total, start = 0, time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while True:
                got = os.preadv(fd, [view], offset)
                if got == 0:
                    break
                offset += got
            total += offset
        finally:
            os.close(fd)
    return total, time.perf_counter() - start
