"""Split the merge into pieces that fit a memory budget, and share them among ranks by bytes.

A piece is a box of one tensor: one stored chunk of the newest input (so the output keeps its
layout), cut along its first axis into row blocks small enough for the budget. Inputs with other
layouts are read by global offsets, so any mix of TP / PP / EP layouts merges correctly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pma_train.merge.dcp_io import CheckpointIndex, TensorEntry, itemsize


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Piece:
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    nbytes: int  # of the piece in the inputs' dtype: what each input contributes to reads


def check_compatible(indexes: list[CheckpointIndex], keys: list[str], names: list[str]) -> None:
    """All inputs hold the same tensors with the same global shapes and dtypes; else list differences."""
    reference, problems = indexes[-1], []
    for index, name in zip(indexes, names):
        own = set(index.model_keys())
        missing, extra = sorted(set(keys) - own), sorted(own - set(keys))
        if missing:
            problems.append(f"{name} lacks {len(missing)} tensor(s), first: {missing[:3]}")
        if extra:
            problems.append(f"{name} has {len(extra)} extra tensor(s), first: {extra[:3]}")
        for key in sorted(own & set(keys)):
            mine, ref = index.tensors[key], reference.tensors[key]
            if mine.shape != ref.shape or mine.dtype != ref.dtype:
                problems.append(f"{name}: {key} is {tuple(mine.shape)} {mine.dtype}, the newest input has "
                                f"{tuple(ref.shape)} {ref.dtype}")
        if len(problems) >= 8:
            break
    if problems:
        raise PlanError("inputs differ:\n  " + "\n  ".join(problems[:8]))


def _max_row_elements(entries: list[TensorEntry]) -> int:
    """Widest stored row among all inputs' chunks of one tensor: what one read row costs."""
    return max((math.prod(c.sizes[1:]) for e in entries for c in e.chunks), default=1)


def plan_pieces(indexes: list[CheckpointIndex], keys: list[str], budget_bytes: int,
                accumulate: torch.dtype, output_dtypes: dict[str, torch.dtype],
                read_keys: dict[str, tuple[str, ...]] | None = None) -> list[Piece]:
    """Pieces of every output key, in the newest input's layout of that key; `read_keys` names
    what each input contributes to a key when that is another tensor (default: the key itself)."""
    pieces = []
    acc_size = itemsize(accumulate)
    for key in keys:
        reads = (read_keys or {}).get(key) or (key,) * len(indexes)
        entries = [index.tensors[read] for index, read in zip(indexes, reads)]
        in_size = max(itemsize(e.dtype) for e in entries)
        out_size = itemsize(output_dtypes[key])
        read_row = _max_row_elements(entries) * (in_size + acc_size)  # a read block and its conversion
        for chunk in indexes[-1].tensors[key].chunks:
            if not chunk.sizes:
                pieces.append(Piece(key, (), (), in_size))
                continue
            row = math.prod(chunk.sizes[1:])
            per_row = row * (acc_size + out_size) + read_row  # accumulator + output cast + one read
            rows = max(1, budget_bytes // per_row)
            for start in range(0, chunk.sizes[0], rows):
                count = min(rows, chunk.sizes[0] - start)
                offsets = (chunk.offsets[0] + start, *chunk.offsets[1:])
                sizes = (count, *chunk.sizes[1:])
                pieces.append(Piece(key, offsets, sizes, math.prod(sizes) * in_size))
    return pieces


def assign(pieces: list[Piece], world_size: int) -> list[list[Piece]]:
    """Largest first onto the least-loaded rank; each rank keeps its pieces in key order."""
    loads = [0] * world_size
    shares: list[list[Piece]] = [[] for _ in range(world_size)]
    for piece in sorted(pieces, key=lambda p: (-p.nbytes, p.key, p.offsets)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += piece.nbytes
        shares[rank].append(piece)
    for share in shares:
        share.sort(key=lambda p: (p.key, p.offsets))
    return shares
