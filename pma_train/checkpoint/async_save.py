"""Asynchronous checkpoint writes: megatron-core's AsyncRequest, written in the background, published later.

`dist_checkpointing.save(..., async_sharded_save=True)` plans the save and returns an AsyncRequest: a
write function over this rank's write buckets, and finalize functions (`.metadata`, `metadata.json`)
that must run on every rank once every rank's write is done. Here the request's tensors are first
copied to host memory (`stage`), so the steps that follow cannot change what is written; the write
then runs on a background thread, and the finalize functions plus pma-train's own publish step
(checksums, sidecar, rename into place, `latest`, retention) run at a later `maybe_finalize`, on
every rank at the same step, only after all ranks report their write done.

Why not megatron's AsyncCallsQueue: its completion check and finalize all-reduce CUDA tensors and it
calls torch.cuda.synchronize, so it cannot run on CPU / gloo; and megatron's staging (`preload_tensors`:
`tensor.to("cpu")`) aliases CPU tensors instead of copying them.

One save is in flight per process at most: megatron's writer returns its results through a
process-wide queue, so any other save (synchronous or not) first finishes the one in flight (`wait`).
Host memory while in flight: one copy of this rank's written tensors (its model shard's main
replica and its optimizer shard; shrinks with TP / PP, and the optimizer part with DP).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

from pma_train.checkpoint.layout import CheckpointError


@dataclass
class _Pending:
    thread: threading.Thread
    request: AsyncRequest
    publish: Callable[[Callable[[], None]], None]  # given the write's completion, publishes on every rank
    then: list[Callable[[], None]] = field(default_factory=list)
    error: BaseException | None = None


_pending: _Pending | None = None


def in_flight() -> bool:
    return _pending is not None


def start(request: AsyncRequest, publish: Callable[[Callable[[], None]], None]) -> None:
    """Stage the request's tensors into host memory and start writing them; call on every rank.

    `publish(complete)` runs at finalization on every rank: `complete()` raises if any rank's write
    failed, else runs megatron's finalize functions; then `publish` makes the checkpoint visible."""
    global _pending
    wait()
    args = list(request.async_fn_args)
    if request.async_fn is not None and request.preload_fn is not None:
        args[1] = stage(args[1])
    pending = _Pending(threading.Thread(target=lambda: None), request, publish)

    def write() -> None:
        try:
            if request.async_fn is not None:
                request.async_fn(*args, **request.async_fn_kwargs)
        except BaseException as err:  # reported to every rank at finalization, not lost with the thread
            pending.error = err

    pending.thread = threading.Thread(target=write, name="pma-async-checkpoint", daemon=True)
    pending.thread.start()
    _pending = pending


def stage(write_buckets: list) -> list:
    """The write buckets with every tensor copied to host memory (always a copy, also on CPU)."""
    staged = []
    for file_name, storage_key, (bytes_data, tensor_data) in write_buckets:
        copies = [(item, tensor.detach().to("cpu", copy=True)) for item, tensor in tensor_data]
        staged.append((file_name, storage_key, (bytes_data, copies)))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return staged


def after_current(fn: Callable[[], None]) -> None:
    """Run fn on every rank once the save in flight is published (now, if none is)."""
    if _pending is None:
        fn()
    else:
        _pending.then.append(fn)


def maybe_finalize(blocking: bool = False) -> bool:
    """Publish the save in flight if every rank has written its part (or wait for it: blocking).
    Call on every rank at the same point; True when a save was published."""
    global _pending
    if _pending is None:  # saves are collective: every rank agrees on this
        return False
    if blocking:
        _pending.thread.join()
    flags = torch.tensor([int(_pending.thread.is_alive()), int(_pending.error is not None)],
                         dtype=torch.int64, device=_flag_device())
    dist.all_reduce(flags)
    not_done, failed = (int(v) for v in flags.tolist())
    if not_done:
        return False
    pending, _pending = _pending, None
    pending.thread.join()
    pending.publish(lambda: _complete(pending, failed))
    for fn in pending.then:
        fn()
    return True


def wait() -> None:
    """Finish (write and publish) the save in flight, if any; on every rank."""
    maybe_finalize(blocking=True)


def _complete(pending: _Pending, ranks_failed: int) -> None:
    if ranks_failed:
        own = f"{type(pending.error).__name__}: {pending.error}" if pending.error is not None else "on another rank"
        raise CheckpointError(f"asynchronous checkpoint write failed on {ranks_failed} rank(s): {own}") from pending.error
    for fn in pending.request.finalize_fns:
        fn()


def _flag_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
