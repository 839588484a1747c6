"""Initialisation that does not depend on the parallel layout.

megatron-core draws initial weights from a generator whose sequence depends on which layers a
rank builds, so PP=2 and PP=1 start from different weights. We redraw every matrix from its
checkpoint key and global row index instead: any TP / PP / EP layout (and any resumed or merged
checkpoint) then holds the same global model for one seed, and layouts can be compared exactly.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer import TransformerConfig

# Output projections of residual branches get megatron's depth-scaled init.
_SCALED_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")


def _sharded_tensors(node) -> Iterator[ShardedTensor]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _sharded_tensors(node=value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _sharded_tensors(value)
    elif isinstance(node, ShardedTensorFactory):
        # e.g. SwiGLU's fc1: two shards that are views of one parameter.
        yield from _sharded_tensors(node.build())
    elif isinstance(node, ShardedTensor):
        yield node


def _row_generator(seed: int, key: str, row: int) -> torch.Generator:
    mixed = (seed * 1_000_003 + zlib.crc32(key.encode()) * 65_537 + row) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


@torch.no_grad()
def fill_normal_layout_invariant(sh: ShardedTensor, seed: int, std: float) -> None:
    """Fill sh.data with N(0, std) draws that depend only on (seed, key, global position)."""
    global_shape = tuple(sh.global_shape)
    offsets = tuple(sh.global_offset)
    data = sh.data
    lead = len(global_shape) - data.dim()  # axes prepended by megatron (e.g. SwiGLU halves)
    row_len = global_shape[-1]
    col0 = offsets[-1]
    local_rows = data.reshape(-1, data.shape[-1])
    local_lead_shape = data.shape[:-1]
    for i in range(local_rows.shape[0]):
        local_index = torch.unravel_index(torch.tensor(i), local_lead_shape) if local_lead_shape else ()
        global_index = list(offsets[:lead]) + [offsets[lead + d] + int(local_index[d]) for d in range(len(local_lead_shape))]
        flat = 0
        for dim, idx in zip(global_shape[:-1], global_index):
            flat = flat * dim + idx
        row = torch.randn(row_len, generator=_row_generator(seed, sh.key, flat), dtype=torch.float32)
        local_rows[i].copy_(row[col0:col0 + data.shape[-1]].mul_(std))
    if local_rows.data_ptr() != data.data_ptr():
        raise RuntimeError(f"cannot initialise {sh.key} in place")


def initialise_layout_invariant(model: torch.nn.Module, seed: int, config: TransformerConfig) -> None:
    multiplier = 1.0 if config.is_hybrid_model else 2.0
    scaled_std = config.init_method_std / math.sqrt(multiplier * config.num_layers)
    for sh in _sharded_tensors(model.sharded_state_dict()):
        # Vectors (norm weights, biases, router buffers) start constant: already layout-free.
        if sh.data.dim() < 2 or not sh.data.is_floating_point():
            continue
        std = scaled_std if sh.key.endswith(_SCALED_SUFFIXES) else config.init_method_std
        fill_normal_layout_invariant(sh, seed, std)
