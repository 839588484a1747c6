"""Check a whole checkpoint directory's pickles before megatron-core or torch loads any of them.

Users merge, evaluate and resume from checkpoints they did not write; torch reads `.metadata` with
plain `pickle.load` and megatron-core's byte entries with `torch.load(weights_only=False)`, so each
pickle is checked against safe_pickle's allow-list first: `.metadata` (unpickled with only the DCP
classes), every entry of the `.distcp` data files its storage_data names (tensor chunks: the
torch.save header only, no tensor data; byte entries: the whole object), the legacy `common.pt`,
and the JSON side-cars. Cost: the pickles alone (a few KB per entry), never the tensor data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pma_train.checkpoint.safe_pickle import (OBJECT_GLOBALS, TENSOR_GLOBALS, UnsafePickleError, check_archive,
                                              load_metadata)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that is not what it should be or would run code when loaded; names the file."""


def read_metadata(ckpt_dir: str | Path):
    """The DCP Metadata of a checkpoint, unpickled with only the classes it is made of."""
    path = Path(ckpt_dir) / ".metadata"
    try:
        metadata = load_metadata(path)
    except UnsafePickleError as err:  # names the global
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except Exception as err:  # a crafted or corrupt pickle surfaces as many exception types
        raise UnsafeCheckpointError(f"{path} cannot be read: {err}") from None
    problem = _malformed(metadata)
    if problem:
        raise UnsafeCheckpointError(f"{path} is malformed: {problem}")
    return metadata


def _malformed(metadata) -> str | None:
    """What in the metadata's structure our readers could trip over (allowed types in odd places)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return "state_dict_metadata and storage_data must be dicts"
    for key, md in entries.items():
        if not isinstance(key, str) or not isinstance(md, (TensorStorageMetadata, BytesStorageMetadata)):
            return f"entry {key!r} is a {type(md).__name__}"
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            return f"storage entry {index!r} is a {type(info).__name__}"
        if not (isinstance(info.relative_path, str) and isinstance(info.offset, int) and isinstance(info.length, int)):
            return f"storage entry {index.fqn}: relative_path, offset and length must be str, int, int"
        if Path(info.relative_path).name != info.relative_path or info.relative_path in ("", ".", ".."):
            # torch joins it to the directory: '../x' or an absolute path would read outside it
            return f"storage entry {index.fqn} names data file '{info.relative_path}' outside the checkpoint"
        if index.fqn not in entries:
            return f"storage entry {index.fqn} has no state_dict_metadata entry"
    return None


def vet_pickles(ckpt_dir: str | Path, metadata) -> None:
    """Raise UnsafeCheckpointError naming the file (and entry) unless every pickle of the checkpoint
    names only allowed globals; `metadata` is read_metadata(ckpt_dir)."""
    ckpt_dir = Path(ckpt_dir)
    signature = _signature(ckpt_dir)
    if _vetted.get(ckpt_dir.resolve()) == signature:
        return
    _vet_sidecars(ckpt_dir)
    common = ckpt_dir / "common.pt"  # written by older megatron-core (and Megatron-LM releases)
    if common.is_file():
        fd = _open(common)
        try:
            _vet_archive(fd, common, 0, os.fstat(fd).st_size, OBJECT_GLOBALS, "")
        finally:
            os.close(fd)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensor_keys = {k for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    fds: dict[Path, int] = {}
    try:
        for index, info in (metadata.storage_data or {}).items():
            file = ckpt_dir / info.relative_path
            if file not in fds:
                fds[file] = _open(file)
            allowed = TENSOR_GLOBALS if index.fqn in tensor_keys else OBJECT_GLOBALS
            _vet_archive(fds[file], file, info.offset, info.length, allowed,
                         f" (entry {index.fqn} at byte {info.offset})")
    finally:
        for fd in fds.values():
            os.close(fd)
    _vetted[ckpt_dir.resolve()] = signature


# A command checks a checkpoint at its start and again where it loads it: vet once per process
# while no file of the directory changes (name, size, mtime, inode).
_vetted: dict[Path, tuple] = {}


def _signature(ckpt_dir: Path) -> tuple:
    with os.scandir(ckpt_dir) as entries:
        stats = [(e.name, e.stat(follow_symlinks=True)) for e in entries if e.is_file()]
    return tuple(sorted((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats))


def _vet_sidecars(ckpt_dir: Path) -> None:
    # Read as JSON only: a side-car is never unpickled, but a damaged one is named here.
    for path in sorted(ckpt_dir.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise UnsafeCheckpointError(f"{path} is not valid JSON: {err}") from None


def _open(file: Path) -> int:
    try:
        return os.open(file, os.O_RDONLY)
    except OSError as err:
        raise UnsafeCheckpointError(f"{file} cannot be opened: {err.strerror}") from None


def _vet_archive(fd: int, file: Path, offset: int, length: int, allowed: frozenset, where: str) -> None:
    size = os.fstat(fd).st_size
    if offset < 0 or length <= 0 or offset + length > size:
        raise UnsafeCheckpointError(f"{file}{where}: {length} bytes at {offset} lie outside the file "
                                    f"({size} bytes): truncated or damaged")
    try:
        check_archive(fd, offset, length, allowed)
    except UnsafePickleError as err:  # names the global
        raise UnsafeCheckpointError(f"{file}{where}: {err}") from None
    except Exception as err:
        raise UnsafeCheckpointError(f"{file}{where} cannot be read: {err}") from None
