"""torch.distributed's environment for ranks that Slurm starts without torchrun (srun, submitit), and
the free local port of a single-host rendezvous.

No torch import here: the hydra entry points call it before validating a config.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import MutableMapping


def torch_env_from_slurm(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """torch.distributed's variables for a task of an srun step started without torchrun.

    submitit (and `srun pma-train ...`) start one task per GPU with only Slurm's variables set. When
    RANK is absent and this process is a task of a step (SLURM_STEP_ID is set: not the batch script
    itself, whose SLURM_NTASKS describes the whole allocation), set RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR (the step's first node) and MASTER_PORT (20000 + job id mod 20000), each only where
    not already set. Returns what it set.
    """
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job = env.get("SLURM_JOB_ID", "")
    values = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1",
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": first_slurm_host(nodes) if nodes else "127.0.0.1",
        "MASTER_PORT": str(20000 + int(job) % 20000) if job.isdigit() else "29500",
    }
    added = {key: value for key, value in values.items() if key not in env}
    env.update(added)
    return added


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list, as `scontrol show hostnames` lists it: gpu[003-004,7],cpu1 -> gpu003."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end])


def free_port() -> int:
    """A TCP port free on this host now, for MASTER_PORT of a rendezvous on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
