"""A DeepSpeed checkpoint given where a pma-train (torch_dist) checkpoint is read.

`checkpoint.init_from` and pma-export accept one: every rank of the job converts its share of it with
`pma-merge output_format=torch_dist`'s code (to_torch_dist.py: one input, weight 1, the fp32 master
weights, no process holding more than a row block) into a hidden torch_dist root in a directory the
user controls, the job reads that as any pma-train checkpoint, and the root is removed afterwards,
also on failure. `checkpoint.load` refuses one: it resumes an optimizer state, which does not carry
over from DeepSpeed's partitions.

Module level: filesystem only (pma-train's CLI imports it before anything heavy); torch and the
conversion are imported by the functions that need them.
"""

from __future__ import annotations

import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pma_train.checkpoint import layout
from pma_train.checkpoint.layout import CheckpointError
from pma_train.merge.ds.layout import is_ds_root, is_ds_tag

# <parent>/<PREFIX><name>.<token>: the converted root of one job (hidden; its own prefix, so no other
# tool's clean-up of its temporaries takes it).
PREFIX = ".pma-deepspeed-"


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed tag directory or root (and not a pma-train root that happens to hold one)."""
    path = Path(path)
    if not path.is_dir() or layout.is_checkpoint_dir(path) or layout.list_iterations(path):
        return False
    return is_ds_tag(path) or is_ds_root(path)


def deepspeed_refusal(path: str | Path, option: str) -> str | None:
    """The error for `option=path` where a DeepSpeed checkpoint cannot be read (checkpoint.load, a library
    call of pma-export's prepare), else None."""
    if not is_deepspeed_checkpoint(path):
        return None
    if option == "checkpoint.load":
        return (f"checkpoint.load: {path} is a DeepSpeed checkpoint; checkpoint.load resumes an optimizer state, "
                "which does not carry over from DeepSpeed's partitions: start from its weights with "
                f"checkpoint.init_from={path} (converted on the fly), or convert it once with pma-merge "
                f"inputs=[{path}] output_format=torch_dist output=<dir>")
    return (f"{option}: {path} is a DeepSpeed checkpoint; convert it (or a merge of several) into a pma-train "
            f"checkpoint first: pma-merge inputs=[{path}] output_format=torch_dist output=<dir>, "
            f"then {option}=<dir>")


def check_convertible(path: str | Path, option: str) -> dict[str, tuple[int, ...]]:
    """Before any process group: the DeepSpeed checkpoint is complete, its pickles are safe, and every
    parameter is one of pma-train's model (the conversion's own checks, which name the parameter).
    Returns the torch_dist keys its conversion writes, with their global shapes. Reads the files'
    indexes only (no tensor data)."""
    from pma_train.merge.ds.params import locate
    from pma_train.merge.ds.plan import DsPlanError, plan
    from pma_train.merge.select import describe, verify_deepspeed

    try:
        info = describe(path)
        verify_deepspeed(info)
        return {param.key: tuple(param.global_shape) for param in locate(plan([info.path]))}
    except (CheckpointError, DsPlanError) as err:
        raise CheckpointError(f"{option}: {err}") from None


@dataclass
class Conversion:
    source: Path  # the DeepSpeed tag directory
    root: Path  # the temporary torch_dist root (its latest: the converted checkpoint)
    seconds: float
    bytes_read: int
    bytes_written: int
    ranks: int
    rss_growth: int  # the busiest rank's peak RSS above its start while converting: within the budget

    def describe(self, option: str) -> str:
        return (f"{option}: converted the DeepSpeed checkpoint {self.source} into {self.root} (temporary, removed "
                f"afterwards) in {self.seconds:.2f} s on {self.ranks} rank(s): {self.bytes_read:,} bytes read, "
                f"{self.bytes_written:,} written, peak RSS +{self.rss_growth / 2**20:.0f} MiB on the busiest rank")


@contextmanager
def converted(path: str | Path, parent: Path, name: str, option: str,
              budget_bytes: int = 256 * 2**20) -> Iterator[Conversion]:
    """On every rank of the default process group: the DeepSpeed checkpoint at `path` converted into
    `<parent>/<PREFIX><name>.<token>/` (each rank its share of the row blocks, within budget_bytes), for
    the body to read; rank 0 removes it when the body is done or anything fails. A failed conversion
    raises CheckpointError naming `option`, on every rank alike."""
    import torch.distributed as dist

    from pma_train.merge.ds.to_torch_dist import run_ds_to_torch_dist
    from pma_train.merge.engine import MergeError, MergeRequest
    from pma_train.merge.select import describe

    rank0 = dist.get_rank() == 0
    token = [uuid.uuid4().hex[:8] if rank0 else None]
    dist.broadcast_object_list(token, src=0)
    root = Path(parent) / f"{PREFIX}{name}.{token[0]}"
    done = False
    try:
        start = time.perf_counter()
        try:
            info = describe(path)
            summary = run_ds_to_torch_dist(MergeRequest(inputs=[info], weights=[1.0], output_root=root,
                                                        budget_bytes=budget_bytes, progress=False))
        except MergeError as err:  # raised on every rank alike (the conversion reports collectively)
            raise CheckpointError(f"{option}: {path}: {err}") from None
        yield Conversion(info.path, root, time.perf_counter() - start, summary.bytes_read, summary.bytes_written,
                         summary.ranks, summary.peak_rss_above_start_bytes)
        done = True
    finally:
        if done:
            dist.barrier()  # every rank has read its share before it goes
        if rank0:
            shutil.rmtree(root, ignore_errors=True)


def remove_leftovers(parent: Path, name: str) -> None:
    """Converted roots of killed jobs under `parent`; only for a caller holding parent's lock (no live
    job of the same name converts there meanwhile)."""
    parent = Path(parent)
    if parent.is_dir():
        for path in parent.glob(f"{PREFIX}{name}.*"):
            shutil.rmtree(path, ignore_errors=True)
