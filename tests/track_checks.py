"""Run under torchrun (gloo) by tests/test_track.py: the merge tracker sharded across data-parallel ranks.

    torchrun --nproc-per-node 2 -m tests.track_checks
Two replica sets (fp32 and bf16 parameters, both replicated on every rank, as megatron's DDP keeps
them); five grid points of random weights, a window of three. Checks, on every rank: the merge
swapped into the model equals an fp64 weighted sum of the full snapshots and, bit for bit, the
unsharded fp32 sum the tracker formed before sharding; the live weights are restored exactly; each
rank's snapshots take 1/DP of the unsharded bytes; bf16 snapshots merge within bf16 rounding, and
snapshots in the parameters' own dtype merge to the same bits; a window read back from checkpoints
(`holding`) merges the same and leaves the live weights as they were. With track.storage=disk (each
rank its own directory under argv[1]): the same merges bit for bit (fp32 and bf16 snapshots), the live
weights restored bit for bit, no host memory and the host store's bytes on disk, files an earlier
process left deleted and never read, a window dropped or closed deleting its files, a second store in
the same directory refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pma_train.merge.track import MergeTracker
from pma_train.checkpoint.lock import LockError
from pma_train.merge.track_store import DiskStore
from pma_train.merge.weights import merge_weights

N, METHOD, POINTS = 3, "wma", 5
SHAPES = [(7, 5), (13,), (0, 4), (3, 4, 2), (1,)]  # 73 elements: odd, so the last share is padded
GATHER_BYTES = 40  # a few elements per all-gather: many rounds, split across parameter boundaries


def module(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in SHAPES]


def set_weights(params: list[torch.nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)  # the same on every rank: replicas
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def run_grid(tracker: MergeTracker, sets: list[list[torch.nn.Parameter]]) -> list[list[list[torch.Tensor]]]:
    """Five grid points; returns the full weights at each (what a grid checkpoint holds)."""
    history = []
    for point in range(POINTS):
        for offset, params in enumerate(sets):
            set_weights(params, 100 * point + offset)
        history.append([[p.detach().clone() for p in params] for params in sets])
        tracker.add(10 * point)
    return history


def merged_now(sets) -> list[list[torch.Tensor]]:
    return [[p.detach().clone() for p in params] for params in sets]


def main() -> None:
    dist.init_process_group("gloo")
    world, group = dist.get_world_size(), dist.group.WORLD
    sets = [module(torch.float32), module(torch.bfloat16)]
    weights = merge_weights(METHOD, N, 0.2)
    numel = sum(p.numel() for p in sets[0])

    tracker = MergeTracker([(params, group) for params in sets], N, METHOD, 0.2, gather_bytes=GATHER_BYTES)
    history = run_grid(tracker, sets)
    window = history[-N:]
    assert tracker.ready and tracker.iterations == [20, 30, 40], tracker.iterations
    live = merged_now(sets)
    with tracker.swapped_in():
        merged = merged_now(sets)
    for s, params in enumerate(sets):
        for i, p in enumerate(params):
            reference = sum(w * point[s][i].double() for w, point in zip(weights, window))
            before = torch.zeros(p.shape, dtype=torch.float32)  # the unsharded tracker's sum
            for w, point in zip(weights, window):
                before.add_(point[s][i].float(), alpha=w)
            assert torch.equal(merged[s][i], before.to(p.dtype)), (s, i, "differs from the unsharded merge")
            rel = 0 if p.dtype == torch.float32 else 2 ** -8  # bf16 parameters hold the sum rounded
            assert torch.all((merged[s][i].double() - reference).abs() <= rel * reference.abs() + 1e-6), (s, i)
            assert torch.equal(p.detach(), live[s][i]), (s, i, "live weights not restored")
    share = -(-numel // world)
    assert tracker.snapshot_bytes() == N * 2 * share * 4, tracker.snapshot_bytes()
    unsharded = N * 2 * numel * 4

    # the same windows with bf16 snapshots: half the bytes, values within bf16 rounding of the fp32 merge
    tracker16 = MergeTracker([(params, group) for params in sets], N, METHOD, 0.2, dtype="bf16",
                             gather_bytes=GATHER_BYTES)
    run_grid(tracker16, sets)
    with tracker16.swapped_in():
        merged16 = merged_now(sets)
    for i, p in enumerate(sets[0]):
        bound = sum(w * point[0][i].double().abs() for w, point in zip(weights, window))
        assert torch.all((merged16[0][i].double() - merged[0][i].double()).abs() <= 2 ** -8 * bound + 1e-7), i
    assert tracker16.snapshot_bytes() * 2 == tracker.snapshot_bytes()

    # snapshots in the parameters' own dtype: the bf16 set takes half, the merge is the same bits
    own = MergeTracker([(params, group) for params in sets], N, METHOD, 0.2, dtype="param", gather_bytes=GATHER_BYTES)
    run_grid(own, sets)
    with own.swapped_in():
        assert all(torch.equal(a, b) for x, y in zip(merged_now(sets), merged) for a, b in zip(x, y))
    assert own.snapshot_bytes() == N * share * (4 + 2), own.snapshot_bytes()

    # a resumed run's window, read back from its checkpoints (here: weights put in by a loader)
    resumed = MergeTracker([(params, group) for params in sets], N, METHOD, 0.2, gather_bytes=GATHER_BYTES)
    for point in range(2, POINTS):
        def load(point=point):
            for s, params in enumerate(sets):
                for p, value in zip(params, history[point][s]):
                    p.copy_(value)
        with resumed.holding(load):
            resumed.add(10 * point)
        assert all(torch.equal(p.detach(), v) for x, y in zip(sets, live) for p, v in zip(x, y)), "live not restored"
    with resumed.swapped_in():
        assert all(torch.equal(a, b) for x, y in zip(merged_now(sets), merged) for a, b in zip(x, y))

    # the unsharded path (no group: one rank's view) merges to the same bits
    single = MergeTracker([(params, None) for params in sets], N, METHOD, 0.2)
    run_grid(single, sets)
    with single.swapped_in():
        assert all(torch.equal(a, b) for x, y in zip(merged_now(sets), merged) for a, b in zip(x, y))
    assert single.snapshot_bytes() == unsharded
    disk_checks(sets, group, history, live, merged, merged16, tracker, Path(sys.argv[1]) / f"rank_{dist.get_rank()}")
    if dist.get_rank() == 0:
        print(f"track_checks ok: per-rank snapshot bytes {tracker.snapshot_bytes()} (bf16 "
              f"{tracker16.snapshot_bytes()}), unsharded {unsharded}, dp {world}")
    dist.destroy_process_group()


def disk_checks(sets, group, history, live, merged, merged16, host: MergeTracker, directory: Path) -> None:
    """track.storage=disk against the host store's results (`merged`, `merged16`, `live`)."""
    def same(a, b) -> bool:
        return all(torch.equal(x, y) for u, v in zip(a, b) for x, y in zip(u, v))

    directory.mkdir(parents=True)
    stale = {name: directory / name for name in ("it0000000020.bin", "it0000000030.bin.tmp", "live.bin", "notes.txt")}
    for path in stale.values():  # an earlier process's (torn) files, named as this window's will be
        path.write_bytes(b"\xff" * 7)
    disk = MergeTracker([(params, group) for params in sets], N, METHOD, 0.2, gather_bytes=GATHER_BYTES,
                        store=DiskStore(directory, GATHER_BYTES))
    assert sorted(p.name for p in directory.iterdir()) == [".pma-lock", "notes.txt"], "stale files kept"
    try:
        DiskStore(directory, GATHER_BYTES)
        raise AssertionError("a second store in one directory was not refused")
    except LockError as err:
        assert f"{directory} is in use by pid" in str(err), err
    run_grid(disk, sets)
    assert disk.iterations == [20, 30, 40] and disk.snapshot_bytes() == 0
    assert disk.disk_bytes() == host.snapshot_bytes(), (disk.disk_bytes(), host.snapshot_bytes())
    files = sorted(p.name for p in directory.glob("*.bin*"))
    assert files == ["it0000000020.bin", "it0000000030.bin", "it0000000040.bin"], files
    with disk.swapped_in():
        assert same(merged_now(sets), merged), "disk merge differs from the host merge"
        assert (directory / "live.bin").is_file()
    assert same(merged_now(sets), live), "live weights not restored from disk"
    assert not (directory / "live.bin").exists()

    # a window read back from checkpoints (resume) onto disk merges the same, live restored
    disk.drop_after(10)
    assert disk.iterations == [] and not list(directory.glob("*.bin*")), "dropped snapshots' files kept"
    for point in range(2, POINTS):
        def load(point=point):
            for s, params in enumerate(sets):
                for p, value in zip(params, history[point][s]):
                    p.copy_(value)
        with disk.holding(load):
            disk.add(10 * point)
        assert same(merged_now(sets), live), "live weights not restored after a read-back"
    with disk.swapped_in():
        assert same(merged_now(sets), merged)
    disk.close()
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"], "close kept files"

    # bf16 snapshots on disk: the host's bf16 merge, bit for bit
    disk16 = MergeTracker([(params, group) for params in sets], N, METHOD, 0.2, dtype="bf16",
                          gather_bytes=GATHER_BYTES, store=DiskStore(directory, GATHER_BYTES))
    run_grid(disk16, sets)
    assert disk16.disk_bytes() * 2 == host.snapshot_bytes()
    with disk16.swapped_in():
        assert same(merged_now(sets), merged16)
    assert same(merged_now(sets), live)
    disk16.close()


if __name__ == "__main__":
    main()
