"""What one reproduction experiment is made of; every size is an override (CPU default, paper scale by config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pma_train.config import ConfigError
from pma_train.decay import CURVE_SHAPES

# All pma-train runs of the experiment share these (CPU default: 8 x 64 = 512 tokens per iteration).
_CPU_RUN = ["train.global_batch_size=8", "train.micro_batch_size=4", "train.seq_length=64",
            "schedule.warmup_iters=20", "train.eval_iters=8", "train.log_interval=100", "seed=1"]

STAGES = ("main", "low_lr", "anneal", "merges", "pma_init", "spike", "report")


@dataclass
class ReproConfig:
    # Work directory: runs, checkpoints, results.json, report.md and the PNG plots.
    out: str = "repro"
    model: str = "tiny"
    # pma-train overrides shared by every run and by the evaluator (batch, sequence, data, parallel ...).
    overrides: list[str] = field(default_factory=lambda: list(_CPU_RUN))
    # How a job starts (a bash command line; the job's arguments follow): {python}, {nproc}, {port} and
    # {module} are filled in. In a Slurm allocation e.g. "srun --ntasks-per-node=1 torchrun
    # --nnodes=$SLURM_NNODES --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 -m {module}".
    launcher: str = "{python} -m torch.distributed.run --nproc-per-node={nproc} --master-port={port} -m {module}"
    nproc: int = 1
    # Main run: constant LR `lr` for `iters` iterations, a checkpoint every `grid_iters`.
    iters: int = 3000
    lr: float = 3e-3
    grid_iters: int = 10
    eval_interval: int = 100
    # Second constant-LR run at a lower LR (null: skip); merged at the late point only.
    low_lr: Optional[float] = 1e-3
    # Comparison points (iterations of the main run), early first; each gets an annealing branch that
    # forks `anneal_iters` before the point and decays the LR to 0 (`anneal_shape`) by the point.
    points: list[int] = field(default_factory=lambda: [600, 2800])
    anneal_iters: int = 100
    anneal_shape: str = "1-sqrt"
    # Merge grid at every point: methods x N x V (V in tokens; a multiple of grid_iters' tokens).
    methods: list[str] = field(default_factory=lambda: ["sma", "ema:0.1", "ema:0.2", "wma", "decay:cosine",
                                                        "decay:1-sqrt"])
    ns: list[int] = field(default_factory=lambda: [3, 5, 10])
    v_tokens: list[int] = field(default_factory=lambda: [5120, 10240, 20480])
    # The merge shown over tokens (tracked in the main run), used for PMA-init and the low-LR comparison.
    headline_n: int = 5
    headline_v_tokens: int = 10240
    headline_method: str = "sma"
    # PMA-init: continued training from the merged vs the live weights at the late point.
    pma_init_iters: int = 100
    pma_init_eval_interval: int = 10
    # Spike example: a branch of the main run gets an LR x spike_lr_mult burst at iteration spike_at;
    # with and without recovery (merge of the checkpoints before it), and a spike-free twin.
    spike_at: Optional[int] = 1500
    spike_before: int = 50
    spike_after: int = 100
    spike_lr_mult: float = 1000.0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    # Re-running skips runs that finished (each leaves a .done marker).
    resume: bool = True


def parse_method(spec: str) -> dict:
    """'sma' | 'wma' | 'ema:<alpha>' | 'decay:<shape>' -> merge fields."""
    name, _, arg = spec.partition(":")
    if name in ("sma", "wma") and not arg:
        return {"method": name}
    if name == "ema" and arg:
        return {"method": "ema", "alpha": float(arg)}
    if name == "decay" and arg in CURVE_SHAPES:
        return {"method": "decay", "decay_shape": arg}
    raise ConfigError(f"methods: '{spec}' is not sma, wma, ema:<alpha> or decay:<{'|'.join(CURVE_SHAPES)}>")


def validate_repro(cfg: ReproConfig) -> None:
    def fail(name, why):
        raise ConfigError(f"{name}: {why}")

    for stage in cfg.stages:
        if stage not in STAGES:
            fail("stages", f"'{stage}' is not one of {', '.join(STAGES)}")
    for spec in cfg.methods + [cfg.headline_method]:
        parse_method(spec)
    if not cfg.points or sorted(cfg.points) != list(cfg.points) or cfg.points[-1] > cfg.iters:
        fail("points", f"{cfg.points} must be increasing iterations within iters={cfg.iters}")
    for p in cfg.points:
        if p % cfg.grid_iters:
            fail("points", f"{p} must be a multiple of grid_iters={cfg.grid_iters} (merges end on a checkpoint)")
        if "anneal" in cfg.stages and (p - cfg.anneal_iters <= 0 or (p - cfg.anneal_iters) % cfg.grid_iters):
            fail("anneal_iters", f"the branch for point {p} forks at {p - cfg.anneal_iters}: "
                                 f"a positive multiple of grid_iters={cfg.grid_iters}")
    if cfg.iters % cfg.eval_interval:
        fail("eval_interval", f"must divide iters={cfg.iters}")
    if cfg.headline_n < 1 or min(cfg.ns) < 1:
        fail("ns", "merge sizes must be >= 1")
    if cfg.spike_at is not None and "spike" in cfg.stages:
        fork = cfg.spike_at - cfg.spike_before
        if fork <= 0 or fork % cfg.grid_iters or cfg.spike_at + cfg.spike_after > cfg.iters:
            fail("spike_at", f"the spike branch forks at spike_at - spike_before = {fork}: a positive multiple of "
                             f"grid_iters={cfg.grid_iters}, and must end within iters={cfg.iters}")
    if "{module}" not in cfg.launcher:
        fail("launcher", "must contain {module} (the python module each job runs)")
