"""Safetensors shards: planned by size, assigned to ranks, written one at a time.

A rank builds one shard's tensors (each read straight from the checkpoint's chunks into its final
layout), writes the file and frees them before the next shard: a process never holds more than one
shard (plus a bounded read block). HF's naming: one shard is `model.safetensors`; several are
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pma_train.checkpoint.integrity import Entry, digest_file
from pma_train.export.hf import ExportError, OutTensor
from pma_train.export.source import read_piece
from pma_train.merge.dcp_io import CheckpointIndex, ChunkReader

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' (decimal, as Hugging Face), '512MiB' (binary) or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ExportError(f"max_shard_size: '{text}' is not a size such as 2GB, 500MB, 512MiB or a number of bytes")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 1:
        raise ExportError(f"max_shard_size: must be positive, got '{text}'")
    return size


@dataclass
class Shard:
    file: str
    tensors: list[OutTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[Shard]:
    """In order, a new shard when the next tensor would overflow this one (a bigger tensor gets its own)."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return [Shard(SINGLE_FILE, groups[0])]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def assign(shards: list[Shard], ranks: int) -> list[list[Shard]]:
    """Shards per rank, balanced by bytes (largest first to the least loaded rank)."""
    loads, out = [0] * ranks, [[] for _ in range(ranks)]
    for shard in sorted(shards, key=lambda s: -s.nbytes):
        rank = loads.index(min(loads))
        out[rank].append(shard)
        loads[rank] += shard.nbytes
    return out


def index_json(shards: list[Shard]) -> dict:
    weight_map = {t.name: s.file for s in shards for t in s.tensors}
    params = sum(_numel(t.shape) for s in shards for t in s.tensors)
    return {"metadata": {"total_size": sum(s.nbytes for s in shards), "total_parameters": params},
            "weight_map": dict(sorted(weight_map.items()))}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class WriteReport:
    shards: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    peak_held_bytes: int = 0  # the most tensor bytes this process held at once
    files: list[Entry] = field(default_factory=list)  # checksums of the shards written


def write_shards(shards: list[Shard], index: CheckpointIndex, directory: Path) -> WriteReport:
    from safetensors.torch import save_file

    report, reader = WriteReport(), ChunkReader()
    try:
        for shard in shards:
            tensors, held = {}, 0
            for t in shard.tensors:
                tensors[t.name] = build_tensor(reader, index, t)
                held += t.nbytes
                report.peak_held_bytes = max(report.peak_held_bytes, held)
            path = directory / shard.file
            save_file(tensors, str(path), metadata={"format": "pt"})
            del tensors  # free this shard before the next one is read
            _fsync(path)
            report.files.append(digest_file(path))  # read back while still in the page cache
            os.chmod(path, 0o666 & ~_umask())  # safetensors creates files 0600; publish them as save_pretrained would
            report.shards += 1
            report.bytes_written += path.stat().st_size
    finally:
        report.bytes_read = reader.bytes_read
        reader.close()
    return report


def build_tensor(reader: ChunkReader, index: CheckpointIndex, t: OutTensor) -> torch.Tensor:
    if not t.pieces:
        return torch.full(t.shape, t.fill, dtype=t.dtype)
    out = torch.empty(t.shape, dtype=t.dtype)
    for piece in t.pieces:
        read_piece(reader, index.tensors[piece.key], piece, out)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
