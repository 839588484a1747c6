"""Reading and writing torch_dist (PyTorch DCP) checkpoints piece by piece, without a model.

A DCP checkpoint is `.metadata` (for every key: global shape, dtype, stored chunks, and where each
chunk lives) plus data files where every chunk is one `torch.save` archive. torch's own reader
always loads a stored chunk whole; to stay within a memory budget we locate the raw storage bytes
inside the archive and read only the rows a piece needs.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.filesystem import _StorageInfo

from pma_train.checkpoint.hashing import ALGORITHM, READ_BLOCK, HashingFile
from pma_train.checkpoint.integrity import Entry, Expected, expected_items
from pma_train.checkpoint.layout import CheckpointError, is_optimizer_key, read_metadata
from pma_train.checkpoint.safe_pickle import TENSOR_GLOBALS, FileSlice, RestrictedUnpickler, UnsafePickleError



@dataclass(frozen=True)
class StoredChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    offset: int
    length: int
    expected: Expected | None = None  # its recorded checksum (None: the checkpoint records none)


@dataclass
class TensorEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: list[StoredChunk] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class StoredBytes:
    index: MetadataIndex
    file: Path
    offset: int
    length: int
    expected: Expected | None = None


class CheckpointIndex:
    """What one checkpoint holds, from its `.metadata` alone."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self.metadata: Metadata = read_metadata(self.dir)  # restricted unpickler: never runs code
        self.tensors: dict[str, TensorEntry] = {}
        self.byte_keys: list[str] = []
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self.tensors[key] = TensorEntry(key, md.properties.dtype, tuple(md.size))
            elif isinstance(md, BytesStorageMetadata):
                self.byte_keys.append(key)
        self.bytes: list[StoredBytes] = []
        items = [(i.relative_path, i.offset, i.length, index.fqn) for index, i in self.metadata.storage_data.items()]
        expected = expected_items(self.dir, items) or {}
        for index, info in self.metadata.storage_data.items():
            where = (self.dir / info.relative_path, info.offset, info.length,
                     expected.get((info.relative_path, info.offset)))
            if index.fqn in self.tensors:
                self.tensors[index.fqn].chunks.append(StoredChunk(tuple(index.offset), _chunk_sizes(self.metadata, index), *where))
            else:
                self.bytes.append(StoredBytes(index, *where))

    def model_keys(self) -> list[str]:
        return sorted(k for k in self.tensors if not is_optimizer_key(k))

    def optimizer_keys(self) -> list[str]:
        return sorted(k for k in self.tensors if is_optimizer_key(k))


def _chunk_sizes(metadata: Metadata, index: MetadataIndex) -> tuple[int, ...]:
    md = metadata.state_dict_metadata[index.fqn]
    for chunk in md.chunks:
        if tuple(chunk.offsets) == tuple(index.offset):
            return tuple(chunk.sizes)
    raise ValueError(f"{index.fqn}: no chunk at offset {tuple(index.offset)} in the metadata")


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Located:
    data_offset: int  # absolute file offset of element 0 of the chunk
    dtype: torch.dtype
    sizes: tuple[int, ...]


class _TensorRecord:
    def __init__(self, storage, storage_offset, size, stride, *args):
        self.storage, self.storage_offset, self.size, self.stride = storage, storage_offset, tuple(size), tuple(stride)


class _ArchiveUnpickler(RestrictedUnpickler):
    """Reads a torch.save archive's data.pkl (a tensor chunk's header) without touching tensor data."""

    allowed = TENSOR_GLOBALS

    def resolve(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorRecord
        if name.endswith("Storage"):
            return name
        return super().resolve(module, name)  # dtypes, OrderedDict

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        return pid


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _contiguous_strides(sizes: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(sizes):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class ChunkReader:
    """Reads rows of stored chunks straight from the data files; verifies each stored item against its
    recorded checksum at its first read (whole, once: the page cache then serves the rows)."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._located: dict[tuple[Path, int], _Located | None] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._verified: set[tuple[Path, int]] = set()
        self._hash_buffer: bytearray | None = None
        self.bytes_read = 0
        self.bytes_verified = 0

    def _verify(self, file: Path, offset: int, expected: Expected | None) -> None:
        if expected is None or (file, offset) in self._verified:
            return
        if self._hash_buffer is None:
            self._hash_buffer = bytearray(READ_BLOCK)
        expected.verify(self._fd(file), self._hash_buffer)
        self._verified.add((file, offset))
        self.bytes_verified += expected.entry.length

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _locate(self, chunk: StoredChunk) -> _Located | None:
        key = (chunk.file, chunk.offset)
        if key not in self._located:
            self._located[key] = self._parse_archive(chunk)
        return self._located[key]

    def _parse_archive(self, chunk: StoredChunk) -> _Located | None:
        """Where the chunk's elements start in the file; None if the archive is not a plain tensor."""
        fd = self._fd(chunk.file)
        try:
            archive = zipfile.ZipFile(FileSlice(fd, chunk.offset, chunk.length))
            pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            record = _ArchiveUnpickler(io.BytesIO(archive.read(pkl))).load()
        except UnsafePickleError as err:  # never falls back to torch.load for these
            raise CheckpointError(f"{chunk.file} (chunk at byte {chunk.offset}): {err}") from None
        except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, KeyError):
            return None
        if not isinstance(record, _TensorRecord) or record.size != chunk.sizes:
            return None
        if record.stride != _contiguous_strides(record.size) and math.prod(record.size) > 1:
            return None
        _, storage_type, storage_key, _, _ = record.storage
        dtype = storage_type if isinstance(storage_type, torch.dtype) else _STORAGE_DTYPES.get(storage_type)
        info = next((i for i in archive.infolist() if i.filename.endswith(f"data/{storage_key}")), None)
        if dtype is None or info is None or info.compress_type != zipfile.ZIP_STORED:
            return None
        header = os.pread(fd, 30, chunk.offset + info.header_offset)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        data_offset = chunk.offset + info.header_offset + 30 + name_len + extra_len
        return _Located(data_offset + record.storage_offset * itemsize(dtype), dtype, record.size)

    def read_rows(self, chunk: StoredChunk, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a stored chunk (elements, for 1-D chunks), shape (stop-start, *sizes[1:])."""
        self._verify(chunk.file, chunk.offset, chunk.expected)
        located = self._locate(chunk)
        if located is None:
            return self._read_whole(chunk)[start:stop]
        if not chunk.sizes:  # a 0-d tensor
            return self._pread_tensor(chunk.file, located.data_offset, 1, located.dtype).reshape(())
        row = math.prod(chunk.sizes[1:])
        count = (stop - start) * row
        offset = located.data_offset + start * row * itemsize(located.dtype)
        flat = self._pread_tensor(chunk.file, offset, count, located.dtype)
        return flat.view(stop - start, *chunk.sizes[1:])

    def _pread_tensor(self, path: Path, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = count * itemsize(dtype)
        if not nbytes:
            return torch.empty(0, dtype=dtype)
        # One reused scratch buffer: fresh large allocations (page faults) cost more than the copy.
        # Callers consume each block before the next read.
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        buffer = self._scratch[:nbytes]
        view, done, fd = memoryview(buffer.numpy()), 0, self._fd(path)
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise EOFError(f"{path}: data ends at byte {offset + done}, {nbytes - done} bytes short")
            done += got
        self.bytes_read += nbytes
        return buffer.view(dtype)

    def _read_whole(self, chunk: StoredChunk) -> torch.Tensor:
        # Fallback for archives we cannot index (never seen for megatron checkpoints): torch.load.
        fd = self._fd(chunk.file)
        blob = os.pread(fd, chunk.length, chunk.offset)
        self.bytes_read += len(blob)
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)

    def read_raw(self, path: Path, offset: int, length: int, expected: Expected | None = None) -> bytes:
        self._verify(path, offset, expected)
        self.bytes_read += length
        return os.pread(self._fd(path), length, offset)


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class WrittenTensor:
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    relative_path: str
    offset: int
    length: int
    digest: str = ""

    def checksum(self) -> Entry:
        return Entry(self.relative_path, self.offset, self.length, self.digest, self.key)


@dataclass(frozen=True)
class WrittenBytes:
    key: str
    relative_path: str
    offset: int
    length: int
    digest: str = ""

    def checksum(self) -> Entry:
        return Entry(self.relative_path, self.offset, self.length, self.digest, self.key)


class ChunkWriter:
    """Appends tensors (as torch.save archives, like DCP) and raw byte entries to one data file, hashing
    each entry as it is written (its checksum costs no re-read)."""

    def __init__(self, directory: Path, name: str):
        self.name = name
        self.file = open(Path(directory) / name, "wb")
        self._hashing = HashingFile(self.file, ALGORITHM)
        self.tensors: list[WrittenTensor] = []
        self.byte_entries: list[WrittenBytes] = []
        self.bytes_written = 0

    def write_tensor(self, key: str, offsets: tuple[int, ...], tensor: torch.Tensor) -> None:
        start = self.file.tell()
        # A fresh contiguous tensor: torch.save would otherwise write a view's whole storage.
        self._hashing.restart()
        torch.save(tensor.contiguous().clone() if tensor._base is not None else tensor.contiguous(), self._hashing)
        length = self.file.tell() - start
        self.bytes_written += length
        self.tensors.append(WrittenTensor(key, tuple(offsets), tuple(tensor.shape), self.name, start, length,
                                          self._hashing.hexdigest()))

    def write_bytes(self, key: str, raw: bytes) -> None:
        start = self.file.tell()
        self._hashing.restart()
        self._hashing.write(raw)
        self.bytes_written += len(raw)
        self.byte_entries.append(WrittenBytes(key, self.name, start, len(raw), self._hashing.hexdigest()))

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def assemble_metadata(template: Metadata, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      tensors: list[WrittenTensor], byte_entries: list[WrittenBytes]) -> Metadata:
    """Global metadata for the pieces every rank wrote: a normal DCP `.metadata`."""
    state_dict_metadata: dict = {}
    storage_data: dict = {}
    by_key: dict[str, list[WrittenTensor]] = {}
    for written in tensors:
        by_key.setdefault(written.key, []).append(written)
    for key, pieces in sorted(by_key.items()):
        shape, dtype = shapes[key]
        pieces.sort(key=lambda w: w.offsets)
        chunks = [ChunkStorageMetadata(offsets=torch.Size(w.offsets), sizes=torch.Size(w.sizes)) for w in pieces]
        state_dict_metadata[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype), size=torch.Size(shape), chunks=chunks)
        for index, w in enumerate(pieces):
            storage_data[MetadataIndex(key, torch.Size(w.offsets), index)] = _StorageInfo(w.relative_path, w.offset, w.length)
    for entry in byte_entries:
        state_dict_metadata[entry.key] = BytesStorageMetadata()
        storage_data[MetadataIndex(entry.key)] = _StorageInfo(entry.relative_path, entry.offset, entry.length)
    return Metadata(state_dict_metadata=state_dict_metadata, planner_data=template.planner_data,
                    storage_data=storage_data, storage_meta=template.storage_meta, version=template.version)
