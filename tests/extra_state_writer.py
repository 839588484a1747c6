"""Helper of tests/test_extra_state.py (one plain process, gloo): rewrite a 1-rank pma-train
checkpoint with megatron-core's dist_checkpointing as other writers would have written it.

te:        as the TE spec writes it: the linears' `_extra_state` hold TE's (an empty uint8 tensor;
           layer 0's qkv an FP8-like payload), plus TE's entries the local spec lacks
           (`decoder.final_norm._extra_state`, and `core_attention._extra_state` of every attention
           layer, as older megatron-core releases write it), with TE's key names and layout; of every
           --ckpt, into one root.
no-extra:  without any `_extra_state` entry (Megatron-LM's --ckpt-drop-redundant-extra-state).
no-weight: without the tensor named by --drop.

Each variant is a checkpoint root (<out>/<variant>) with the same iteration, sidecar and checksums.
"""

from __future__ import annotations

import argparse
import pickle
import shutil
from pathlib import Path

import torch

FP8_LIKE = {"forward": {"scale_fwd": torch.ones(1), "amax_history_fwd": torch.zeros(4, 1)}}
TE_ONLY = ["decoder.final_norm._extra_state"]  # plus core_attention of every attention layer


def te_empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)  # TE's get_extra_state without FP8


def te_payload(state: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)  # TE's with FP8


def read_all(ckpt: Path) -> tuple[dict, dict]:
    """Every stored entry ({key: tensor} and {unique key: object}) and the common state."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from pma_train.checkpoint.layout import read_metadata

    request = {}
    for key, meta in read_metadata(ckpt).state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            if not key.startswith("common_state"):
                request[key] = ShardedObject.empty_from_unique_key(key)
        else:
            request[key] = ShardedTensor.from_rank_offsets(key, torch.empty(meta.size, dtype=meta.properties.dtype),
                                                           replica_id=0)
    loaded = dist_checkpointing.load(request, str(ckpt))
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    return {k: loaded[k] for k in request}, common


def write(entries: dict, common: dict, source: Path, root: Path) -> None:
    """Save entries (unique key -> value) and the common state as megatron-core does, with pma's sidecars."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

    from pma_train.checkpoint import integrity, layout

    state = dict(common)
    for key, value in entries.items():
        if "/shard_" in key:
            empty = ShardedObject.empty_from_unique_key(key)
            if empty.global_shape == (1,):  # a module's own entry: made as TE's modules make theirs
                state[key] = make_sharded_object_for_checkpoint(value, empty.key, (), replica_id=(0, 0, 0))
            else:
                state[key] = ShardedObject(empty.key, value, empty.global_shape, empty.global_offset, replica_id=0)
        else:
            state[key] = ShardedTensor.from_rank_offsets(key, value, replica_id=0)
    final = root / source.name
    final.mkdir(parents=True)
    dist_checkpointing.save(state, str(final), async_sharded_save=False)
    shutil.copy(source / layout.TRAIN_STATE_SIDECAR, final / layout.TRAIN_STATE_SIDECAR)
    integrity.record_checksums(final)
    layout.write_tracker(root, layout.iteration_of(final))


def te_shaped(entries: dict, iteration: int) -> dict:
    """TE's entries; the FP8-like payload (layer 0's qkv) records the iteration, to tell inputs apart."""
    out = {}
    for key, value in entries.items():
        out[key] = te_empty() if key.split("/")[0].endswith("._extra_state") else value
    attention = sorted({k.split(".self_attention.")[0] for k in entries
                        if k.startswith("decoder.") and ".self_attention.linear_qkv.weight" in k})
    for key in TE_ONLY + [f"{layer}.self_attention.core_attention._extra_state" for layer in attention]:
        out[f"{key}/shard_0_1"] = te_empty()
    out[f"{attention[0]}.self_attention.linear_qkv._extra_state/shard_0_1"] = te_payload({**FP8_LIKE, "iteration": iteration})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", type=Path, action="append", required=True, help="te variant of each; others of the first")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--drop", required=True)
    args = parser.parse_args()

    from pma_train import platform
    from pma_train.checkpoint import layout
    from pma_train.checkpoint.state import write_results_in_process
    from pma_train.config import ParallelConfig
    from pma_train.parallel import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), platform.detect(), seed=1)
    write_results_in_process()
    for ckpt in args.ckpt:
        entries, common = read_all(ckpt)
        write(te_shaped(entries, layout.iteration_of(ckpt)), common, ckpt, args.out / "te")
        if ckpt == args.ckpt[0]:
            write({k: v for k, v in entries.items() if "._extra_state/" not in k}, common, ckpt, args.out / "no-extra")
            write({k: v for k, v in entries.items() if k != args.drop}, common, ckpt, args.out / "no-weight")
    destroy_distributed()


if __name__ == "__main__":
    main()
