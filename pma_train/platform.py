"""Which device and collective backend this process should use: detection only, nothing is changed.

Acting on the answer (selecting the GPU, or installing the CPU compatibility layer of
`cpu_compat.py`) is the process-group start's job: `parallel.use_platform`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pma_train.slurm_env import torch_env_from_slurm


@dataclass(frozen=True)
class Platform:
    device: torch.device
    backend: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


class PlatformError(RuntimeError):
    """The host does not match what the job asks for; the message names the cause."""


def nvidia_devices(dev_dir: str | Path = "/dev") -> list[str]:
    """The NVIDIA GPU device nodes of this host (nvidia0, nvidia1, ...), whether torch can use them or not."""
    return sorted(p.name for p in Path(dev_dir).glob("nvidia[0-9]*"))


def check_devices(backend: str | None, dev_dir: str | Path = "/dev") -> None:
    """A host with NVIDIA GPUs that torch cannot use would otherwise train on CPU / gloo without a word."""
    if backend == "gloo" or torch.cuda.is_available():
        return
    gpus = nvidia_devices(dev_dir)
    if gpus:
        raise PlatformError(
            f"this host has NVIDIA GPUs ({', '.join(gpus)}) but torch cannot use them "
            f"(torch.cuda.is_available() is False; torch {torch.__version__} is built for CUDA {torch.version.cuda}: "
            "a driver older than that build, or CUDA_VISIBLE_DEVICES hiding them?). Fix that, or pass "
            "parallel.backend=gloo to train on the CPU on purpose")


def local_rank() -> int:
    """This process's rank on its node: torchrun's LOCAL_RANK, or Slurm's for tasks started without it."""
    env = dict(os.environ)
    torch_env_from_slurm(env)  # on a copy: reading, not setting
    return int(env.get("LOCAL_RANK", "0"))


def detect(backend: str | None = None) -> Platform:
    """nccl + this rank's GPU on CUDA hosts; gloo + CPU elsewhere."""
    check_devices(backend)
    if torch.cuda.is_available():
        return Platform(torch.device("cuda", local_rank()), backend or "nccl")
    return Platform(torch.device("cpu"), backend or "gloo")
