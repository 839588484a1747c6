"""The merge tracked during a constant-LR run equals the offline merge; retention keeps exactly the
checkpoints that merge needs. (That the merge beats the live model is asserted by test_repro.py.)"""

from __future__ import annotations

import json

import torch

from pma_train.checkpoint import layout
from pma_train.merge import wma
from tests.launch import hold_lock, run_module, train
from tests.test_merge import assert_merged, full_tensors, merge_cli

RUN = ["train.iters=120", "train.global_batch_size=8", "train.micro_batch_size=4", "train.seq_length=64",
       "train.lr=3e-3", "schedule.warmup_iters=20", "checkpoint.interval=10", "train.eval_interval=40",
       "train.eval_iters=8", "train.log_interval=100", "track.enabled=true", "track.n=8", "track.save=true", "seed=1",
       "checkpoint.retention.enabled=true", "checkpoint.retention.keep_last=2"]


def test_tracked_merge_equals_offline_merge(tmp_path):
    run = train(tmp_path / "run", RUN, nproc=1)
    final = run.records("val")[-1]
    assert final["step"] == 120
    assert final["merged_iterations"] == list(range(50, 121, 10))
    assert final["loss_merged"] != final["loss"]

    # retention kept exactly what the tracked merge needs (its grid) and the latest, nothing older
    assert layout.list_iterations(tmp_path / "run" / "checkpoints") == list(range(50, 121, 10))
    assert run.records("retention")

    # the tracked merge was saved at iterations 80 and 120; track.save_keep_last=1 kept the newest
    assert layout.list_iterations(tmp_path / "run" / "merged") == [120]
    saved = layout.resolve_checkpoint(tmp_path / "run" / "merged")
    meta = json.loads((saved / "pma_train.json").read_text())["pma_track"]
    assert meta["iterations"] == final["merged_iterations"]
    offline = tmp_path / "offline"
    proc = merge_cli([f"root={tmp_path / 'run' / 'checkpoints'}", "n=8", "v_iterations=10", "method=sma",
                      f"output={offline}"], nproc=None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tracked, merged = full_tensors(saved, tmp_path), full_tensors(layout.resolve_checkpoint(offline), tmp_path)
    assert sorted(tracked) == sorted(merged)
    for key in merged:
        assert torch.allclose(tracked[key], merged[key], rtol=0, atol=1e-6), key


def test_sharded_tracker_on_two_ranks(tmp_path):
    """tests/track_checks.py: the tracker sharded across DP=2 merges exactly, restores the live weights
    bit for bit (after the merged evaluation and after reading a window back), keeps 1/DP of the snapshot
    bytes per rank; bf16 snapshots merge within bf16 rounding, snapshots in the parameters' dtype exactly;
    track.storage=disk merges to the host store's bits, restores the live weights bit for bit, never
    reads what an earlier process left in its directory, and refuses a second store there."""
    proc = run_module(["tests.track_checks", str(tmp_path)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "track_checks ok" in proc.stdout


def test_tracked_merge_at_dp2_equals_fp64_sum_of_grid_checkpoints(tmp_path):
    """The trainer's tracker over megatron's DDP at DP=2 (distributed optimizer): the saved merge is the
    weighted sum of the grid checkpoints. With track.storage=disk, stopped after the first grid point
    and resumed over files a crashed process left behind (named as the window's, torn), the merge is
    the same, bit for bit, and no file is left at the end."""
    args = ["train.iters=4", "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=64",
            "train.lr=1e-2", "schedule.warmup_iters=1", "checkpoint.interval=2", "train.eval_interval=4",
            "train.eval_iters=1", "train.log_interval=100", "track.enabled=true", "track.n=2", "track.method=wma",
            "track.save=true", "seed=3"]
    run = train(tmp_path / "run", args, nproc=2)
    assert run.records("val")[-1]["merged_iterations"] == [2, 4]
    root = tmp_path / "run" / "checkpoints"
    assert_merged(tmp_path / "run" / "merged", [root / layout.iter_dir_name(i) for i in (2, 4)], wma(2), tmp_path)
    # rank 0 held half of the two fp32 snapshots (up to the padding of the last share)
    numel = sum(t.numel() for t in full_tensors(root / layout.iter_dir_name(4), tmp_path).values() if t.is_floating_point())
    assert 0 <= run.records("track")[-1]["track_snapshot_bytes"] - 2 * 4 * numel / 2 <= 2 * 4

    disk = args + ["track.storage=disk", "track.buffer_mb=1"]
    train(tmp_path / "disk", disk + ["train.exit_after_iters=2"], nproc=2)
    for rank in (0, 1):
        directory = tmp_path / "disk" / "track" / f"rank_{rank:05d}"
        assert list(directory.iterdir()) == []  # files and lock deleted at the end of training
        for name in ("it0000000002.bin", "it0000000004.bin.tmp", "live.bin"):
            (directory / name).write_bytes(b"\xff" * 1000)
    resumed = train(tmp_path / "disk", disk, nproc=2)
    assert resumed.records("val")[-1] == {**run.records("val")[-1], "time": resumed.records("val")[-1]["time"]}
    tracked, host = full_tensors(layout.resolve_checkpoint(tmp_path / "disk" / "merged"), tmp_path), \
        full_tensors(layout.resolve_checkpoint(tmp_path / "run" / "merged"), tmp_path)
    assert sorted(tracked) == sorted(host) and all(torch.equal(tracked[k], host[k]) for k in host)
    track = resumed.records("track")[-1]
    assert track["track_snapshot_bytes"] == 0 and 0 <= track["track_disk_bytes"] - 2 * 4 * numel / 2 <= 2 * 4
    assert not list((tmp_path / "disk" / "track").rglob("*.bin*"))


def test_track_dir_held_by_another_job_is_refused_on_every_rank(tmp_path):
    """A rank directory another process holds: every rank stops with the same error, naming it (no rank
    left waiting for the one refused), and nothing of the holder's is touched."""
    held = tmp_path / "track" / "rank_00001"
    held.mkdir(parents=True)
    (held / "it0000000002.bin").write_bytes(b"theirs")
    holder = hold_lock(held)
    try:
        run = train(tmp_path / "run", ["train.iters=2", "train.global_batch_size=8", "train.micro_batch_size=2",
                                       "train.seq_length=64", "checkpoint.interval=2", "train.eval_iters=1",
                                       "track.enabled=true", "track.n=2", "track.storage=disk",
                                       f"track.dir={tmp_path / 'track'}"], nproc=2, check=False)
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait()
    assert run.returncode != 0
    assert f"pma-train: error: track.dir: {held} is in use by pid {holder.pid}" in run.output, run.output[-3000:]
    assert (held / "it0000000002.bin").read_bytes() == b"theirs"
    assert not list((tmp_path / "run" / "checkpoints").glob("iter_*"))
