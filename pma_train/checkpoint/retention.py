"""Which checkpoints to delete: keep the latest, the last few, and the grid future merges need.

Only called after a newer checkpoint has been published, so a deletion never leaves a run
without a complete checkpoint to resume from.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pma_train.checkpoint import layout, readers

log = logging.getLogger(__name__)


def to_keep(iterations: list[int], keep_last: int, grid_every: int | None, grid_last: int | None,
            protected: set[int] = frozenset()) -> set[int]:
    if not iterations:
        return set()
    keep = {iterations[-1]} | set(iterations[-keep_last:] if keep_last > 0 else []) | (set(iterations) & set(protected))
    if grid_every:
        grid = [i for i in iterations if i % grid_every == 0]
        keep |= set(grid if grid_last is None else grid[-grid_last:])
    return keep


def prune(root: Path, keep_last: int, grid_every: int | None, grid_last: int | None,
          protected: set[int] = frozenset()) -> list[int]:
    """Delete published checkpoints of root that are not kept; returns the deleted iterations.

    A checkpoint another job is reading (checkpoint/readers.py) is skipped, with a logged line, and
    pruned by a later call."""
    root = Path(root)
    iterations = layout.list_iterations(root)
    latest = layout.read_tracker(root)
    keep = to_keep(iterations, keep_last, grid_every, grid_last, protected | ({latest} if latest is not None else set()))
    deleted = []
    for iteration in iterations:
        if iteration in keep:
            continue
        path = root / layout.iter_dir_name(iteration)
        with readers.deleting(root, iteration) as free:
            if not free:
                log.warning("retention: keeping %s for now: another job is reading it (%s/%s); a later save "
                            "deletes it", path, root, readers.READERS_FILE)
                continue
            # Rename first: a half-deleted directory must never look like a checkpoint.
            doomed = path.with_name(f"{layout.TMP_PREFIX}deleted-{path.name}")
            path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(iteration)
    return deleted
