"""Run under torchrun by tests: build pma-train's model for a layout and check / dump its weights.

    torchrun --nproc-per-node N -m tests.dist_checks OUT_DIR tp pp vpp model_name
Asserts that parameters replicated across tensor-parallel ranks are identical, then writes the
model's sharded state dict (iteration-0 weights) as a torch_dist checkpoint to OUT_DIR.

    python -m tests.dist_checks previous_build
One process: build_model equals the build before its init was made scalable (megatron-core's CPU
initialisation, then tests.test_init's row-by-row reference of our init), tensor for tensor.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from omegaconf import OmegaConf


def main() -> None:
    out_dir, tp, pp, vpp, model_name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    from megatron.core import dist_checkpointing, parallel_state

    from pma_train.checkpoint.state import model_sharded_state_dict
    from pma_train.conf import model_configs_dir
    from pma_train.config import JobConfig, ModelConfig
    from pma_train.model import build_model
    from pma_train.parallel import init_distributed
    from pma_train.platform import detect

    cfg = JobConfig()
    cfg.model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                    OmegaConf.load(model_configs_dir() / f"{model_name}.yaml")))
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp = tp, pp, (vpp or None)
    # CUDA_VISIBLE_DEVICES='' (gpu_acceptance.sh's CPU build on a GPU host) asks for the CPU on purpose.
    platform = detect("gloo" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else None)
    init_distributed(cfg.parallel, platform, cfg.seed)
    chunks = build_model(cfg, platform, vocab_size=257)

    group = parallel_state.get_tensor_model_parallel_group()
    replicated = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if getattr(param, "tensor_model_parallel", False):
                continue
            copies = [torch.empty_like(param) for _ in range(tp)]
            dist.all_gather(copies, param.detach().contiguous(), group=group)
            assert all(torch.equal(copies[0], c) for c in copies), f"{name} differs across TP ranks"
            replicated += 1
    assert replicated > 0
    if dist.get_rank() == 0:

        os.makedirs(out_dir)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), out_dir)
    dist.barrier()
    dist.destroy_process_group()




def live_merge_main() -> None:
    """torchrun ... -m tests.dist_checks live OUT_JSON TP CKPT_ROOT N: average the last N checkpoints
    into a TP-sharded model (SMA) and dump every rank's parameter shards for comparison."""
    import json

    out_json, tp, root, n = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    from pma_train.checkpoint import layout
    from pma_train.config import JobConfig
    from pma_train.merge.live import average_into_model
    from pma_train.model import build_model
    from pma_train.parallel import init_distributed
    from pma_train.platform import detect

    cfg = JobConfig()
    cfg.parallel.tp = tp
    platform = detect()
    init_distributed(cfg.parallel, platform, cfg.seed)
    chunks = build_model(cfg, platform, vocab_size=257)
    iterations = layout.list_iterations(root)[-n:]
    average_into_model(chunks, [f"{root}/{layout.iter_dir_name(i)}" for i in iterations], [1.0 / n] * n)
    from pma_train.checkpoint.state import model_sharded_state_dict
    from megatron.core import dist_checkpointing

    out = out_json.replace(".json", "")
    if dist.get_rank() == 0:

        os.makedirs(out)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), out)  # what the live model now holds
    dist.barrier()
    if dist.get_rank() == 0:
        with open(out_json, "w") as f:
            json.dump({"iterations": iterations}, f)
    dist.destroy_process_group()


def previous_build_main() -> None:
    from pma_train.conf import model_configs_dir
    from pma_train.config import JobConfig, ModelConfig
    from pma_train.model import build_model
    from pma_train.model.build import build_chunks, transformer_config
    from pma_train.model.init import SCALED_SUFFIXES, sharded_tensors
    from pma_train.parallel import init_distributed
    from pma_train.platform import detect
    from tests.test_init import reference_fill

    platform = detect()
    variants = [("tiny", {"add_bias_linear": True, "position_embedding_type": "learned_absolute"}, "fp32"),
                ("tiny_moe", {}, "bf16")]
    for i, (name, overrides, precision) in enumerate(variants):
        cfg = JobConfig()
        cfg.model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                        OmegaConf.load(model_configs_dir() / f"{name}.yaml"), overrides))
        cfg.train.precision = precision
        if i == 0:
            init_distributed(cfg.parallel, platform, cfg.seed)
        new = build_model(cfg, platform, vocab_size=257)[0].state_dict()
        config = transformer_config(cfg, platform)  # megatron-core's own CPU initialisation, as before
        chunk = build_chunks(cfg, config, platform, vocab_size=257)[0]
        scaled_std = config.init_method_std / config.num_layers ** 0.5
        for sh in sharded_tensors(chunk.sharded_state_dict()):
            if sh.data.dim() >= 2 and sh.data.is_floating_point():
                reference_fill(sh, cfg.seed, scaled_std if sh.key.endswith(SCALED_SUFFIXES) else config.init_method_std)
        old = {k: v for k, v in chunk.state_dict().items() if isinstance(v, torch.Tensor)}
        assert sorted(k for k, v in new.items() if isinstance(v, torch.Tensor)) == sorted(old), name
        for key, tensor in old.items():
            assert new[key].dtype == tensor.dtype and torch.equal(new[key], tensor), f"{name}: {key} differs"
        biases = [k for k in old if k.endswith(".bias")]
        assert biases or not cfg.model.add_bias_linear, "the bias variant built no bias"
        print(f"{name}: {len(old)} tensors equal ({len(biases)} biases)")
    dist.destroy_process_group()


if __name__ == "__main__":
    mode = sys.argv[1]
    live_merge_main() if mode == "live" else previous_build_main() if mode == "previous_build" else main()
