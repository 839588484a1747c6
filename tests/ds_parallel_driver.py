"""Real model-parallel DeepSpeed runs for tests/test_deepspeed_parallel.py (CPU, gloo, 2 ranks, torchrun):

  <dir> <json>  every CASE: 3 steps on 2 ranks, a checkpoint after each, in one of three layouts:
                - "tp": tensor parallel through an mpu (TP=2, DP=1): each rank its own shard, its
                  files `*mp_rank_0<rank>*`;
                - "pp": a PipelineModule of 2 stages (PP=2, DP=1): `layer_<LL>-model_states.pt` per
                  layer, stages as mp ranks;
                - "dp": data parallel (DP=2), under DeepSpeed's BF16_Optimizer (`bf16opt`: bf16 + ZeRO-1
                  + fp32 gradient accumulation, what Megatron-DeepSpeed bf16 runs use): its partitions
                  keep their padding, its state records no `zero_stage`;
                then pma-merge's engine merges the 3 checkpoints on these 2 ranks, a DeepSpeed engine
                of the same layout loads the merge, and every rank writes what it found to <json>.<rank>;
                rank 0 saves the masters DeepSpeed held after each step of a "dp" case
                (<dir>/<case>_masters.pt: what DeepSpeed's zero_to_fp32, which does not read
                BF16_Optimizer files, would reconstruct).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# (name, layout, ZeRO stage, dtype); "dp" first: DeepSpeed keeps the mpu of an earlier engine (its groups)
CASES = [("dp_z1_bf16opt", "dp", 1, "bf16opt"), ("tp_z1_fp32", "tp", 1, "fp32"), ("tp_z3_bf16", "tp", 3, "bf16"),
         ("pp_z1_fp32", "pp", 1, "fp32"), ("pp_z1_bf16", "pp", 1, "bf16")]
WEIGHTS = [0.2, 0.3, 0.5]
STEPS = 3


class TensorParallel:
    """The mpu DeepSpeed asks a Megatron-style run for: every rank one tensor-parallel shard, DP=1."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.model_group = dist.new_group(list(range(self.world)))
        self.data_groups = [dist.new_group([r]) for r in range(self.world)]

    def get_model_parallel_rank(self):
        return self.rank

    def get_model_parallel_world_size(self):
        return self.world

    def get_model_parallel_group(self):
        return self.model_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_world_size(self):
        return 1

    def get_data_parallel_group(self):
        return self.data_groups[self.rank]


def dtype_of(name: str) -> torch.dtype:
    return torch.bfloat16 if name.startswith("bf16") else torch.float32


def config(stage: int, dtype: str, layout: str) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
           "zero_optimization": {"stage": stage}}
    if layout == "pp":
        cfg["train_batch_size"] = 4  # two micro-batches through the pipeline
    if dtype.startswith("bf16"):
        cfg["bf16"] = {"enabled": True}
    if dtype == "bf16opt":  # bf16, ZeRO-1, fp32 gradient accumulation: DeepSpeed takes its BF16_Optimizer
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def engine_for(deepspeed, layout: str, stage: int, dtype: str):
    rank = dist.get_rank()
    torch.manual_seed(rank if layout == "tp" else 0)  # tensor-parallel shards differ
    if layout in ("tp", "dp"):  # 135 parameters: the flat buffer padded to 136 at DP=2
        model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
        mpu = TensorParallel() if layout == "tp" else None
        engine, *_ = deepspeed.initialize(model=model, config=config(stage, dtype, layout), mpu=mpu)
        return engine
    from deepspeed.pipe import LayerSpec, PipelineModule

    specs = [LayerSpec(torch.nn.Linear, 6, 24), LayerSpec(torch.nn.ReLU), LayerSpec(torch.nn.Linear, 24, 24),
             LayerSpec(torch.nn.Linear, 24, 3)]
    module = PipelineModule(layers=specs, num_stages=2, loss_fn=torch.nn.MSELoss(), partition_method="uniform")
    engine, *_ = deepspeed.initialize(model=module, config=config(stage, dtype, layout),
                                      model_parameters=[p for p in module.parameters() if p.requires_grad])
    return engine


def batches(step: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(step)
    while True:
        yield torch.randn(2, 6, generator=g).to(dtype), torch.randn(2, 3, generator=g).to(dtype)


def train_step(engine, layout: str, step: int, dtype: torch.dtype) -> None:
    data = batches(step, dtype)
    if layout == "pp":
        engine.train_batch(data)
        return
    x, y = next(data)
    engine.backward(torch.nn.functional.mse_loss(engine(x), y))
    engine.step()


def masters(engine) -> dict[str, torch.Tensor]:
    """This rank's fp32 master weights, as DeepSpeed itself hands them out."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().clone() for name, p in engine.module.named_parameters()}


def module_weights(engine, stage: int) -> dict[str, torch.Tensor]:
    if stage == 3:  # partitioned: DeepSpeed's own gather of this rank's (DP=1) parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def first_losses(engine, expected: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, float]:
    """The resumed engine's loss on a new batch, the merged model's (plain torch, the weights cast),
    then a step of the resumed optimizer."""
    x, y = next(batches(99, dtype))
    loss = torch.nn.functional.mse_loss(engine(x), y)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3)).to(dtype)
    plain.load_state_dict({k: v.to(dtype) for k, v in expected.items()})
    with torch.no_grad():
        reference = torch.nn.functional.mse_loss(plain(x), y)
    engine.backward(loss)
    engine.step()
    return {"resumed_loss": loss.item(), "merged_model_loss": reference.item(), "stepped": engine.global_steps}


def run(out: Path, results: Path) -> None:
    import deepspeed

    from pma_train.merge.ds.engine import run_ds_merge
    from pma_train.merge.engine import MergeRequest
    from pma_train.merge.select import select_spaced

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no op build on first use
    deepspeed.init_distributed(dist_backend="gloo")
    rank, found = dist.get_rank(), {}
    for name, layout, stage, dtype in CASES:
        engine = engine_for(deepspeed, layout, stage, dtype)
        seen = []
        for step in range(STEPS):
            train_step(engine, layout, step, dtype_of(dtype))
            engine.save_checkpoint(str(out / name))
            seen.append(masters(engine))
        merged = out / f"{name}_merged"
        run_ds_merge(MergeRequest(inputs=select_spaced(out / name, n=STEPS, v_iterations=1), weights=WEIGHTS,
                                  output_root=merged, carry_optimizer=True, accumulate="fp64", progress=False,
                                  budget_bytes=64 * 2**20))
        expected = {k: sum(w * s[k].double() for w, s in zip(WEIGHTS, seen)).float() for k in seen[0]}
        resumed = engine_for(deepspeed, layout, stage, dtype)
        resumed.load_checkpoint(str(merged))
        got, module = masters(resumed), module_weights(resumed, stage)
        report = {"optimizer": type(resumed.optimizer).__name__,
            "masters_equal": all(torch.equal(got[k], expected[k]) for k in expected),
            "module_equal": all(torch.equal(module[k], expected[k].to(module[k].dtype)) for k in expected),
            "differs_from_newest": any(not torch.equal(expected[k], seen[-1][k]) for k in expected),
            "params": sorted(expected), "global_steps": resumed.global_steps,
            "files": sorted(p.name for p in (merged / f"global_step{STEPS}").iterdir()),
        }
        if layout == "pp":  # the output's layer files: this stage's merged masters in the training dtype
            module, paths = resumed.module, {}
            for local, layer in enumerate(range(module._local_start, module._local_stop)):
                paths[layer] = Path(module.ckpt_layer_path(str(merged / f"global_step{STEPS}"), local))
            report["layer_files_equal"] = all(
                torch.equal(value, expected[f"{layer}.{key}"].to(dtype_of(dtype)))
                for layer, path in paths.items() for key, value in torch.load(path, weights_only=True).items())
            report["layer_files"] = sorted(p.name for p in paths.values())
        if layout == "dp":
            report.update(first_losses(resumed, expected, dtype_of(dtype)))
            if rank == 0:
                torch.save(seen, out / f"{name}_masters.pt")
        found[name] = report
        dist.barrier()
    Path(f"{results}.{rank}").write_text(json.dumps(found))
    dist.barrier()


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]))
