"""The merge tracked during training: PMA of the last n grid checkpoints, sharded like the model.

A rank's parameters are identical on every rank of its data-parallel replica group (megatron's DDP
all-reduces dense gradients over data x context parallel, expert gradients over expert data
parallel). The tracker sees each group's parameters as one flat vector split evenly across the
group: a rank copies its share only, at the last n grid points, so its snapshots take
n x (model-parallel shard / DP) x (4 bytes, or 2 with track.dtype=bf16, or the parameters' own size
with track.dtype=param), with no gather and no checkpoint reads while training. track.storage says
where (merge/track_store.py): in host memory, or in files on this rank's disk (the same bytes, plus
the live share during an evaluation), moved in blocks of B = track.buffer_mb: then the tracker's host
memory is B (1 + 3 / DP) at most (the all-gather's output, on the device with CUDA, and B / DP each
for the fp32 accumulator, its widening of bf16 snapshots and the block read; plus the collective's
own temporaries), whatever the model size and n.

Evaluating the merge forms it share by share and all-gathers it into the model in chunks of at
most gather_bytes (track.buffer_mb); the live weights come back the same way, from each rank's copy
of its own share (1/DP of the model, not a full clone), kept where the snapshots are. The live run
is untouched.
"""

from __future__ import annotations

from bisect import bisect_right
from contextlib import contextmanager
from functools import partial
from itertools import accumulate
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from pma_train.merge.track_store import HostStore
from pma_train.merge.weights import merge_weights

GATHER_BYTES = 64 << 20  # one all-gather's output: the transient buffer, whatever the model size
# Snapshot precision; "param": the parameters' own (lossless: bf16 parameters of mixed precision stay bf16).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "param": None}


class FlatShare:
    """One replica group's parameters as a flat vector; this rank owns [start, start + share)."""

    def __init__(self, params: list[torch.nn.Parameter], group: Optional[dist.ProcessGroup]):
        self.params, self.group = params, group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.offsets = list(accumulate((p.numel() for p in params), initial=0))
        self.numel = self.offsets[-1]
        self.share = -(-self.numel // self.size)  # the last rank's share is padded to this length
        self.start = (0 if group is None else dist.get_rank(group)) * self.share
        self.device = params[0].device
        dtypes = {p.dtype for p in params}
        # Holds any parameter's value exactly (bf16 / fp16 / fp32 all fit in fp32).
        self.param_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32

    def _segments(self, lo: int, hi: int) -> Iterator[tuple[torch.Tensor, int]]:
        """(flat view of a parameter's elements, the flat position of its first) covering [lo, hi)."""
        hi = min(hi, self.numel)
        index = bisect_right(self.offsets, lo) - 1
        while lo < hi:
            begin, end = self.offsets[index], self.offsets[index + 1]
            stop = min(end, hi)
            if stop > lo:
                yield self.params[index].detach().view(-1)[lo - begin:stop - begin], lo
            lo, index = max(lo, stop), index + 1

    def read(self, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """out[i] = flat[lo + i] (elements past the end are left as they are)."""
        for view, at in self._segments(lo, hi):
            out[at - lo:at - lo + view.numel()].copy_(view)
        return out

    def write(self, lo: int, hi: int, values: torch.Tensor) -> None:
        for view, at in self._segments(lo, hi):
            view.copy_(values[at - lo:at - lo + view.numel()])

    @torch.no_grad()
    def gather_into_params(self, local: Callable[[int, int], torch.Tensor], dtype: torch.dtype,
                           gather_bytes: int = GATHER_BYTES) -> None:
        """Every rank's local(lo, hi) (its share's elements lo..hi) written into the parameters,
        one bounded all-gather at a time."""
        step = max(1, gather_bytes // (self.size * dtype.itemsize))
        out = torch.empty(self.size * min(step, self.share), dtype=dtype, device=self.device)
        for lo in range(0, self.share, step):
            hi = min(lo + step, self.share)
            piece = local(lo, hi).to(self.device, dtype)
            gathered = out[:self.size * (hi - lo)]
            if self.group is None:
                gathered.copy_(piece)
            else:
                dist.all_gather_single(gathered, piece, group=self.group)
            for rank, part in enumerate(gathered.view(self.size, hi - lo)):
                self.write(rank * self.share + lo, rank * self.share + hi, part)
            del piece  # not alive while local() forms the next one


def replica_sets(model_chunks: list[torch.nn.Module]) -> list[tuple[list[torch.nn.Parameter], Optional[dist.ProcessGroup]]]:
    """A model's parameters grouped by the ranks that hold identical copies of them (the groups
    megatron's DDP wrapper reduces their gradients over; none, i.e. unsharded, without DDP)."""
    dense = [p for chunk in model_chunks for p in chunk.parameters() if getattr(p, "allreduce", True)]
    expert = [p for chunk in model_chunks for p in chunk.parameters() if not getattr(p, "allreduce", True)]
    first = model_chunks[0]
    return [(dense, getattr(first, "dp_cp_group", None)), (expert, getattr(first, "expt_dp_group", None))]


class MergeTracker:
    def __init__(self, replicas: list[tuple[list[torch.nn.Parameter], Optional[dist.ProcessGroup]]], n: int,
                 method: str, alpha: float, decay_shape: str = "linear", dtype: str = "fp32",
                 gather_bytes: int = GATHER_BYTES, store=None):
        self.shares = [FlatShare(params, group) for params, group in replicas if params]
        self.n, self.method, self.alpha, self.decay_shape = n, method, alpha, decay_shape
        self.dtype, self.gather_bytes = DTYPES[dtype], gather_bytes
        self.store = HostStore() if store is None else store  # merge/track_store.py
        self.window: list[int] = []  # grid iterations, oldest first: the store's items it<iteration>

    @classmethod
    def for_model(cls, model_chunks: list[torch.nn.Module], track, store) -> "MergeTracker":
        """The tracker a run's `track` config asks for, over its (DDP-wrapped) model chunks."""
        return cls(replica_sets(model_chunks), track.n, track.method, track.alpha, track.decay_shape, track.dtype,
                   track.buffer_mb << 20, store)

    @staticmethod
    def _key(iteration: int) -> str:
        return f"it{iteration:010d}"

    @torch.no_grad()
    def add(self, iteration: int) -> None:
        """Record this rank's shares at a grid point (called when the grid checkpoint is taken)."""
        # A full window's oldest makes room first: never n + 1 snapshots at once.
        oldest = self.window.pop(0) if len(self.window) == self.n else None
        dtypes = [self.dtype or share.param_dtype for share in self.shares]
        self.store.put(self._key(iteration), self.shares, dtypes,
                       replacing=None if oldest is None else self._key(oldest))
        self.window.append(iteration)

    def drop_after(self, iteration: int) -> None:
        """Forget snapshots past `iteration` (a spike recovery undid the steps that made them)."""
        while self.window and self.window[-1] > iteration:
            self.store.remove(self._key(self.window.pop()))

    @property
    def ready(self) -> bool:
        return len(self.window) == self.n

    @property
    def iterations(self) -> list[int]:
        return list(self.window)

    def weights(self) -> list[float]:
        return merge_weights(self.method, len(self.window), self.alpha, decay_shape=self.decay_shape)

    def snapshot_bytes(self) -> int:
        """Host memory this rank's snapshots take (0 with track.storage=disk)."""
        return self.store.host_bytes()

    def disk_bytes(self) -> int:
        """Disk space this rank's snapshots take (0 with track.storage=host)."""
        return self.store.disk_bytes()

    def close(self) -> None:
        """Forget the window and free what it held (its files, with track.storage=disk)."""
        self.window.clear()
        self.store.close()

    def _merged(self, index: int, weights: list[float], work: dict, lo: int, hi: int) -> torch.Tensor:
        """Elements lo..hi of this rank's share of replica set `index`, merged in fp32. The result and
        the buffers are `work`'s, reused from one block to the next (each is consumed before the next
        is asked for): no allocator churn, so the host memory is these buffers and no more."""
        acc = _reused(work, "acc", hi - lo).zero_()
        for weight, iteration in zip(weights, self.window):
            block = self.store.block(self._key(iteration), index, lo, hi)
            if block.dtype != torch.float32:  # what add_ would widen it to
                block = _reused(work, "widened", hi - lo).copy_(block)
            acc.add_(block, alpha=weight)
        return acc

    @contextmanager
    @torch.no_grad()
    def _live_kept(self):
        """The model's weights inside the block are the block's business; after it, they are the
        live ones again (each rank keeps its own share where the snapshots are, and the group
        re-gathers them)."""
        self.store.put("live", self.shares, [share.param_dtype for share in self.shares])
        try:
            yield
        finally:
            for index, share in enumerate(self.shares):
                share.gather_into_params(partial(self.store.block, "live", index), share.param_dtype,
                                         self.gather_bytes)
            self.store.remove("live")
            self.store.release()

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The model holds the merged weights inside the block, its live weights after."""
        weights, work = self.weights(), {}
        with self._live_kept():
            for index, share in enumerate(self.shares):
                share.gather_into_params(partial(self._merged, index, weights, work), torch.float32,
                                         self.gather_bytes)
            work.clear()
            yield

    @contextmanager
    @torch.no_grad()
    def holding(self, load: Callable[[], None]):
        """The model holds what load() puts into it inside the block, its live weights after."""
        with self._live_kept():
            load()
            yield

    def loaded(self, model_chunks, ckpt_dir):
        """The model holds a checkpoint's weights inside the block (each rank reads its shards)."""
        from pma_train.checkpoint.state import load_checkpoint

        return self.holding(partial(load_checkpoint, ckpt_dir, model_chunks))


def _reused(work: dict, name: str, numel: int) -> torch.Tensor:
    """work[name]'s first numel fp32 elements (allocated on first use, or grown)."""
    buffer = work.get(name)
    if buffer is None or buffer.numel() < numel:
        buffer = work[name] = torch.empty(numel, dtype=torch.float32)
    return buffer[:numel]
