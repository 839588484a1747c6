"""Room for a checkpoint: free space checked before a save, a full disk named when a write hits it.

A save needs about as much room as the previous checkpoint of the root (the same tensors again;
old ones are pruned only after the new one is published); the first save's need is estimated
from the tensor bytes of the state dict. torch reports a full disk in the middle of a save as
`[enforce fail at inline_container.cc:...] unexpected pos` (a short write in its zip writer), or
an OSError with errno ENOSPC / EDQUOT, often wrapped in a CheckpointException of another rank.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from pma_train.checkpoint import layout
from pma_train.checkpoint.layout import CheckpointError

# Sizes vary a little between saves (pickled metadata, args, RNG states); never cut it this fine.
HEADROOM = 1.05
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "unexpected pos")


class DiskFullError(CheckpointError):
    """No room for a checkpoint on its file system; the message names the path, free space and need."""


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def state_dict_bytes(state: dict) -> int:
    """Bytes of the tensors this rank writes (main replicas only: the others are not saved)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    total = 0
    for value in nested_values(state):
        data = getattr(value, "data", None)
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and data is not None \
                and is_main_replica(value.replica_id):
            total += data.numel() * data.element_size()
    return total


def expected_need(root: Path, estimate_bytes: int) -> tuple[int, str]:
    """(bytes a save into root needs, what that figure is based on)."""
    latest = layout.read_tracker(root) if Path(root).is_dir() else None
    previous = Path(root) / layout.iter_dir_name(latest) if latest is not None else None
    if previous is not None and previous.is_dir():
        return int(directory_bytes(previous) * HEADROOM), f"the size of {previous.name}"
    return int(estimate_bytes * HEADROOM), "the tensor bytes of the state dict"


def check_room(root: Path, need: int, basis: str, field: str = "checkpoint.dir",
               skip: str = "checkpoint.check_free_space=false skips this check") -> None:
    """Raise DiskFullError before a save into root that cannot fit (need: from expected_need)."""
    free = shutil.disk_usage(root).free
    if free < need:
        raise DiskFullError(f"{field}: {root} has {gib(free)} free, a checkpoint needs about {gib(need)} "
                            f"({basis}); nothing was written: free space or save elsewhere ({skip})")


def is_disk_full(err: BaseException) -> bool:
    """Whether err (or anything it wraps, on any rank) is a write that found the disk or quota full."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, tuple):  # torch's wrapped exception: (exception, traceback)
            stack += [x for x in e if isinstance(x, BaseException)]
            continue
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(text in str(e) for text in _FULL_TEXTS):
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch DCP's CheckpointException: {rank: wrapped exception}
        if isinstance(failures, dict):
            stack += list(failures.values())
    return False


def disk_full_message(err: BaseException, target: Path, root: Path, need: int | None = None) -> str | None:
    """One line for a failed write of `target` (removed by the caller) that found the disk full; None when
    it failed for another reason. megatron's writer threads keep only the type of their error, so a
    file system that cannot hold `need` bytes even now, with the partial output gone, counts as full."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    short = need is not None and free is not None and free < need
    if not (short or is_disk_full(err)):
        return None
    room = f"{gib(free)} free" if free is not None else "free space unknown"
    wanted = f", a checkpoint needs about {gib(need)}" if need is not None else ""
    try:
        latest = layout.read_tracker(root)
    except CheckpointError:
        latest = None
    kept = f"; {layout.TRACKER_FILE} still names iteration {latest}" if latest is not None else ""
    return (f"disk full (no space left on device, or quota exceeded) while writing {target} ({room} on the "
            f"file system of {root}{wanted}); the partial output is removed{kept}")
