"""Checkpoint layout: atomic publishing, completeness checks, and clear errors for bad checkpoints."""

from __future__ import annotations

import re

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter, save

from pma_train.checkpoint import layout
from pma_train.checkpoint.layout import CheckpointError
from tests.launch import train


def write_dcp(directory, value: float = 1.0):
    directory.mkdir(parents=True)
    save({"w": torch.full((64, 64), value)}, storage_writer=FileSystemWriter(str(directory)))


def test_published_checkpoint_is_found_and_complete(tmp_path):
    root = tmp_path / "ckpt"
    tmp = layout.temporary_dir(root, 100, "abc")
    write_dcp(tmp)
    assert layout.list_iterations(root) == []  # a checkpoint being written is invisible
    layout.publish(tmp, root / layout.iter_dir_name(100))
    layout.write_tracker(root, 100)
    assert layout.list_iterations(root) == [100]
    assert layout.resolve_checkpoint(root) == root / "iter_0000100"
    layout.verify_complete(root / "iter_0000100")


def test_killed_write_leaves_nothing_that_looks_like_a_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    write_dcp(root / "iter_0000010")
    layout.write_tracker(root, 10)
    partial = layout.temporary_dir(root, 20, "dead")
    write_dcp(partial)  # as if the job died before publishing
    assert layout.list_iterations(root) == [10]
    assert layout.read_tracker(root) == 10
    layout.remove_stale_temporaries(root)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000010", layout.TRACKER_FILE]


def test_publish_replaces_an_existing_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    write_dcp(root / "iter_0000010", 1.0)
    new = layout.temporary_dir(root, 10, "x")
    write_dcp(new, 2.0)
    layout.publish(new, root / "iter_0000010")
    assert [p.name for p in root.iterdir()] == ["iter_0000010"]


def test_truncated_data_file_is_named(tmp_path):
    ckpt = tmp_path / "iter_0000005"
    write_dcp(ckpt)
    data = next(ckpt.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{data.name} is truncated"):
        layout.verify_complete(ckpt)
    data.unlink()
    with pytest.raises(CheckpointError, match=f"{data.name} is missing"):
        layout.verify_complete(ckpt)


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        layout.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        layout.resolve_checkpoint(tmp_path / "empty")
    layout.write_tracker(tmp_path / "empty", 30)
    with pytest.raises(CheckpointError, match="names iteration 30"):
        layout.resolve_checkpoint(tmp_path / "empty")


def test_trainer_refuses_truncated_checkpoint_before_starting(tmp_path):
    """A run's latest checkpoint, truncated on disk: the resume stops with the file named, and
    nothing on disk changes."""
    run_dir = tmp_path / "run"
    common = ["train.iters=4", "train.global_batch_size=4", "train.micro_batch_size=2",
              "train.seq_length=32", "schedule.warmup_iters=1", "checkpoint.interval=2", "train.eval_interval=100"]
    train(run_dir, common, nproc=None)
    ckpt = run_dir / "checkpoints" / "iter_0000004"
    data = next(ckpt.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    before = sorted((p.name, p.stat().st_size) for p in ckpt.iterdir())
    failed = train(run_dir, common + ["train.iters=6"], nproc=None, check=False)
    assert failed.returncode == 2
    assert f"checkpoint.dir (auto-resume): {ckpt}: data file {data.name} is truncated" in failed.output
    assert sorted((p.name, p.stat().st_size) for p in ckpt.iterdir()) == before
    assert (run_dir / "checkpoints" / "iter_0000002").is_dir()


def test_retention_keeps_latest_recent_and_merge_grid(tmp_path):
    from pma_train.checkpoint.retention import prune, to_keep

    assert to_keep(list(range(10, 110, 10)), keep_last=2, grid_every=30, grid_last=2) == {60, 90, 100}
    assert to_keep(list(range(10, 110, 10)), keep_last=1, grid_every=None, grid_last=None) == {100}
    root = tmp_path / "ckpt"
    for it in range(5, 55, 5):
        write_dcp(root / layout.iter_dir_name(it))
    layout.write_tracker(root, 50)
    deleted = prune(root, keep_last=2, grid_every=20, grid_last=None)
    assert deleted == [5, 10, 15, 25, 30, 35]
    assert layout.list_iterations(root) == [20, 40, 45, 50]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    # the tracker's latest is never deleted, even if newer directories exist
    layout.write_tracker(root, 20)
    prune(root, keep_last=1, grid_every=None, grid_last=None)
    assert layout.list_iterations(root) == [20, 50]


def test_tracker_that_is_not_text_is_named(tmp_path):
    from pma_train.cli.train import check_checkpoints
    from pma_train.config import JobConfig
    from pma_train.merge import SelectionError, resolve_inputs

    root = tmp_path / "ckpt"
    (root / "iter_0000002").mkdir(parents=True)
    (root / layout.TRACKER_FILE).write_bytes(b"\xff\xfe2\x00")
    message = re.escape(f"{root / layout.TRACKER_FILE} is not a text file (byte 0 is 0xff)")
    with pytest.raises(CheckpointError, match=message):
        layout.read_tracker(root)
    with pytest.raises(SelectionError, match=f"inputs: {message}"):  # pma-merge
        resolve_inputs([str(root)])
    job = JobConfig()
    job.checkpoint.dir = str(root)
    with pytest.raises(CheckpointError, match=f"checkpoint.dir \\(auto-resume\\): {message}"):  # pma-train
        check_checkpoints(job)
