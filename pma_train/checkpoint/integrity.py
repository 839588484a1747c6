"""Checksums of checkpoint data: the `checksums.json` sidecar, recorded when written, verified when read.

Same-size corruption (bytes flipped inside a data file) passes every size check and often unpickles
fine: only a digest of the bytes finds it. A torch_dist checkpoint's `checksums.json` records a digest
of every stored item of its DCP metadata (data file, offset, length -> digest, with the tensor or
object stored there) and of the small metadata files beside the data; an export directory records
its files whole. The algorithm (pma_train/checkpoint/hashing.py, xxh3_64: 3.5-7 GB/s on one core here,
3-4x zlib.crc32) keeps recording and verifying to a few % of a save or load. The one home of the sidecar format: every reader and
writer of checksums goes through this module.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pma_train.checkpoint.hashing import ALGORITHM, READ_BLOCK, HashingError, digest_range, new_hasher
from pma_train.checkpoint import layout
from pma_train.checkpoint.layout import CheckpointError

SIDECAR = "checksums.json"
FORMAT = "pma-train checksums"
VERSION = 1
# Files DCP and megatron-core write beside the data: a flipped byte there misplaces every tensor.
METADATA_FILES = (".metadata", "metadata.json", "common.pt")


class ChecksumError(CheckpointError):
    """Checkpoint data that does not match its recorded checksum; the message names checkpoint, file, tensor."""


@dataclass(frozen=True)
class Entry:
    """The digest of bytes [offset, offset + length) of one file of a checkpoint directory."""

    path: str  # relative to the checkpoint directory
    offset: int
    length: int
    digest: str
    key: str = ""  # the tensor / object stored there; "" for a whole file

    def describe(self, ckpt_dir: Path) -> str:
        if not self.key:
            return f"checkpoint {ckpt_dir}, file {self.path}"
        return (f"checkpoint {ckpt_dir}, file {self.path}, tensor {self.key} "
                f"(bytes {self.offset}..{self.offset + self.length})")


@dataclass
class Checksums:
    algorithm: str
    chunks: list[Entry]  # stored items of the DCP metadata
    files: list[Entry]  # whole files

    def chunk_at(self) -> dict[tuple[str, int], Entry]:
        return {(e.path, e.offset): e for e in self.chunks}

    @property
    def nbytes(self) -> int:
        return sum(e.length for e in self.chunks + self.files)


# ----------------------------------------------------------------------------- the sidecar


_FIELDS = ["file", "offset", "length", "digest", "key"]


def write_checksums(directory: Path, checksums: Checksums) -> None:
    """The sidecar, flushed to disk: it is published with (and as durable as) the data it covers."""
    rows = lambda entries: [[e.path, e.offset, e.length, e.digest, e.key] for e in entries]  # noqa: E731
    doc = {"format": FORMAT, "version": VERSION, "algorithm": checksums.algorithm, "fields": _FIELDS,
           "chunks": rows(checksums.chunks), "files": rows(checksums.files)}
    path = Path(directory) / SIDECAR
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())


def read_checksums(directory: Path) -> Checksums | None:
    """The recorded checksums of a directory; None if it has none (written before they were recorded)."""
    path = Path(directory) / SIDECAR
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes())
        if doc.get("format") != FORMAT or doc.get("version") != VERSION or doc.get("fields") != _FIELDS:
            raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}, expected "
                             f"{FORMAT!r} version {VERSION}")
        entries = lambda rows: [Entry(str(p), int(o), int(n), str(d), str(k)) for p, o, n, d, k in rows]  # noqa: E731
        checksums = Checksums(str(doc["algorithm"]), entries(doc["chunks"]), entries(doc["files"]))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ChecksumError(f"{path} is not a readable checksum file: {err}") from None
    try:
        new_hasher(checksums.algorithm)  # an unknown algorithm is named now, not at the first chunk
    except HashingError as err:
        raise ChecksumError(f"{path}: {err}") from None
    return checksums


def digest_file(path: Path, algorithm: str = ALGORITHM) -> Entry:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return Entry(path.name, 0, size, digest_range(fd, 0, size, algorithm))
    finally:
        os.close(fd)


def file_entries(directory: Path, names, algorithm: str = ALGORITHM) -> list[Entry]:
    """Whole-file entries for those of `names` present in the directory."""
    return [digest_file(Path(directory) / n, algorithm) for n in names if (Path(directory) / n).is_file()]


_warned: set[str] = set()


def warn_unchecked(ckpt_dir: Path) -> None:
    """Once per checkpoint and process, on rank 0: a checkpoint without checksums is read unverified."""
    import torch.distributed as dist

    if str(ckpt_dir) in _warned or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    _warned.add(str(ckpt_dir))
    print(f"pma-train: warning: {ckpt_dir} carries no checksums ({SIDECAR}; written before pma-train recorded "
          "them): its data is read unverified", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- verifying


def storage_items(ckpt_dir: Path) -> list[tuple[str, int, int, str]]:
    """(file, offset, length, key) of every stored item of a torch_dist checkpoint's metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    return sorted((info.relative_path, info.offset, info.length, index.fqn)
                  for index, info in (metadata.storage_data or {}).items())


def uncovered(ckpt_dir: Path, checksums: Checksums, items) -> list[str]:
    """Problems: stored items the sidecar has no (or another) record of."""
    at = checksums.chunk_at()
    problems = []
    for path, offset, length, key in items:
        entry = at.get((path, offset))
        if entry is None or entry.length != length:
            problems.append(f"{Entry(path, offset, length, '', key).describe(ckpt_dir)}: no checksum recorded in {SIDECAR}")
    return problems


def verify_entry(ckpt_dir: Path, entry: Entry, algorithm: str, fd: int, buffer: bytearray | None = None) -> str | None:
    """None if the bytes match the record, else the problem (naming checkpoint, file, tensor)."""
    size = os.fstat(fd).st_size
    if size < entry.offset + entry.length or (not entry.key and size != entry.length):
        return f"{entry.describe(ckpt_dir)}: the file holds {size} bytes, {entry.offset + entry.length} recorded"
    if digest_range(fd, entry.offset, entry.length, algorithm, buffer) != entry.digest:
        return f"checksum mismatch: {entry.describe(ckpt_dir)}: the data is corrupted"
    return None


@dataclass(frozen=True)
class Expected:
    """What one stored item of a checkpoint must hash to: attached to the item by readers that stream it."""

    ckpt_dir: Path
    entry: Entry
    algorithm: str

    def verify(self, fd: int, buffer: bytearray | None = None) -> None:
        problem = verify_entry(self.ckpt_dir, self.entry, self.algorithm, fd, buffer)
        if problem:
            raise ChecksumError(problem)


def expected_items(ckpt_dir: Path, items) -> dict[tuple[str, int], Expected] | None:
    """For streaming readers: the record of every stored item (file, offset, length, key) of the checkpoint,
    its metadata files verified now; None (and one warning) if it has no sidecar; ChecksumError if the
    sidecar misses an item or a metadata file does not match."""
    checksums = read_checksums(ckpt_dir)
    if checksums is None:
        warn_unchecked(Path(ckpt_dir))
        return None
    problems = uncovered(ckpt_dir, checksums, items)
    problems += [p for e in checksums.files for p in verify_file_entries(ckpt_dir, checksums.algorithm, [e])]
    if problems:
        raise ChecksumError(summarize(problems, Path(ckpt_dir)))
    return {k: Expected(Path(ckpt_dir), e, checksums.algorithm) for k, e in checksums.chunk_at().items()}


def verify_file_entries(ckpt_dir: Path, algorithm: str, entries: list[Entry], progress=None) -> list[str]:
    """Problems of entries of one file (all one path), read in offset order; progress(n) per entry."""
    if not entries:
        return []
    path = Path(ckpt_dir) / entries[0].path
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        return [f"checkpoint {ckpt_dir}, file {entries[0].path}: cannot be read: {err.strerror}"]
    problems, buffer = [], bytearray(READ_BLOCK)
    try:
        for entry in sorted(entries, key=lambda e: e.offset):
            problem = verify_entry(Path(ckpt_dir), entry, algorithm, fd, buffer)
            if problem:
                problems.append(problem)
            if progress is not None:
                progress(entry.length)
    finally:
        os.close(fd)
    return problems


_UNIT_BYTES = 64 * 2**20


def work_units(checksums: Checksums) -> list[list[Entry]]:
    """Entries in groups of consecutive items of one file, about _UNIT_BYTES each: the units in which ranks
    and workers share a verification (one big file keeps every one of them busy)."""
    files: dict[str, list[Entry]] = {}
    for entry in checksums.chunks + checksums.files:
        files.setdefault(entry.path, []).append(entry)
    units = []
    for entries in files.values():
        group, size = [], 0
        for entry in sorted(entries, key=lambda e: e.offset):
            if group and size + entry.length > _UNIT_BYTES:
                units.append(group)
                group, size = [], 0
            group.append(entry)
            size += entry.length
        units.append(group)
    return units


def share_units(units: list[list[Entry]], world: int) -> list[list[list[Entry]]]:
    """Units per rank, balanced by bytes; the same on every rank."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    order = sorted(range(len(units)), key=lambda i: (-sum(e.length for e in units[i]), i))
    for i in order:
        rank = loads.index(min(loads))
        shares[rank].append(units[i])
        loads[rank] += sum(e.length for e in units[i])
    return shares


def writer_rank(path: str, world: int) -> int | None:
    """The rank that wrote a DCP data file (`__<rank>_<n>.distcp`): its page cache still holds it."""
    match = re.search(r"__(\d+)_\d+\.distcp$", path)
    return int(match.group(1)) if match and int(match.group(1)) < world else None


def summarize(problems: list[str], ckpt_dir: Path) -> str:
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more: pma-check {ckpt_dir} lists them all)" if more else "")


# ----------------------------------------------------------------------------- collective record / verify


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj) -> list:
    import torch.distributed as dist

    if _rank_world()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _digest_items(ckpt_dir: Path, items, algorithm: str) -> list[Entry]:
    entries, buffer, fds = [], bytearray(READ_BLOCK), {}
    try:
        for path, offset, length, key in items:  # sorted: each file read front to back
            if path not in fds:
                fds[path] = os.open(Path(ckpt_dir) / path, os.O_RDONLY)
            entries.append(Entry(path, offset, length, digest_range(fds[path], offset, length, algorithm, buffer), key))
    finally:
        for fd in fds.values():
            os.close(fd)
    return entries


def record_checksums(ckpt_dir: Path, write: bool = True) -> "Checksums | None":
    """Collective, once a DCP save is complete: every rank hashes the data files it wrote itself (still in
    its page cache); rank 0 gets the record (and writes the sidecar unless write=False). Raises the same
    ChecksumError on every rank on failure."""
    rank, world = _rank_world()
    items = storage_items(ckpt_dir)
    names = sorted({item[0] for item in items})
    owner = {n: writer_rank(n, world) for n in names}
    orphans = [n for n in names if owner[n] is None]
    owner.update({n: i % world for i, n in enumerate(orphans)})
    try:
        result = (_digest_items(ckpt_dir, [i for i in items if owner[i[0]] == rank], ALGORITHM), None)
    except OSError as err:
        result = ([], f"{ckpt_dir}: cannot record checksums on rank {rank}: {err}")
    gathered = _all_gather(result)
    errors = [error for _, error in gathered if error]
    if errors:
        raise ChecksumError(errors[0])
    if rank != 0:
        return None
    chunks = sorted((e for entries, _ in gathered for e in entries), key=lambda e: (e.path, e.offset))
    record = Checksums(ALGORITHM, chunks, file_entries(ckpt_dir, METADATA_FILES))
    if write:
        write_checksums(ckpt_dir, record)
    return record


class Verification:
    """verify_checkpoint in two halves, so that a load runs while this rank hashes its share. Starting
    checks the record (the same on every rank) and hashes in a thread; finish() gathers on the main thread
    (a collective must not race the loader's own) and raises the same ChecksumError on every rank."""

    def __init__(self, ckpt_dir: Path, with_optimizer: bool = True):
        self.ckpt_dir = Path(ckpt_dir)
        self._thread: threading.Thread | None = None
        self._found: list[str] = []
        checksums = read_checksums(self.ckpt_dir)
        if checksums is None:
            warn_unchecked(self.ckpt_dir)
            return
        problems = uncovered(self.ckpt_dir, checksums, storage_items(self.ckpt_dir))
        if problems:
            raise ChecksumError(summarize(problems, self.ckpt_dir))
        if not with_optimizer:  # a load without optimizer reads none of its items
            checksums.chunks = [e for e in checksums.chunks if not layout.is_optimizer_key(e.key)]
        rank, world = _rank_world()
        mine = share_units(work_units(checksums), world)[rank]
        self._thread = threading.Thread(target=self._hash, args=(checksums.algorithm, mine),
                                        name="pma-verify", daemon=True)
        self._thread.start()

    def _hash(self, algorithm: str, groups: list[list[Entry]]) -> None:
        try:
            for entries in groups:
                self._found.extend(verify_file_entries(self.ckpt_dir, algorithm, entries))
        except Exception as err:  # reported by finish(), not lost with the thread
            self._found.append(f"checkpoint {self.ckpt_dir}: cannot verify: {type(err).__name__}: {err}")

    def finish(self) -> None:
        if self._thread is None:
            return
        self._thread.join()
        problems = sorted(p for found in _all_gather(self._found) for p in found)
        if problems:
            raise ChecksumError(summarize(problems, self.ckpt_dir))


def verify_checkpoint(ckpt_dir: Path, with_optimizer: bool = True) -> None:
    """Collective: the ranks share the checkpoint's files by bytes and verify every recorded checksum (the
    optimizer's only if it is loaded); every rank raises the same ChecksumError if any fails. Without a
    sidecar: one warning."""
    Verification(ckpt_dir, with_optimizer).finish()
