"""pma_train.data.prefetch: micro-batches read ahead on a thread, in order, counted as consumed."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from pma_train.data import MicroBatchIterator, Prefetcher


class _Numbered(torch.utils.data.Dataset):
    """Sample i is the constant sequence i; `broken` raises on that index."""

    def __init__(self, n: int, broken: int | None = None) -> None:
        self.n, self.broken = n, broken

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.broken:
            raise OSError(f"sample {i} is unreadable")
        t = torch.full((8,), i, dtype=torch.long)
        return {"tokens": t, "labels": t + 1, "loss_mask": torch.ones(8), "position_ids": torch.arange(8)}


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pma-prefetch"]


def _source(**kwargs) -> MicroBatchIterator:
    args = dict(dataset=_Numbered(50), micro_batch_size=3, dp_rank=1, dp_size=2, consumed_samples=6)
    return MicroBatchIterator(**{**args, **kwargs})


@pytest.mark.parametrize("depth, workers", [(1, 0), (3, 0), (2, 2)])
def test_same_batches_in_the_same_order_and_consumed_counts_the_consumer(depth, workers):
    plain = _source(num_workers=workers)
    ahead = Prefetcher(_source(num_workers=workers), depth)
    for _ in range(12):  # past the end of the dataset: the order starts again at sample 0
        a, b = next(plain), next(ahead)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype
    assert ahead.consumed_samples == plain.consumed_samples == 6 + 12 * 3 * 2
    ahead.close()


def test_consumed_samples_is_what_the_consumer_took_not_what_was_read_ahead():
    source = _source()
    ahead = Prefetcher(source, 3)
    next(ahead)
    # The thread fills its queue: 3 batches beyond the one taken (waited for, not timed).
    while source.consumed_samples < 6 + 4 * 6:
        threading.Event().wait(0.01)
    assert ahead.consumed_samples == 6 + 6  # a checkpoint now must resume at the 2nd batch
    resumed = _source(consumed_samples=ahead.consumed_samples)
    assert torch.equal(next(ahead)["tokens"], next(resumed)["tokens"])
    ahead.close()


def test_a_bounded_source_ends_and_the_thread_with_it():
    ahead = Prefetcher(_source(max_micro_batches=4), 2)
    assert len(list(ahead)) == 4
    with pytest.raises(StopIteration):
        next(ahead)
    assert not ahead.alive


def test_an_exception_in_the_dataset_surfaces_in_the_consumer():
    ahead = Prefetcher(_source(dataset=_Numbered(50, broken=16), consumed_samples=0), 2)
    # Rank 1 of 2, 3 per micro-batch: [3,4,5], [9,10,11], [15,16,17] <- 16 is broken.
    assert [next(ahead)["tokens"][0, 0].item() for _ in range(2)] == [3, 9]
    with pytest.raises(OSError, match="sample 16 is unreadable"):
        next(ahead)
    assert not ahead.alive
    with pytest.raises(StopIteration):
        next(ahead)


def test_the_thread_is_gone_after_close_and_after_collection():
    before = len(_prefetch_threads())
    ahead = Prefetcher(_source(), 2)
    next(ahead)
    ahead.close()  # its thread may be blocked on a full queue
    ahead.close()
    assert not ahead.alive
    ahead = Prefetcher(_source(), 2)
    thread = _prefetch_threads()[-1]
    next(ahead)
    del ahead
    gc.collect()
    assert not thread.is_alive()
    assert len(_prefetch_threads()) == before


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="prefetch depth must be >= 1"):
        Prefetcher(_source(), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_batches_arrive_on_the_device_equal_to_the_cpu_ones():
    device = torch.device("cuda", torch.cuda.current_device())
    plain, ahead = _source(), Prefetcher(_source(), 2, device)
    for _ in range(6):
        a, b = next(plain), next(ahead)
        for key in a:
            assert b[key].device == device
            # Used on the consumer's stream right away: the side-stream copy must be complete.
            assert torch.equal(a[key], (b[key] * 1).cpu())
    ahead.close()
    assert not ahead.alive
