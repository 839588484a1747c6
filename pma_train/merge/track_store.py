"""Where the merge tracker (merge/track.py) keeps its snapshots and, while the merge is evaluated, the
live weights: `track.storage`.

An item is this rank's share of every replica set (a FlatShare each), one flat tensor per set, written
from the model's parameters and read back in blocks of elements [lo, hi).

- host: the items are host tensors: n x share x bytes per element, plus the live share while the
  merge is evaluated.
- disk: one file per item, in this rank's own directory, written and read one block of at most
  `block_bytes` at a time: the host memory is that block, whatever the model size and n; the disk
  holds n x share x bytes (plus the live share during an evaluation). A file is written as
  `<name>.tmp` and renamed when complete, and the window (which files hold which snapshot) lives
  in this process only: a merge reads only files this process finished writing, never a torn one
  or one left by an earlier process. A restarted run rebuilds its window from the grid checkpoints
  (train/tracking.py), and a store deletes what an earlier process left in its directory before it
  writes anything; the directory's lock (checkpoint/lock.py) keeps two jobs out of one directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch

from pma_train.checkpoint.lock import Owner, acquire

# Files a store writes: `it<iteration>.bin` (a snapshot), `live.bin`, and their temporaries.
_OWN_FILE = re.compile(r"(it\d+|live)\.bin(\.tmp)?")


class TrackStorageError(RuntimeError):
    """A snapshot file is not what this process wrote."""


class HostStore:
    """Items as host tensors."""

    def __init__(self):
        self.items: dict[str, list[torch.Tensor]] = {}

    def put(self, key: str, shares, dtypes: list[torch.dtype], replacing: Optional[str] = None) -> None:
        """Copy this rank's shares of the parameters into item `key` (in `dtypes`), taking over the
        buffers of item `replacing` (removed): never one more item's memory than the window needs."""
        old = self.items.pop(replacing) if replacing is not None else None
        if old is None or [b.dtype for b in old] != dtypes:
            old = [torch.zeros(share.share, dtype=dtype) for share, dtype in zip(shares, dtypes)]
        for share, buffer in zip(shares, old):
            share.read(share.start, share.start + share.share, buffer)
        self.items[key] = old

    def block(self, key: str, index: int, lo: int, hi: int) -> torch.Tensor:
        return self.items[key][index][lo:hi]

    def release(self) -> None:
        pass

    def remove(self, key: str) -> None:
        del self.items[key]

    def host_bytes(self) -> int:
        return sum(buffer.nbytes for buffers in self.items.values() for buffer in buffers)

    def disk_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self.items.clear()


class DiskStore:
    """Items as files in `directory` (this rank's alone), moved through blocks of `block_bytes`."""

    def __init__(self, directory: str | Path, block_bytes: int, force_unlock: bool = False):
        self.dir, self.block_bytes = Path(directory), block_bytes
        # One process per directory (two jobs given one track.dir): checkpoint/lock.py's lock, whose
        # refusal names the holder; LockError otherwise.
        self._lock = acquire(self.dir, Owner.this_process(), force_unlock, "checkpoint.force_unlock=true")
        for path in self.dir.iterdir():  # an earlier process's files: never part of this window
            if _OWN_FILE.fullmatch(path.name):
                path.unlink()
        # key -> (byte offset, dtype) of each share in its file
        self.items: dict[str, list[tuple[int, torch.dtype]]] = {}
        self._sizes: dict[str, int] = {}
        self._read: Optional[torch.Tensor] = None  # block()'s buffer, until release()

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.bin"

    @torch.no_grad()
    def put(self, key: str, shares, dtypes: list[torch.dtype], replacing: Optional[str] = None) -> None:
        """Write this rank's shares of the parameters to item `key`'s file, after removing `replacing`'s
        (the disk never holds more items than the window, plus the live one)."""
        if replacing is not None:
            self.remove(replacing)
        path = self._path(key)
        tmp = path.with_name(path.name + ".tmp")
        places, offset = [], 0
        with open(tmp, "wb") as f:
            for share, dtype in zip(shares, dtypes):
                step = max(1, self.block_bytes // dtype.itemsize)
                buffer = torch.empty(min(step, share.share), dtype=dtype)
                for lo in range(0, share.share, step):
                    hi = min(lo + step, share.share)
                    piece = buffer[:hi - lo].zero_()  # the last share's padding is zeros, as on the host
                    share.read(share.start + lo, share.start + hi, piece)
                    f.write(piece.view(torch.uint8).numpy())
                places.append((offset, dtype))
                offset += share.share * dtype.itemsize
        os.replace(tmp, path)  # complete, or not there at all
        self.items[key], self._sizes[key] = places, offset

    def block(self, key: str, index: int, lo: int, hi: int) -> torch.Tensor:
        """Elements lo..hi of the item's share `index`, in one buffer reused by the next call (read
        before asking for another) and kept until release()."""
        offset, dtype = self.items[key][index]
        size = (hi - lo) * dtype.itemsize
        if self._read is None or self._read.numel() < size:
            self._read = torch.empty(size, dtype=torch.uint8)
        out = self._read[:size].view(dtype)
        view = memoryview(self._read[:size].numpy())
        with open(self._path(key), "rb", buffering=0) as f:
            f.seek(offset + lo * dtype.itemsize)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise TrackStorageError(f"{self._path(key)} ends before byte {offset + lo * dtype.itemsize + len(view)}: "
                                            "changed by another process?")
                done += got
        return out

    def remove(self, key: str) -> None:
        del self.items[key], self._sizes[key]
        self._path(key).unlink()

    def release(self) -> None:
        """Free block()'s buffer (after an evaluation: none is held while training)."""
        self._read = None

    def host_bytes(self) -> int:
        return 0

    def disk_bytes(self) -> int:
        return sum(self._sizes.values())

    def close(self) -> None:
        """Delete the items' files and give the directory up."""
        for key in list(self.items):
            self.remove(key)
        self.release()
        self._lock.release()


def open_store(storage: str, directory: Optional[str | Path], block_bytes: int, force_unlock: bool = False):
    """The store `track.storage` names (disk: in `directory`)."""
    if storage == "host":
        return HostStore()
    if storage == "disk":
        if directory is None:
            raise ValueError("track.storage=disk needs a directory")
        return DiskStore(directory, block_bytes, force_unlock)
    raise ValueError(f"track.storage: '{storage}' is not one of host, disk")
