"""Crafted checkpoints for tests/test_untrusted.py: a real checkpoint with one of its pickles replaced
by one that runs `touch <marker>` when unpickled (os.system, pickled as posix.system)."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import TensorStorageMetadata


class RunsCode:
    """Unpickling it calls os.system('touch <marker>')."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _read_metadata(ckpt: Path):
    with open(ckpt / ".metadata", "rb") as f:
        return pickle.load(f)  # our own, trusted checkpoint


def replace_metadata(ckpt: Path, marker: Path) -> None:
    (ckpt / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))


def replace_entry(ckpt: Path, marker: Path, key_prefix: str | None = None, tensor: bool = False) -> str:
    """Append a torch.save archive of the payload to the entry's data file and point the entry at it
    (offsets of every other entry stay valid). The entry: the first byte entry whose key starts with
    key_prefix, or the first tensor chunk. Returns the entry's key."""
    metadata = _read_metadata(ckpt)
    for index, info in metadata.storage_data.items():
        is_tensor = isinstance(metadata.state_dict_metadata[index.fqn], TensorStorageMetadata)
        if is_tensor == tensor and (tensor or index.fqn.startswith(key_prefix)):
            break
    else:
        raise AssertionError(f"no entry {key_prefix} in {ckpt}")
    blob = io.BytesIO()
    torch.save(RunsCode(marker), blob)
    data_file = ckpt / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(blob.getvalue())
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(blob.getvalue()))
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return index.fqn


def add_common_pt(ckpt: Path, marker: Path) -> None:
    """The legacy common.pt, which megatron-core reads instead of the common_state entry."""
    torch.save({"iteration": 1, "args": RunsCode(marker)}, ckpt / "common.pt")
