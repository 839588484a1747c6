"""Real DeepSpeed runs for tests/test_deepspeed_merge.py (CPU, gloo, under torchrun), one launch per world size:

  <dir> <json>  on 2 ranks: every CASE: a tiny MLP trained 3 steps with DeepSpeed, a checkpoint after each;
                its 3 checkpoints merged by pma-merge's engine on this world; a DeepSpeed engine loads the
                merge: its first loss, the loss of the merged model (DeepSpeed's own fp32 reconstruction,
                cast, plain torch), then a step. Then two checkpoints of two cases converted to universal
                checkpoints (DeepSpeed's ds_to_universal), and the MIXES of this world merged.
                On 1 or 3 ranks: the LAYOUT_CASES trained at that DP size (runs `dp<world>_<case>`), the
                MIXES of that world merged and resumed from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

# (name, ZeRO stage, dtype, carry_optimizer, accumulate_dtype)
CASES = [("z1_fp32", 1, "fp32", True, "fp64"), ("z1_bf16", 1, "bf16", False, "fp64"),
         ("z2_bf16", 2, "bf16", True, "fp64"), ("z3_fp32", 3, "fp32", False, "fp64"),
         ("z3_bf16", 3, "bf16", True, "fp32"), ("z2_fp16", 2, "fp16", True, "fp64"),
         ("z3_fp16", 3, "fp16", False, "fp64")]
LAYOUT_CASES = [("z1_fp32", 1), ("z3_fp32", 3)]  # trained again on 1 and 3 ranks: other DP sizes
# Inputs of different layouts, merged on `world` ranks into the newest's: (run, step) oldest first;
# `u_<case>` are universal checkpoints of the 2-rank runs.
MIXES = {
    "mix_stages": (2, [("z3_fp32", 1), ("z1_bf16", 2), ("z1_fp32", 3)]),  # ZeRO-3 and 1 into ZeRO-1, DP=2
    "universal_z1": (2, [("u_z1_fp32", 1), ("u_z1_fp32", 2), ("z1_fp32", 3)]),  # = z1_fp32's merge
    "universal_z3": (2, [("u_z3_fp32", 1), ("u_z1_fp32", 2), ("z3_fp32", 3)]),
    "mix_dp3": (3, [("z3_fp32", 1), ("z1_fp32", 2), ("dp3_z1_fp32", 3)]),  # DP=2 into DP=3 (padded)
    "mix_dp3_z3": (3, [("dp3_z1_fp32", 1), ("z2_bf16", 2), ("dp3_z3_fp32", 3)]),
    "mix_dp1_z3": (1, [("dp3_z3_fp32", 1), ("z1_fp32", 2), ("dp1_z3_fp32", 3)]),
    "mix_dp1_z1": (1, [("dp1_z3_fp32", 1), ("dp3_z1_fp32", 2), ("dp1_z1_fp32", 3)]),
}
UNIVERSAL = [("z1_fp32", 1), ("z1_fp32", 2), ("z3_fp32", 1)]
WEIGHTS = [0.2, 0.3, 0.5]
STEPS = 3


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.ReLU(),
                               torch.nn.Linear(24, 3))


def config(stage: int, dtype: str) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
           "zero_optimization": {"stage": stage}}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2}
    return cfg


def batch(rank: int, step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 6, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)


def dtype_of(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)


def start():
    import deepspeed

    from deepspeed.accelerator import get_accelerator

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no op build on first use
    # DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fp16 kernels; torch computes it
    # either way (slowly), and the checkpoint files are what an fp16 run saves anywhere
    get_accelerator().is_fp16_supported = lambda: True
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def train(out: Path, cases: list[tuple[str, int, str]]) -> None:
    import deepspeed

    rank = torch.distributed.get_rank()
    for name, stage, dtype in cases:
        engine, *_ = deepspeed.initialize(model=model(), config=config(stage, dtype))
        for step in range(STEPS):
            x, y = batch(rank, step, dtype_of(dtype))
            engine.backward(torch.nn.functional.mse_loss(engine(x), y))
            engine.step()
            engine.save_checkpoint(str(out / name))


def to_universal(out: Path) -> None:
    """DeepSpeed's own converter, on rank 0, in this process (its worker pools need no launch)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    if torch.distributed.get_rank() == 0:
        for case, step in UNIVERSAL:
            ds_to_universal.main(argparse.Namespace(
                input_folder=str(out / case / f"global_step{step}"), output_folder=str(out / f"u_{case}" / f"global_step{step}"),
                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=True))  # its client state: none
    torch.distributed.barrier()


BUDGET = 64 * 2**20


def merge(out: Path, jobs: dict[str, tuple[list[Path], bool, str]]) -> None:
    """Each job: its inputs (oldest first), carry_optimizer, accumulate_dtype; out/<job>_merged<world>."""
    from pma_train.merge.ds.engine import run_ds_merge
    from pma_train.merge.engine import MergeRequest
    from pma_train.merge.select import describe
    from pma_train.parallel import init_process_group

    init_process_group("gloo")  # returns at once under DeepSpeed's
    world = torch.distributed.get_world_size()
    for name, (paths, carry, accumulate) in jobs.items():
        run_ds_merge(MergeRequest(inputs=[describe(p) for p in paths], weights=WEIGHTS,
                                  output_root=out / f"{name}_merged{world}", carry_optimizer=carry,
                                  accumulate=accumulate, progress=False, budget_bytes=BUDGET))
    torch.distributed.barrier()


def mix_inputs(out: Path, name: str) -> list[Path]:
    return [out / run / f"global_step{step}" for run, step in MIXES[name][1]]


def case_of(run: str) -> tuple[int, str]:
    """(stage, dtype) of a run directory's name."""
    base = run.split("_", 1)[1] if run.startswith(("dp", "u_")) else run
    return next((stage, dtype) for name, stage, dtype, *_ in CASES if name == base)


def resume(out: Path, results: Path, jobs: dict[str, tuple[int, str]]) -> None:
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    rank, found = torch.distributed.get_rank(), {}
    for name, (stage, dtype) in jobs.items():
        merged = out / f"{name}_merged{torch.distributed.get_world_size()}"
        engine, *_ = deepspeed.initialize(model=model(), config=config(stage, dtype))
        engine.load_checkpoint(str(merged))
        x, y = batch(rank, 99, dtype_of(dtype))
        loss = torch.nn.functional.mse_loss(engine(x), y)
        plain = model().to(dtype_of(dtype))
        plain.load_state_dict({k: v.to(dtype_of(dtype)) for k, v in
                               get_fp32_state_dict_from_zero_checkpoint(str(merged)).items()})
        with torch.no_grad():
            reference = torch.nn.functional.mse_loss(plain(x), y)
        engine.backward(loss)
        engine.step()  # the resumed optimizer (carried or reset moments) takes a step
        found[name] = {"resumed": loss.item(), "merged_model": reference.item(),
                       "global_steps": engine.global_steps}
    if rank == 0:
        results.write_text(json.dumps(found))
    torch.distributed.barrier()


def main(out: Path, results: Path) -> None:
    start()
    world = torch.distributed.get_world_size()
    mixes = {name: (mix_inputs(out, name), False, "fp64") for name, (w, _) in MIXES.items() if w == world}
    if world == 2:
        train(out, [case[:3] for case in CASES])
        to_universal(out)
        jobs = {name: ([out / name / f"global_step{s}" for s in range(1, STEPS + 1)], carry, accumulate)
                for name, _, _, carry, accumulate in CASES}
        merge(out, {**jobs, **mixes})  # on DeepSpeed's process group
        resume(out, results, {name: (stage, dtype) for name, stage, dtype, *_ in CASES})
    else:
        train(out, [(f"dp{world}_{name}", stage, "fp32") for name, stage in LAYOUT_CASES])
        merge(out, mixes)
        resume(out, results, {name: case_of(MIXES[name][1][-1][0]) for name in mixes})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
