"""Helper of tests/test_gpt_interop.py, run under torchrun (gloo, CPU). Two modes:

write: train a megatron-core GPTModel (Llama-style, the shapes of model_configs/tiny.yaml) a few
    steps on the built-in corpus and save it the way Megatron-LM's GPT trainer does:
    `<root>/iter_XXXXXXX/` (torch_dist) with `model` (GPTModel.sharded_state_dict(): layers stacked
    under `decoder.layers.<name>`), `iteration`, `checkpoint_version`, `args`, `rng_state`, and
    `<root>/latest_checkpointed_iteration.txt`; optionally the same weights again without
    `rng_state` (Megatron-LM's --no-save-rng). Then score the probe batch with the GPTModel.

load: for each TP size given, build pma-train's HybridModel, load the GPT checkpoint with
    pma_train.checkpoint.state.load_checkpoint and score the probe batch.

The probe batch is the first global batch a pma-train run with the PROBE settings trains on
(same data, seed and sample counts), so the loss of its first step can be compared too.
Rank 0 writes the results as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
from argparse import Namespace
from pathlib import Path

# The pma-train run the probe batch belongs to (tests/test_gpt_interop.py passes the same).
PROBE = {"seed": 7, "iters": 5, "eval_iters": 1, "global_batch_size": 8, "micro_batch_size": 2, "seq_length": 64}
VOCAB = 257  # the byte tokenizer
PADDED_VOCAB = 384  # padded to a multiple of 128, as pma-train and Megatron-LM (at TP<=2) do
ITERATION = 7


def _datasets(cache_dir: str):
    from pma_train.config import DataConfig, TokenizerConfig
    from pma_train.data import build_datasets, build_tokenizer

    p = PROBE
    tokenizer = build_tokenizer(TokenizerConfig())
    assert tokenizer.vocab_size == VOCAB
    train, _ = build_datasets(DataConfig(cache_dir=cache_dir), tokenizer, p["seq_length"], p["seed"],
                              (p["iters"] * p["global_batch_size"], p["eval_iters"] * p["global_batch_size"]))
    return train


def _global_batches(train_ds, consumed_samples: int = 0):
    """Endless global batches (lists of micro-batches) in pma-train's order, as one DP rank sees them."""
    from pma_train.data import MicroBatchIterator

    p = PROBE
    micro = MicroBatchIterator(train_ds, p["micro_batch_size"], 0, 1, consumed_samples)
    per_global = p["global_batch_size"] // p["micro_batch_size"]
    while True:
        yield [next(micro) for _ in range(per_global)]


def _loss(model, batch: list[dict]):
    """Mean per-token loss over a global batch (as pma-train's trainer reports it)."""
    total, tokens = 0.0, 0.0
    for mb in batch:
        losses = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
        mask = mb["loss_mask"].float()
        total = total + (losses.float() * mask).sum()
        tokens += mask.sum().item()
    return total / tokens


# ---------------------------------------------------------------------------------------- write

def _gpt_model(tp: int):
    """A GPTModel as Megatron-LM's pretrain_gpt.py builds it with the local spec (no TE on CPU)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4, num_query_groups=2,
        normalization="RMSNorm", layernorm_epsilon=1e-5, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.02,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, sequence_parallel=False,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=PADDED_VOCAB, max_sequence_length=PROBE["seq_length"], pre_process=True,
        post_process=True, share_embeddings_and_output_weights=False, position_embedding_type="rope",
        rotary_base=10000,
    )


def _megatron_lm_rng_state():
    """Megatron-LM's `rng_state` entry (checkpointing.get_rng_state, torch_dist format)."""
    import random

    import numpy as np
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.cuda.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    return ShardedObject("rng_state", [state], (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def write(args) -> None:
    import torch
    import torch.distributed as dist

    from pma_train import platform
    from pma_train.config import ParallelConfig
    from pma_train.parallel import init_distributed

    plat = platform.detect()
    init_distributed(ParallelConfig(tp=args.tp, sequence_parallel=False), plat, seed=1234)
    model = _gpt_model(args.tp)
    train_ds = _datasets(args.cache_dir)

    # Train from a point of the data stream the probe batch is not part of.
    batches = _global_batches(train_ds, consumed_samples=len(train_ds) // 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_losses = []
    model.train()
    for _ in range(args.steps):
        optimizer.zero_grad()
        loss = _loss(model, next(batches))
        loss.backward()
        optimizer.step()
        train_losses.append(loss.item())

    common = {
        "iteration": ITERATION,
        "checkpoint_version": 3.0,
        "args": Namespace(
            consumed_train_samples=args.steps * PROBE["global_batch_size"], consumed_valid_samples=0,
            seq_length=PROBE["seq_length"], tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=1,
            num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4, num_query_groups=2,
            padded_vocab_size=PADDED_VOCAB, ckpt_format="torch_dist", iteration=ITERATION,
        ),
        "num_floating_point_operations_so_far": 0,
    }
    _save(Path(args.root), {"model": model.sharded_state_dict(), "rng_state": _megatron_lm_rng_state(), **common})
    if args.no_rng_root:  # the same weights, as a run with --no-save-rng writes them
        _save(Path(args.no_rng_root), {"model": model.sharded_state_dict(), **common})

    model.eval()
    with torch.no_grad():
        probe = _loss(model, next(_global_batches(train_ds))).item()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"probe_loss": probe, "train_losses": train_losses,
                                              "keys": sorted(_stored_keys(Path(args.root) / f"iter_{ITERATION:07d}"))}))
    dist.destroy_process_group()


def _save(root: Path, state: dict) -> None:
    """Megatron-LM's layout: <root>/iter_XXXXXXX (torch_dist), then the tracker file."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    ckpt = root / f"iter_{ITERATION:07d}"
    if dist.get_rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=False)
    dist.barrier()
    dist_checkpointing.save(state, str(ckpt))
    dist.barrier()
    if dist.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(f"{ITERATION}")


def _stored_keys(ckpt: Path) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)


# ----------------------------------------------------------------------------------------- load

def load(args) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pma_train import platform
    from pma_train.checkpoint.state import load_checkpoint
    from pma_train.config import JobConfig, ParallelConfig, TrainConfig
    from pma_train.model import build_model
    from pma_train.parallel import init_distributed

    plat = platform.detect()
    results = {}
    train_ds = None
    for tp in (int(t) for t in args.tps.split(",")):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        cfg = JobConfig(parallel=ParallelConfig(tp=tp), train=TrainConfig(seq_length=PROBE["seq_length"]),
                        seed=PROBE["seed"])
        init_distributed(cfg.parallel, plat, cfg.seed)
        if train_ds is None:
            train_ds = _datasets(args.cache_dir)
        probe = next(_global_batches(train_ds))
        for root in args.root:
            chunks = build_model(cfg, plat, VOCAB)  # fresh weights for each load
            chunks[0].eval()
            with torch.no_grad():
                fresh = _loss(chunks[0], probe).item()
            state = load_checkpoint(root, chunks)
            with torch.no_grad():
                loaded = _loss(chunks[0], probe).item()
            results[f"{root}@tp{tp}"] = {"fresh_loss": fresh, "loaded_loss": loaded, "iteration": state.iteration,
                                         "consumed_samples": state.consumed_samples,
                                         "dp": parallel_state.get_data_parallel_world_size()}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("write", "load"))
    parser.add_argument("--root", required=True, action="append",
                        help="write: the checkpoint root (once); load: a root to load (repeatable)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--tp", type=int, default=2, help="write: the GPTModel's TP size")
    parser.add_argument("--steps", type=int, default=20, help="write: training steps before saving")
    parser.add_argument("--no-rng-root", help="write: also save the weights here without rng_state "
                                              "(as Megatron-LM's --no-save-rng does)")
    parser.add_argument("--tps", default="1,2", help="load: TP sizes to load at, in turn")
    args = parser.parse_args()
    if args.mode == "write":
        (args.root,) = args.root
    write(args) if args.mode == "write" else load(args)


if __name__ == "__main__":
    main()
