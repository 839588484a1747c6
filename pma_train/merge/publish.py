"""What every merge engine (torch_dist, DeepSpeed, DeepSpeed -> torch_dist) does around its own work.

A merge's request and errors; reader leases on its inputs; its output root claimed (the lock, a recheck that the output is still
not there, leftovers of killed merges removed, the free-space precheck, a temporary directory of
its own); every rank's failure told to every rank; and the publish: the ranks' reports become the
`MergeSummary`, rank 0 finishes (metadata, provenance, checksums, the atomic rename) and its failure
reaches the other ranks. Each engine hands in the bytes its output will hold and its own `finish`.
"""

from __future__ import annotations

import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch.distributed as dist

from pma_train.checkpoint import layout, readers, space
from pma_train.checkpoint.lock import acquire_on_rank0
from pma_train.merge.ds import layout as ds
from pma_train.merge.select import CheckpointInfo

TMP_PREFIX = layout.TMP_PREFIX + "merge-"
_PER_RANK = ("rank", "bytes_read", "seconds", "pieces", "peak_rss", "rss_growth")


class MergeError(RuntimeError):
    pass


@dataclass
class MergeRequest:
    inputs: list[CheckpointInfo]  # oldest first
    weights: list[float]
    output_root: Path
    method: str = "explicit"
    alpha: float | None = None
    decay_shape: str | None = None
    budget_bytes: int = 256 * 2**20
    accumulate: str = "fp32"
    output_dtype: str = "input"
    carry_optimizer: bool = False
    overwrite: bool = False
    progress: bool = True
    force_unlock: bool = False  # take over a lock another host left on output_root
    check_free_space: bool = True


@dataclass
class MergeSummary:
    output: str
    iteration: int
    bytes_read: int
    bytes_written: int
    seconds: float
    read_gbps: float
    peak_rss_bytes: int  # busiest rank, whole process
    peak_rss_above_start_bytes: int  # busiest rank, growth during the merge
    ranks: int
    pieces: int
    per_rank: list[dict] = field(default_factory=list)


def describe(err: Exception, tmp: Path, root: Path) -> str:
    """One line for a rank's failure while writing tmp: a full disk named as such."""
    return space.disk_full_message(err, tmp, root) or (
        str(err) if isinstance(err, MergeError) else f"{type(err).__name__}: {err}")


def inputs_leased(request: MergeRequest):
    """Reader leases on the inputs for the block: their run's retention leaves them alone meanwhile
    (a DeepSpeed tag's lease is its global step's, in its root; a tag of another name gets none)."""
    deepspeed = request.inputs[-1].format == ds.FORMAT
    return readers.reading([i.path for i in request.inputs], ds.step_of if deepspeed else layout.iteration_of)


@contextmanager
def claimed_output(request: MergeRequest, final: Path, output_bytes: int, basis: str) -> Iterator[Path]:
    """The output root locked on rank 0 for the block (every rank fails alike if it cannot); rank 0, as
    its only writer, removes whatever killed merges or jobs left there and checks that `output_bytes`
    (what `basis` says they are) fit on its file system; yields the temporary directory every rank
    writes into, named for `final`."""
    lock = acquire_on_rank0(request.output_root, request.force_unlock, "force_unlock=true", "pma-merge")
    try:
        refusal = [_refusal(request, final, output_bytes, basis) if lock is not None else None]
        dist.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            raise MergeError(refusal[0])
        token = [uuid.uuid4().hex[:8] if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=0)
        tmp = request.output_root / f"{TMP_PREFIX}{final.name}.{token[0]}"
        if dist.get_rank() == 0:
            tmp.mkdir(parents=True)
        dist.barrier()
        yield tmp
    finally:
        if lock is not None:
            lock.release()


def _refusal(request: MergeRequest, final: Path, output_bytes: int, basis: str) -> str | None:
    if final.exists() and not request.overwrite:  # published by another merge since the engine's checks
        return f"output: {final} exists (pass overwrite=true to replace it)"
    layout.remove_stale_temporaries(request.output_root)
    if request.check_free_space:
        try:
            space.check_room(request.output_root, int(output_bytes * space.HEADROOM), basis, field="output",
                             skip="check_free_space=false skips this check")
        except space.DiskFullError as err:
            return str(err)
    return None


def fail_together(error: str | None, tmp: Path) -> None:
    """Every rank learns of any rank's failure (raised on all, rank 0 having dropped the temporary
    output): no rank is left waiting in a collective for one that stopped."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    _raise_first(errors, tmp)


def _raise_first(errors: list[str | None], tmp: Path) -> None:
    failed = [e for e in errors if e]
    if failed:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise MergeError(failed[0])


def publish(request: MergeRequest, report: dict, final: Path, tmp: Path, pieces: int,
            finish: Callable[[MergeSummary, list[dict]], None]) -> MergeSummary:
    """This rank's report (error, bytes_read, bytes_written, seconds, pieces, peak_rss, rss_growth, and
    whatever `finish` needs) gathered on every rank; any rank's error raised on all; then rank 0 runs
    finish(summary, reports), which publishes tmp as final, and every rank learns whether it did."""
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    _raise_first([r["error"] for r in reports], tmp)
    summary = MergeSummary(
        output=str(final), iteration=request.inputs[-1].iteration,
        bytes_read=sum(r["bytes_read"] for r in reports), bytes_written=sum(r["bytes_written"] for r in reports),
        seconds=max(r["seconds"] for r in reports), read_gbps=0.0,
        peak_rss_bytes=max(r["peak_rss"] for r in reports), peak_rss_above_start_bytes=max(r["rss_growth"] for r in reports),
        ranks=len(reports), pieces=pieces, per_rank=[{k: r[k] for k in _PER_RANK} for r in reports])
    summary.read_gbps = summary.bytes_read / max(summary.seconds, 1e-9) / 1e9
    failure = [None]
    if dist.get_rank() == 0:
        try:
            finish(summary, reports)
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = [describe(err, tmp, request.output_root)]
    # A broadcast, not a barrier: the other ranks learn of a failure on rank 0 instead of waiting.
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise MergeError(failure[0])
    return summary
