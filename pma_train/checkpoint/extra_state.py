"""Load a checkpoint whatever layer spec wrote it: `_extra_state` entries may differ, weights may not.

Modules keep non-tensor state in `_extra_state`, which megatron-core checkpoints as a byte entry
(a ShardedObject, stored as `<key>/shard_<offset>_<shape>`). Which modules have one depends on the
spec that built the model, so a checkpoint's set of entries depends on where it was written:

- local spec (CPU, or a GPU host without Transformer Engine): megatron-core's Column / Row parallel
  linears (`linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2`, `output_layer`) write `None`;
  our norms and megatron-core's DotProductAttention write none.
- TE spec: the same linears (TE's LayerNormLinear / Linear under the same keys, the norms fused
  into them) write TE's state, an empty uint8 tensor without FP8 and its FP8 scaling state with
  it; TE's RMSNorm (the stack's `final_norm`, a MoE layer's `pre_mlp_layernorm`: TE >= 2 builds
  norms from fusible ops, which keep extra state) writes one the local spec lacks; TE's
  DotProductAttention writes `core_attention._extra_state` in older megatron-core releases (0.19
  does only with a learnable softmax offset).
- Megatron-LM with `--ckpt-drop-redundant-extra-state` writes none of the entries without FP8 state.

Entries the checkpoint holds but the model does not ask for are ignored by the loader as it is
(megatron-core's default `StrictHandling.ASSUME_OK_UNEXPECTED` reads only what is requested;
its other modes would drop any requested key the checkpoint lacks, weights included, so they are
not used). Entries the model asks for and the checkpoint lacks are made local here, as Megatron-LM
does for the entries it drops: the module keeps its own, fresh extra state. With FP8 that means fresh
scaling state (amax history and scales start over) on a load from a local-spec checkpoint: they
are statistics of recent activations, rebuilt within the amax history's length of steps.
Every tensor the model asks for must still be in the checkpoint; a missing one is named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from pma_train.checkpoint import layout
from pma_train.checkpoint.layout import CheckpointError

# TE's grouped linears number theirs: `_extra_state`, `_extra_state1`, ...
_EXTRA_STATE = re.compile(r"(^|\.)_extra_state\d*$")
_SHARD = "/shard_"  # how megatron-core suffixes a ShardedObject's stored key


def is_extra_state(key: str) -> bool:
    return bool(_EXTRA_STATE.search(key))


@dataclass(frozen=True)
class StoredKeys:
    """The keys a checkpoint holds: tensors, and byte objects (their ShardedObject keys)."""

    tensors: frozenset[str]
    objects: frozenset[str]

    @classmethod
    def of(cls, ckpt_dir: str | Path) -> "StoredKeys":
        entries = layout.read_metadata(ckpt_dir).state_dict_metadata
        objects = {key.rsplit(_SHARD, 1)[0] for key, meta in entries.items() if isinstance(meta, BytesStorageMetadata)}
        tensors = {key for key, meta in entries.items() if not isinstance(meta, BytesStorageMetadata)}
        return cls(frozenset(tensors), frozenset(objects))


def _leaves(node, visit) -> None:
    """Call visit(container, index, leaf) for every leaf of nested dicts / lists (to replace in place)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for index, value in list(items):
        if isinstance(value, (dict, list)):
            _leaves(value, visit)
        else:
            visit(node, index, value)


def keep_own_extra_state(sharded_state: dict, stored: StoredKeys) -> list[str]:
    """Make the `_extra_state` entries the checkpoint lacks local (in place): the load hands each
    module back its own value. Returns their keys."""
    kept: list[str] = []

    def visit(container, index, leaf) -> None:
        if isinstance(leaf, ShardedObject) and is_extra_state(leaf.key) and leaf.key not in stored.objects:
            container[index] = LocalNonpersistentObject(leaf.data)
            kept.append(leaf.key)

    _leaves(sharded_state, visit)
    return kept


def require_tensors(model_state: dict, stored: StoredKeys, ckpt_dir: str | Path) -> None:
    """Raise CheckpointError naming the first tensor of the model's sharded state the checkpoint lacks."""
    missing: list[str] = []

    def visit(_container, _index, leaf) -> None:
        if isinstance(leaf, (ShardedTensor, ShardedTensorFactory)) and leaf.key not in stored.tensors:
            missing.append(leaf.key)

    _leaves(model_state, visit)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt_dir}: has no tensor '{missing[0]}'{more}, which this model needs: "
                              "a checkpoint of another model, or one missing data")


def match_checkpoint(model_state: dict, ckpt_dir: str | Path) -> None:
    """Prepare a model's sharded state dict (in place) to load ckpt_dir, whichever spec wrote it."""
    stored = StoredKeys.of(ckpt_dir)
    require_tensors(model_state, stored, ckpt_dir)
    keep_own_extra_state(model_state, stored)
