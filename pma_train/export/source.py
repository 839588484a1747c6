"""The checkpoint side of an export: what a torch_dist checkpoint holds, and reading parts of its tensors.

Model-free like the merge engine: the checkpoint's `.metadata` gives every tensor's global shape and
stored chunks (in whatever TP / PP / EP layout it was written), and `ChunkReader` reads rows of those
chunks straight from the data files. A region is assembled from every chunk that overlaps it, in
bounded blocks, straight into the caller's output tensor.
"""

from __future__ import annotations

import argparse
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pma_train.checkpoint import layout
from pma_train.checkpoint.layout import CheckpointError
from pma_train.merge.dcp_io import CheckpointIndex, ChunkReader, TensorEntry
from pma_train.merge.ds.accept import deepspeed_refusal

# Largest block read from a chunk at once: bounds the reader's scratch buffer.
READ_BLOCK_BYTES = 64 * 2**20


@dataclass
class Source:
    """An iter_* directory ready to read: its index, and the run's args if the checkpoint records them."""

    path: Path
    index: CheckpointIndex
    args: argparse.Namespace | None
    iteration: int | None
    consumed_tokens: int | None


def open_checkpoint(path: str | Path) -> Source:
    """Resolve a root or iter_* directory, check it is complete and pma-train's (HybridModel) format."""
    if refusal := deepspeed_refusal(path, "checkpoint"):
        raise CheckpointError(refusal)
    ckpt = layout.resolve_checkpoint(path)
    layout.verify_complete(ckpt)
    if layout.is_gpt_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is a Megatron-LM GPTModel checkpoint (layers stacked under one key), "
                              "which pma-export does not read: a pma-train run with checkpoint.init_from=<it> "
                              "saves its weights in pma-train's per-layer format, export that")
    index = CheckpointIndex(ckpt)
    if not index.model_keys():
        raise CheckpointError(f"{ckpt} holds no model tensors")
    common = read_common_state(index)
    args = common.get("args") if isinstance(common.get("args"), argparse.Namespace) else None
    state = common.get("pma_train") if isinstance(common.get("pma_train"), dict) else {}
    iteration = state.get("iteration", common.get("iteration", layout.iteration_of(ckpt)))
    return Source(ckpt, index, args, iteration, state.get("consumed_tokens"))


def read_common_state(index: CheckpointIndex) -> dict:
    """Rank 0's non-sharded state (megatron-core 0.19: a `common_state` object in the DCP data; older
    versions: common.pt). Unpickled with torch's safe loader (plain containers and the run's argparse
    Namespace only); anything else yields {} and the export goes on without the recorded args."""
    raw = None
    for stored in index.bytes:
        if stored.index.fqn.split("/")[0] == "common_state":
            reader = ChunkReader()
            try:
                raw = reader.read_raw(stored.file, stored.offset, stored.length, stored.expected)
            finally:
                reader.close()
            break
    if raw is None and (index.dir / "common.pt").is_file():
        raw = (index.dir / "common.pt").read_bytes()
    if raw is None:
        return {}
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception:  # args holding other classes (Megatron-LM enums, ...): not needed to export
        return {}
    if isinstance(state, list) and state and isinstance(state[0], dict):
        state = state[0]
    return state if isinstance(state, dict) else {}


# ----------------------------------------------------------------------------- reading regions


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of the source tensor `key` (at index `prefix` of its leading axes, e.g. an
    expert), placed at output rows dst_start, dst_start + dst_step, ... All other axes are copied whole."""

    key: str
    start: int
    stop: int
    dst_start: int
    dst_step: int = 1
    prefix: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return self.stop - self.start


def read_piece(reader: ChunkReader, entry: TensorEntry, piece: Piece, out: torch.Tensor) -> None:
    """Copy one piece of a global tensor into `out` (cast to out's dtype), chunk by chunk."""
    p = len(piece.prefix)
    row_axis = p
    for chunk in entry.chunks:
        if any(not (o <= i < o + s) for i, o, s in zip(piece.prefix, chunk.offsets, chunk.sizes)):
            continue
        lo = max(piece.start, chunk.offsets[row_axis])
        hi = min(piece.stop, chunk.offsets[row_axis] + chunk.sizes[row_axis])
        if lo >= hi:
            continue
        cols = tuple(slice(o, o + s) for o, s in zip(chunk.offsets[row_axis + 1:], chunk.sizes[row_axis + 1:]))
        if p == 0:
            row_bytes = math.prod(chunk.sizes[1:]) * entry.dtype.itemsize
            block = max(1, READ_BLOCK_BYTES // max(row_bytes, 1))
            for b_lo in range(lo, hi, block):
                b_hi = min(hi, b_lo + block)
                data = reader.read_rows(chunk, b_lo - chunk.offsets[0], b_hi - chunk.offsets[0])
                _place(out, data, b_lo - piece.start, piece, cols)
        else:
            # Leading axes fixed (an expert): read that slab of the chunk (one expert's slice of one
            # chunk, small), then its rows.
            local = [i - o for i, o in zip(piece.prefix, chunk.offsets)]
            slab = reader.read_rows(chunk, local[0], local[0] + 1)[0]
            for i in local[1:]:
                slab = slab[i]
            r0 = chunk.offsets[row_axis]
            _place(out, slab[lo - r0:hi - r0], lo - piece.start, piece, cols)


def _place(out: torch.Tensor, data: torch.Tensor, first: int, piece: Piece, cols: tuple[slice, ...]) -> None:
    start = piece.dst_start + first * piece.dst_step
    stop = start + (data.shape[0] - 1) * piece.dst_step + 1
    out[(slice(start, stop, piece.dst_step), *cols)] = data
