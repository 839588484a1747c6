"""pma-train's model trained under DeepSpeed, for tests/test_deepspeed_to_torch_dist.py (CPU, gloo, torchrun):

  <dir> <tokens.json>
    train:     pma-train's tiny HybridModel (the trainer's build) wrapped in a DeepSpeed ZeRO-3 bf16 engine,
               STEPS steps on random tokens, a checkpoint after each (<dir>/ds/global_step<N>);
    convert:   pma-merge's engine merges them (WEIGHTS, fp64) into <dir>/merged as torch_dist, on this world;
    reference: DeepSpeed's own fp32 reconstruction of each input, weighted in fp64 and loaded into a plain
               fp32 model, saved by pma-train's save_checkpoint (<dir>/reference) and its logits of the
               tokens written (<dir>/reference_logits.pt); the newest input's alone, saved the same way
               (<dir>/newest: what init_from / pma-export of the DeepSpeed root must read);
    check:     the merge loaded the way checkpoint.init_from loads it equals that model, tensor for tensor;
               loaded under TP=2, it equals the reference's checkpoint loaded under TP=2;
    moe:       the same for tiny_moe (experts stacked under one key) under ZeRO-1 fp32, one input; its
               parameter names map onto exactly the keys of its sharded state dict;
    foreign:   a DeepSpeed checkpoint of a model that is not pma-train's (<dir>/foreign).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

WEIGHTS = [0.2, 0.3, 0.5]
STEPS = 3


def _config():
    from pma_train.config import JobConfig

    cfg = JobConfig()
    cfg.train.seq_length = 16
    return cfg


def _model(cfg, platform):
    from pma_train.model import build_model

    return build_model(cfg, platform, vocab_size=257)[0]


def train(out: Path, cfg, platform) -> None:
    import deepspeed

    engine, *_ = deepspeed.initialize(model=_model(cfg, platform), config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
    rank = torch.distributed.get_rank()
    positions = torch.arange(16).unsqueeze(0).expand(2, 16)
    for step in range(STEPS):
        tokens = torch.randint(0, 257, (2, 17), generator=torch.Generator().manual_seed(100 * rank + step))
        engine.backward(engine(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean())
        engine.step()
        engine.save_checkpoint(str(out / "ds"))


def convert(out: Path) -> None:
    from pma_train.merge.ds.to_torch_dist import run_ds_to_torch_dist
    from pma_train.merge.engine import MergeRequest
    from pma_train.merge.select import select_spaced

    inputs = select_spaced(out / "ds", n=STEPS, v_iterations=1)
    run_ds_to_torch_dist(MergeRequest(inputs=inputs, weights=WEIGHTS, output_root=out / "merged", accumulate="fp64",
                                      progress=False, budget_bytes=9 * 2**20))


def _weighted(values: list[torch.Tensor]) -> torch.Tensor:
    """The fp64 weighted sum, rounded once to fp32 (accumulate_dtype=fp64)."""
    total = torch.zeros_like(values[0], dtype=torch.float64)
    for weight, value in zip(WEIGHTS, values):
        total.add_(value.double(), alpha=weight)
    return total.float()


def reference(out: Path, cfg, platform, tokens: torch.Tensor) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pma_train.checkpoint.megatron_args import megatron_args
    from pma_train.checkpoint.state import TrainState, load_checkpoint, save_checkpoint

    states = [get_fp32_state_dict_from_zero_checkpoint(str(out / "ds"), tag=f"global_step{s}")
              for s in range(1, STEPS + 1)]
    merged = {k: _weighted([s[k] for s in states]) for k in states[-1]}
    model = _model(cfg, platform)
    model.load_state_dict(merged, strict=True)  # module names: every parameter, nothing else
    state = TrainState(iteration=STEPS)
    save_checkpoint(out / "reference", [model], None, None, state, megatron_args(cfg, state, 384))
    with torch.no_grad():
        logits = model.eval()(tokens, torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens), None)
    torch.save(logits.float().contiguous(), out / "reference_logits.pt")
    newest = _model(cfg, platform)
    newest.load_state_dict(states[-1], strict=True)
    save_checkpoint(out / "newest", [newest], None, None, state, megatron_args(cfg, state, 384))
    loaded = _model(cfg, platform)
    load_checkpoint(out / "merged", [loaded])  # what checkpoint.init_from does
    differ = [n for n, p in loaded.named_parameters() if not torch.equal(p, merged[n])]
    return {"loaded_equals_reference": not differ, "differ": differ[:3],
            "not_the_newest": any(not torch.equal(merged[k], states[-1][k]) for k in merged)}


def under_tp2(out: Path, platform) -> list[str]:
    """The conversion and pma-train's own checkpoint of the reference, loaded under TP=2: the parameters
    (each rank's shards) that differ."""
    from megatron.core import parallel_state

    from pma_train.checkpoint.state import load_checkpoint
    from pma_train.parallel import init_distributed

    parallel_state.destroy_model_parallel()
    cfg = _config()
    cfg.parallel.tp = 2
    init_distributed(cfg.parallel, platform, cfg.seed)
    merged, reference = _model(cfg, platform), _model(cfg, platform)
    load_checkpoint(out / "merged", [merged])
    load_checkpoint(out / "reference", [reference])
    own = dict(reference.named_parameters())
    return [n for n, p in merged.named_parameters() if not torch.equal(p, own[n])]


def moe(out: Path, cfg, platform) -> dict:
    """tiny_moe (experts stacked under one key) under ZeRO-1 fp32, saved untrained: converted on this world,
    loaded as init_from does, it equals DeepSpeed's reconstruction; its names map onto exactly the keys
    of its sharded state dict."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from omegaconf import OmegaConf

    from pma_train.checkpoint.state import load_checkpoint
    from pma_train.conf import model_configs_dir
    from pma_train.config import ModelConfig
    from pma_train.merge.ds.params import torch_dist_key
    from pma_train.merge.ds.to_torch_dist import run_ds_to_torch_dist
    from pma_train.merge.engine import MergeRequest
    from pma_train.merge.select import describe

    cfg.model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                    OmegaConf.load(model_configs_dir() / "tiny_moe.yaml")))
    model = _model(cfg, platform)
    names = {n for n, _ in model.named_parameters()}
    keys = {v.key for k, v in model.sharded_state_dict().items() if hasattr(v, "key") and "_extra_state" not in k}
    for param in model.parameters():  # megatron-core's expert mark; DeepSpeed takes it for its own MoE's
        if getattr(param, "allreduce", True) is False:
            del param.allreduce
    engine, *_ = deepspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9, "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}})
    engine.save_checkpoint(str(out / "moe"), tag="global_step5")
    run_ds_to_torch_dist(MergeRequest(inputs=[describe(out / "moe")], weights=[1.0], output_root=out / "moe_merged",
                                      progress=False))
    expected = get_fp32_state_dict_from_zero_checkpoint(str(out / "moe"))
    loaded = _model(cfg, platform)
    load_checkpoint(out / "moe_merged", [loaded])
    return {"names_not_keys": sorted({torch_dist_key(n, names) for n in names} ^ keys),
            "differ": [n for n, p in loaded.named_parameters() if not torch.equal(p, expected[n])][:3]}


def foreign(out: Path) -> None:
    """A DeepSpeed checkpoint of a model that is not pma-train's (ZeRO-1 fp32, untrained): <dir>/foreign."""
    import deepspeed

    torch.manual_seed(0)
    engine, *_ = deepspeed.initialize(model=torch.nn.Sequential(torch.nn.Linear(8, 8)), config={
        "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9, "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}})
    engine.save_checkpoint(str(out / "foreign"), tag="global_step1")


def main() -> None:
    import deepspeed

    from pma_train.parallel import init_distributed
    from pma_train.platform import detect

    out = Path(sys.argv[1])
    tokens = torch.tensor(json.loads(Path(sys.argv[2]).read_text()))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no op build on first use
    deepspeed.init_distributed(dist_backend="gloo")
    cfg, platform = _config(), detect()
    init_distributed(cfg.parallel, platform, cfg.seed)  # megatron-core's groups, on DeepSpeed's process group
    if not (out / "ds").exists():  # (a rerun of the driver on the same directory converts again)
        train(out, cfg, platform)
    convert(out)
    results = reference(out, cfg, platform, tokens)
    results["moe"] = moe(out, _config(), platform)
    foreign(out)
    results["tp2_differ"] = under_tp2(out, platform)  # last: megatron-core's groups are TP=2 from here
    if torch.distributed.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
