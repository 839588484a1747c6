"""Initialisation that does not depend on the parallel layout.

megatron-core draws initial weights from a generator whose sequence depends on which layers a
rank builds, so PP=2 and PP=1 start from different weights. We redraw every matrix from its
checkpoint key and global row index instead: any TP / PP / EP layout (and any resumed or merged
checkpoint) then holds the same global model for one seed, and layouts can be compared exactly.

Each global row is one `torch.randn(row_len)` from a CPU generator seeded by (seed, key, row), so a
rank that holds part of a row still draws all of it (torch's CPU normal sampler makes every value
depend on the row's length). Rows are drawn into a bounded host block and copied to the parameter's
device one block at a time: host memory stays O(block) whatever the model size.
"""

from __future__ import annotations

import itertools
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer import TransformerConfig

# Output projections of residual branches get megatron's depth-scaled init.
SCALED_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")
# Host buffer for drawn rows (fp32); a row longer than this still gets a block of one row.
BLOCK_BYTES = 64 * 2**20


def sharded_tensors(node) -> Iterator[ShardedTensor]:
    if isinstance(node, dict):
        for value in node.values():
            yield from sharded_tensors(node=value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from sharded_tensors(value)
    elif isinstance(node, ShardedTensorFactory):
        # e.g. SwiGLU's fc1: two shards that are views of one parameter.
        yield from sharded_tensors(node.build())
    elif isinstance(node, ShardedTensor):
        yield node


def row_seed(seed: int, key: str, row: int) -> int:
    """The generator seed of one global row of tensor `key` (row-major over all axes but the last)."""
    return (seed * 1_000_003 + zlib.crc32(key.encode()) * 65_537 + row) % (2**63 - 1)


def global_rows(global_shape: Sequence[int], offsets: Sequence[int], local_shape: Sequence[int]) -> Iterator[int]:
    """Global row-major row numbers of a shard's local rows, in local row-major order.

    Axes of the global shape beyond the local tensor's (prepended by megatron, e.g. the expert axis)
    are fixed at their offset for the whole shard.
    """
    lead_dims = list(global_shape[:-1])
    strides = [math.prod(lead_dims[d + 1:]) for d in range(len(lead_dims))]
    lead = len(global_shape) - len(local_shape)
    base = sum(offsets[d] * strides[d] for d in range(len(lead_dims)))
    local_strides = strides[lead:]
    for index in itertools.product(*(range(n) for n in local_shape[:-1])):
        yield base + sum(i * s for i, s in zip(index, local_strides))


def _draw(block: torch.Tensor, seeds: Sequence[int]) -> None:
    generator = torch.Generator()
    for out, row_seed_ in zip(block, seeds):
        # manual_seed resets the generator completely: one generator serves every row.
        generator.manual_seed(row_seed_)
        out.normal_(generator=generator)


@torch.no_grad()
def fill_normal_layout_invariant(sh: ShardedTensor, seed: int, std: float,
                                 pool: ThreadPoolExecutor | None = None, threads: int = 1) -> None:
    """Fill sh.data with N(0, std) draws that depend only on (seed, key, global position); with a
    pool, `threads` of its workers draw the rows of each block."""
    data = sh.data
    row_len, col0, cols = sh.global_shape[-1], sh.global_offset[-1], data.shape[-1]
    try:
        rows = data.view(-1, cols)
    except RuntimeError as err:
        raise RuntimeError(f"cannot initialise {sh.key} in place: {err}") from err
    seeds = [row_seed(seed, sh.key, r) for r in global_rows(sh.global_shape, sh.global_offset, data.shape)]
    per_block = max(1, min(len(seeds), BLOCK_BYTES // (4 * row_len)))
    block = torch.empty(per_block, row_len, dtype=torch.float32)
    for start in range(0, len(seeds), per_block):
        chunk, chunk_seeds = block[:min(per_block, len(seeds) - start)], seeds[start:start + per_block]
        if pool is None or threads == 1 or len(chunk) < 2 * threads:
            _draw(chunk, chunk_seeds)
        else:  # rows are independent: threads draw disjoint slices (torch releases the GIL while drawing)
            step = -(-len(chunk) // threads)
            list(pool.map(_draw, chunk.split(step), [chunk_seeds[i:i + step] for i in range(0, len(chunk), step)]))
        chunk.mul_(std)
        rows[start:start + len(chunk)].copy_(chunk[:, col0:col0 + cols])


def init_threads() -> int:
    """This rank's share of the host's cores (torchrun's OMP_NUM_THREADS=1 says nothing about them)."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, len(os.sched_getaffinity(0)) // ranks_here))


def initialise_layout_invariant(model: torch.nn.Module, seed: int, config: TransformerConfig) -> None:
    multiplier = 1.0 if config.is_hybrid_model else 2.0
    scaled_std = config.init_method_std / math.sqrt(multiplier * config.num_layers)
    threads = init_threads()
    with ThreadPoolExecutor(threads) as pool:
        for sh in sharded_tensors(model.sharded_state_dict()):
            # Vectors (norm weights, biases, router buffers) start constant: already layout-free.
            if sh.data.dim() < 2 or not sh.data.is_floating_point():
                continue
            std = scaled_std if sh.key.endswith(SCALED_SUFFIXES) else config.init_method_std
            fill_normal_layout_invariant(sh, seed, std, pool, threads)
