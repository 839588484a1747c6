"""Micro-batches read ahead on a background thread, and on CUDA already on the GPU.

A thread keeps up to `depth` micro-batches of a MicroBatchIterator ready, so the training step
does not wait for the dataset (and, on CUDA, for the host-to-device copy). Order is the source's.
`consumed_samples` counts what the consumer took, not what was read ahead: the trainer checkpoints
its own count, and a run resumed from it reads the same samples as an uninterrupted one.

On CUDA a batch is pinned and copied with non_blocking on a side stream; the consumer's stream
waits for that copy (an event) and the tensors are recorded on the consumer's stream, so the caching
allocator does not hand their memory out again while the step still uses them. On CPU the batch is
passed on as read: the same tensors, the same numerics.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Optional

import torch

_END = object()  # the source is exhausted


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _to_device(batch: dict, device: torch.device, stream) -> tuple[dict, object]:
    with torch.cuda.stream(stream):
        moved = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
        ready = torch.cuda.Event()
        ready.record(stream)
    return moved, ready


def _read_ahead(source, ready: queue.Queue, stop: threading.Event, device: Optional[torch.device]) -> None:
    # Module-level, holding no reference to the Prefetcher: it can be collected (and so stopped)
    # while this thread runs.
    stream = None
    if device is not None:
        torch.cuda.set_device(device)
        stream = torch.cuda.Stream(device)
    while not stop.is_set():
        try:
            batch = next(source)
            item = _to_device(batch, device, stream) if stream is not None else (batch, None)
        except StopIteration:
            item = _END
        except BaseException as error:  # re-raised in the consumer, which knows what to do
            item = _Failure(error)
        ready.put(item)  # blocks while `depth` batches wait; close() makes room
        if item is _END or isinstance(item, _Failure):
            return


def _stop(thread: threading.Thread, ready: queue.Queue, stop: threading.Event) -> None:
    stop.set()
    # The thread may be blocked putting into a full queue: empty it; after at most one more put
    # it sees `stop` and ends.
    while thread.is_alive():
        try:
            while True:
                ready.get_nowait()
        except queue.Empty:
            pass
        thread.join(timeout=0.05)


class Prefetcher:
    """Iterator over `source`'s micro-batches, `depth` (>= 1) of them read ahead on a thread.

    `device`: where the batches go; only a CUDA device changes anything (pinned, copied ahead).
    Stop it with close() (also run when it is collected, and at interpreter exit). An exception
    raised by the source is raised by the next __next__ that would have returned its batch.
    """

    def __init__(self, source, depth: int, device: Optional[torch.device] = None) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.micro_batch_size = source.micro_batch_size
        self.dp_size = source.dp_size
        self.consumed_samples = source.consumed_samples
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        cuda = device is not None and torch.device(device).type == "cuda"
        self._thread = threading.Thread(target=_read_ahead, name="pma-prefetch", daemon=True,
                                        args=(source, self._ready, self._stop, torch.device(device) if cuda else None))
        self._done = False
        self._thread.start()
        self._close = weakref.finalize(self, _stop, self._thread, self._ready, self._stop)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._done:
            raise StopIteration
        item = self._ready.get()
        if item is _END or isinstance(item, _Failure):
            self._done = True
            self.close()
            if item is _END:
                raise StopIteration
            raise item.error
        batch, copied = item
        if copied is not None:
            consumer = torch.cuda.current_stream()
            consumer.wait_event(copied)
            for tensor in batch.values():
                tensor.record_stream(consumer)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def close(self) -> None:
        """Stops the thread and drops what it read ahead; idempotent."""
        self._close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
