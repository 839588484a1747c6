"""Reader leases: retention never deletes a checkpoint that another job is reading.

A job reading checkpoints of a root (pma-merge, pma-eval, pma-export, init_from, PMA-init) holds a
shared POSIX byte-range lock (`fcntl.lockf`) on `<root>/.pma-readers`, one byte per iteration at
offset = iteration, for as long as it reads. Retention takes an exclusive non-blocking lock on a
byte before deleting that iteration, and skips the checkpoint while a reader holds it (a later
save prunes it). The locks are the kernel's: a killed reader's lease goes with its process. They
reach as far as the root lock's flock does (NFS: across hosts; host-local flock/lockf mounts: this
host only).

POSIX locks belong to the process, not the descriptor, and a process loses all of them on a file
when it closes *any* descriptor of that file: so each process opens each root's readers file once
and keeps it open, and leases of one iteration taken twice in one process are counted here (the
kernel would merge them, and the first release would drop both). A forked child inherits no lock:
it opens the file again. Retention in a process that itself reads (a training run's tracked merge)
consults the counts, since a process never conflicts with its own locks.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pma_train.checkpoint import layout

READERS_FILE = ".pma-readers"
log = logging.getLogger(__name__)

_mutex = threading.Lock()
_files: dict[Path, tuple[int, int]] = {}  # root -> (the process that opened it, its descriptor)
_held: Counter = Counter()  # (root, iteration) -> leases this process holds


def _fd(root: Path, create: bool) -> int | None:
    """This process's one descriptor of root's readers file (None where it cannot be opened)."""
    pid = os.getpid()
    known = _files.get(root)
    if known is not None and known[0] == pid:
        return known[1]
    if known is not None:  # inherited across fork: no locks came with it
        _files.clear()
        _held.clear()
    for flags in ((os.O_RDWR | os.O_CREAT) if create else os.O_RDWR, os.O_RDONLY):
        try:
            fd = os.open(root / READERS_FILE, flags, 0o644)
        except OSError:
            continue
        _files[root] = (pid, fd)
        return fd
    return None


@contextmanager
def reading(checkpoints: Iterable[str | Path],
            iteration_of: Callable[[Path], int | None] = layout.iteration_of) -> Iterator[None]:
    """Hold a lease on each iter_* directory in `checkpoints` (others, e.g. exports, are left as they are);
    `iteration_of` reads the iteration from another layout's names (a DeepSpeed tag's global step)."""
    keys = []
    for ckpt in checkpoints:
        iteration = iteration_of(Path(ckpt))
        if iteration is not None:
            keys.append((Path(ckpt).resolve().parent, iteration))
    taken = []
    try:
        for key in keys:
            if _take(*key):
                taken.append(key)
        yield
    finally:
        for key in reversed(taken):
            _release(*key)


def _take(root: Path, iteration: int) -> bool:
    with _mutex:
        fd = _fd(root, create=True)
        if fd is None:  # a read-only root: nobody can prune it while it stays read-only
            log.debug("%s: cannot open %s: reading iteration %d without a lease", root, READERS_FILE, iteration)
            return False
        if _held[(root, iteration)] == 0:
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH, 1, iteration)
            except OSError as err:
                log.debug("%s: no lease on iteration %d (%s)", root, iteration, errno.errorcode.get(err.errno, err))
                return False
        _held[(root, iteration)] += 1
        return True


def _release(root: Path, iteration: int) -> None:
    with _mutex:
        _held[(root, iteration)] -= 1
        if _held[(root, iteration)] == 0:
            del _held[(root, iteration)]
            fd = _fd(root, create=False)
            if fd is not None:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, iteration)


@contextmanager
def deleting(root: Path, iteration: int) -> Iterator[bool]:
    """Yields whether iteration may be deleted now: no reader holds it, and none can start until the
    block ends (then the directory is gone). Where no lease can be taken (no readers file, no
    POSIX locks), deletion goes ahead as before leases existed."""
    root = Path(root).resolve()
    with _mutex:
        if _held[(root, iteration)]:
            yield False
            return
        fd = _fd(root, create=False)
        if fd is None:  # no reader ever leased here (one starting now finds the directory gone)
            yield True
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, iteration)
        except (BlockingIOError, PermissionError):
            yield False
            return
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EBADF):  # EBADF: opened read-only, cannot tell
                yield False
                return
            yield True  # no POSIX locks on this file system
            return
        try:
            yield True
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, iteration)
