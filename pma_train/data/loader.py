"""Micro-batches in Megatron-LM's global sample order, resumable from a sample count.

Megatron-LM's MegatronPretrainingSampler walks the dataset in order from `consumed_samples`, cuts
it into chunks of micro_batch_size * dp_size consecutive samples, and gives data-parallel rank r
the r-th micro_batch_size slice of each chunk. A global batch is then num_micro_batches such
chunks. We keep that order, so `consumed_samples` (global, all ranks) is the whole loader state:
a run resumed at consumed_samples=k sees exactly what an uninterrupted run sees after k samples,
for any dp_size. Past the end of the dataset the order starts again from sample 0.
"""

from __future__ import annotations

import signal
import weakref
from collections.abc import Iterator, Sized
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

# What the training step consumes; megatron-core datasets also return e.g. "dataset_id".
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class _SampleOrder:
    """Batch sampler: this rank's dataset indices of each micro-batch, endless or bounded."""

    def __init__(self, dataset_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int, max_micro_batches: Optional[int]) -> None:
        self.dataset_len = dataset_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        self.max_micro_batches = max_micro_batches

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        produced = 0
        while self.max_micro_batches is None or produced < self.max_micro_batches:
            yield [(start + i) % self.dataset_len for i in range(self.micro_batch_size)]
            start += step
            produced += 1


# Signals a scheduler sends to every process of a job step (Slurm: to the whole step) or a terminal
# to its process group. The workers are forked when the loader is built, before the trainer
# installs its handlers: they would die mid-step, before the trainer's save. They ignore them
# and end with the trainer instead: shut down by the loader when it is collected or at exit
# (multiprocessing's own exit hook would SIGTERM them, in vain, and wait forever).
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")


def _ignore_stop_signals(worker_id: int) -> None:
    for name in STOP_SIGNALS:
        signal.signal(signal.Signals[name], signal.SIG_IGN)


def _shut_down(batches) -> None:
    # torch's own worker shutdown (also what the iterator's __del__ runs): a stop message to each
    # worker, then join.
    batches._shutdown_workers()


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in BATCH_KEYS}


class MicroBatchIterator:
    """Endless iterator of this data-parallel rank's micro-batches, starting after `consumed_samples`.

    Yields {"tokens", "labels", "loss_mask", "position_ids"}, each [micro_batch_size, seq_length].
    `consumed_samples` advances by micro_batch_size * dp_size per micro-batch yielded, like the
    trainer's own count, so either can be checkpointed. With num_workers > 0, worker processes
    read ahead; the order is the same.
    """

    def __init__(self, dataset: Dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, num_workers: int = 0,
                 max_micro_batches: Optional[int] = None) -> None:
        if not isinstance(dataset, Sized) or len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or consumed_samples < 0:
            raise ValueError(
                f"bad loader arguments: micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, "
                f"dp_size={dp_size}, consumed_samples={consumed_samples}"
            )
        self.micro_batch_size = micro_batch_size
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        order = _SampleOrder(len(dataset), micro_batch_size, dp_rank, dp_size, consumed_samples,
                             max_micro_batches)
        loader = DataLoader(dataset, batch_sampler=order, num_workers=num_workers, collate_fn=_collate,
                            prefetch_factor=2 if num_workers > 0 else None, worker_init_fn=_ignore_stop_signals)
        self._batches = iter(loader)
        if num_workers > 0:
            weakref.finalize(self, _shut_down, self._batches)

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._batches)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch


class EvalIterator:
    """The validation micro-batches of this rank; every `iter()` starts again at sample 0.

    So each evaluation scores the same samples and eval losses are comparable across a run.
    `num_micro_batches` bounds one pass (e.g. eval_iters * micro-batches per global batch).
    """

    def __init__(self, dataset: Dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_micro_batches: Optional[int] = None) -> None:
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_micro_batches = num_micro_batches

    def __iter__(self) -> MicroBatchIterator:
        return MicroBatchIterator(self.dataset, self.micro_batch_size, self.dp_rank, self.dp_size,
                                  consumed_samples=0, max_micro_batches=self.num_micro_batches)
