"""One writer per checkpoint root: an exclusive lock held for the whole job.

Two jobs writing one root destroy each other's work (the second deletes the first's in-flight
temporary when it starts, then replaces its checkpoints), so the root's single writer (training's
global rank 0, a merge's rank 0) holds `<root>/.pma-lock` from before it touches the root until
it exits.

The lock itself is the kernel's: `fcntl.flock` on the open file, so a killed job's lock is
released with its process and a rerun takes it over. The file's JSON names the owner (host, pid,
run id, command, start time) for the error message, and settles what flock cannot:
- a record left by a job on this host: that job is gone (flock was free), taken over with a note;
- a record from another host: where flock is host-local (Lustre `localflock`, NFS
  `local_lock=flock`, BeeGFS by default) a free flock proves nothing about another host, so the
  job refuses and says how to take over (the force override, or deleting the file), unless it is
  a requeue of the same Slurm job (same SLURM_JOB_ID: its predecessor no longer runs);
- file systems without flock (ENOLCK / EOPNOTSUPP / ENOSYS, e.g. Lustre mounted without `flock`):
  the record alone decides, created with O_EXCL, a same-host owner judged by whether its pid lives.
On NFS, flock is emulated with POSIX locks, which a process drops when it closes *any* descriptor
of the file: the holder never opens the lock file again while it holds it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".pma-lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# Without flock an empty record may be a job between creating the file and writing it.
_FRESH_EMPTY_S = 30.0


class LockError(RuntimeError):
    """The checkpoint root is (or may be) written by another job; the message names it."""


@dataclass
class Owner:
    host: str
    pid: int
    run_id: str
    command: str
    started: str  # ISO 8601, UTC
    slurm_job_id: str | None = None

    @classmethod
    def this_process(cls, run_id: str | None = None) -> "Owner":
        slurm = os.environ.get("SLURM_JOB_ID")
        run_id = run_id or (f"slurm-{slurm}" if slurm else uuid.uuid4().hex[:12])
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?"
        return cls(host=socket.gethostname(), pid=os.getpid(), run_id=run_id, command=command,
                   started=datetime.now(timezone.utc).isoformat(timespec="seconds"), slurm_job_id=slurm)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (run {self.run_id}, since {self.started}: {self.command})"


class RootLock:
    """The held lock; release() (also run at interpreter exit) frees it and removes the file."""

    def __init__(self, root: Path, fd: int, owner: Owner, note: str | None, name: str = LOCK_FILE):
        self.root, self.fd, self.owner, self.note, self.name = root, fd, owner, note, name
        atexit.register(self.release)

    @property
    def path(self) -> Path:
        return self.root / self.name

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            # Unlink while still holding it: a job that opened the old file sees it is gone (_still_linked).
            if _still_linked(self.fd, self.path):
                self.path.unlink()
        except OSError:
            pass  # the kernel lock goes with the fd; a leftover record is judged stale later
        finally:
            os.close(self.fd)
            self.fd = None
            atexit.unregister(self.release)


def acquire(root: str | Path, owner: Owner, force: bool = False, override: str = "force_unlock=true",
            name: str = LOCK_FILE) -> RootLock:
    """Take root's lock for `owner`, or raise LockError naming the job that holds it.

    `override` is how the user spells `force` (named in the message that asks for it); `name` is the
    lock file's (another than .pma-lock for an output published into root by rename, as pma-export's)."""
    root = Path(root)
    path = root / name
    # What the lock protects, for messages: root, or root/<output> for `.pma-lock.<output>`.
    subject = root if name == LOCK_FILE else root / name.removeprefix(f"{LOCK_FILE}.")
    for _ in range(10):  # an owner releasing while we open the file: open the new one
        existed = path.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise LockError(f"cannot create the lock file {path}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            previous = _read_record(fd)
            os.close(fd)
            raise LockError(_in_use(subject, previous)) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_FLOCK:
                raise LockError(f"cannot lock {path}: {err.strerror}") from None
            if not existed:
                path.unlink(missing_ok=True)
            return _acquire_by_record(root, owner, force, override, name)
        if not _still_linked(fd, path):
            os.close(fd)
            continue
        try:
            note = _judge(root, _read_record(fd), owner, force, override, flock=True, path=path)
            _write_record(fd, owner)
        except BaseException:
            os.close(fd)  # the flock goes with it; the record stays as it was
            raise
        return RootLock(root, fd, owner, note, name)
    raise LockError(f"{path}: the lock changed hands 10 times while this job tried to take it")


def acquire_on_rank0(root: str | Path, force: bool, override: str, tool: str, name: str = LOCK_FILE) -> RootLock | None:
    """acquire() for this process on global rank 0 (a stale lock's takeover printed, as `tool`); every
    rank raises the same LockError if it fails (no rank is left waiting in a collective). Call right
    after the process group starts, before the root is touched."""
    import torch.distributed as dist

    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            lock = acquire(root, Owner.this_process(), force, override, name)
        except LockError as err:
            error = str(err)
        if lock is not None and lock.note:
            print(f"{tool}: {root}: {lock.note}", file=sys.stderr, flush=True)
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise LockError(verdict[0])
    return lock


def _judge(root: Path, previous: Owner | None, owner: Owner, force: bool, override: str, flock: bool,
           path: Path) -> str | None:
    """None for a free root, a note for a stale lock taken over; LockError when it may be in use."""
    if previous is None:
        return None
    taken = f"taking over the lock of {previous.describe()}"
    if previous.host == owner.host:
        if not flock and _pid_alive(previous.pid) and previous.pid != owner.pid and not force:
            raise LockError(_in_use(root, previous))
        return f"{taken}: that process no longer runs"
    if owner.slurm_job_id and previous.slurm_job_id == owner.slurm_job_id:
        return f"{taken}: an earlier run of this Slurm job ({owner.slurm_job_id})"
    if force:
        return f"{taken}: forced ({override})"
    raise LockError(f"{root} is locked by {previous.describe()}, and host {owner.host} cannot tell whether "
                    f"that job still runs; if it does not, rerun with {override} (or delete {path})")


def _acquire_by_record(root: Path, owner: Owner, force: bool, override: str, name: str) -> RootLock:
    """No flock on this file system: the record is the lock (created with O_EXCL, atomic on NFS too)."""
    path, note = root / name, None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            previous = _read_record_at(path)
            if previous is None and _age(path) < _FRESH_EMPTY_S and not force:
                raise LockError(f"{root} is being locked by another job right now ({path} was just created)") from None
            note = _judge(root, previous, owner, force, override, flock=False, path=path) or f"removing an empty lock file {path}"
            path.unlink(missing_ok=True)
            continue
        _write_record(fd, owner)
        return RootLock(root, fd, owner, note, name)
    raise LockError(f"{path}: another job took the lock while this one was taking over a stale one")


def _in_use(root: Path, previous: Owner | None) -> str:
    who = previous.describe() if previous is not None else "another job (its lock file holds no owner yet)"
    return (f"{root} is in use by {who}: one job writes a directory at a time; wait for it to "
            f"finish, or write to another directory")


def _still_linked(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_record(fd: int) -> Owner | None:
    size = os.fstat(fd).st_size
    return _parse(os.pread(fd, size, 0)) if size else None


def _read_record_at(path: Path) -> Owner | None:
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def _parse(data: bytes) -> Owner | None:
    """The owner a lock file names; None for an empty or torn record (its writer died mid-write)."""
    try:
        record = json.loads(data)
        known = {f.name for f in fields(Owner)}
        return Owner(**{k: v for k, v in record.items() if k in known})
    except (ValueError, TypeError, AttributeError):
        return None


def _write_record(fd: int, owner: Owner) -> None:
    data = json.dumps(asdict(owner), indent=1).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
