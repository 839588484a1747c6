"""Real DeepSpeed runs for tests/test_deepspeed_merge.py (CPU, gloo, under torchrun), in one launch:

  <dir> <json>  every CASE: a tiny MLP trained 3 steps with DeepSpeed, a checkpoint after each; its 3
                checkpoints merged by pma-merge's engine on this world; a DeepSpeed engine loads the merge: its first loss, the loss of
                       the merged model (DeepSpeed's own fp32 reconstruction, cast, plain torch), then a step
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
         ("z3_bf16", 3, "bf16", True, "fp32")]
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
    return cfg


def batch(rank: int, step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 6, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)


def dtype_of(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "bf16" else torch.float32


def start():
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no op build on first use
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def train(out: Path) -> None:
    deepspeed = start()
    rank = torch.distributed.get_rank()
    for name, stage, dtype, *_ in CASES:
        engine, *_ = deepspeed.initialize(model=model(), config=config(stage, dtype))
        for step in range(STEPS):
            x, y = batch(rank, step, dtype_of(dtype))
            engine.backward(torch.nn.functional.mse_loss(engine(x), y))
            engine.step()
            engine.save_checkpoint(str(out / name))


def merge(out: Path) -> None:
    from pma_train.merge.ds.engine import run_ds_merge
    from pma_train.merge.engine import MergeRequest
    from pma_train.merge.select import select_spaced
    from pma_train.parallel import init_process_group

    init_process_group("gloo")  # returns at once under DeepSpeed's
    world = torch.distributed.get_world_size()
    for name, _, _, carry, accumulate in CASES:
        inputs = select_spaced(out / name, n=STEPS, v_iterations=1)
        run_ds_merge(MergeRequest(inputs=inputs, weights=WEIGHTS, output_root=out / f"{name}_merged{world}",
                                  carry_optimizer=carry, accumulate=accumulate,
                                  progress=False, budget_bytes=64 * 2**20))
    torch.distributed.barrier()


def resume(out: Path, results: Path) -> None:
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    rank, found = torch.distributed.get_rank(), {}
    for name, stage, dtype, *_ in CASES:
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


if __name__ == "__main__":
    where = Path(sys.argv[1])
    train(where)
    merge(where)  # on DeepSpeed's process group
    resume(where, Path(sys.argv[2]))
