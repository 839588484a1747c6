"""One writer per checkpoint root, and full disks, with real jobs: a second pma-train or pma-merge on a
root in use stops at once naming the first (which is undisturbed), a killed job's lock is taken
over by its rerun, and a disk that fills up is named while the previous checkpoint stays `latest`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from pma_train.checkpoint import layout
from pma_train.checkpoint.lock import LOCK_FILE, LockError, Owner, acquire
from tests import launch
from tests.launch import REPO, hold_lock, train
from tests.test_merge import merge_cli, synthetic

TRAIN = ["train.log_interval=1", "train.eval_interval=1000", "train.eval_iters=1", "train.global_batch_size=2",
         "train.micro_batch_size=2", "train.seq_length=32", "schedule.warmup_iters=1", "seed=5",
         "checkpoint.interval=2"]


def start(module: str, args: list[str], log: Path) -> subprocess.Popen:
    """A plain (single-rank) job in its own process group, output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=launch.test_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def start_train(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return start("pma_train.cli.train", [f"run.dir={run_dir}", "logging.progress_bar=false", *TRAIN, *overrides],
                 run_dir.parent / f"{run_dir.name}.log")


def train_tiny(run_dir: Path, overrides: list[str], **kwargs):
    return train(run_dir, TRAIN + overrides, **kwargs)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the job ended ({proc.returncode}) before {what}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def lock_owner(root: Path) -> int | None:
    try:
        return json.loads((root / LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def temporaries(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob(f"{layout.TMP_PREFIX}*")) if root.is_dir() else []


def digest(ckpt: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ckpt.iterdir())}


# ----------------------------------------------------------------------------- the lock itself


def test_lock_names_its_holder_and_a_foreign_host_lock_needs_force(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    held = acquire(tmp_path, Owner.this_process())
    with pytest.raises(LockError, match=f"is in use by pid {os.getpid()} on host {socket.gethostname()}"):
        acquire(tmp_path, Owner.this_process())
    held.release()
    assert not (tmp_path / LOCK_FILE).exists()
    # A record another host left behind: its liveness cannot be checked from here.
    foreign = {**Owner.this_process().__dict__, "host": "node17", "pid": 4242, "slurm_job_id": "81234"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(foreign))
    with pytest.raises(LockError, match=r"pid 4242 on host node17 .* cannot tell whether that job still runs; "
                                        r"if it does not, rerun with checkpoint.force_unlock=true \(or delete"):
        acquire(tmp_path, Owner.this_process(), override="checkpoint.force_unlock=true")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node17"  # refused: left as it was
    forced = acquire(tmp_path, Owner.this_process(), force=True, override="checkpoint.force_unlock=true")
    assert "taking over the lock of pid 4242 on host node17" in forced.note and "forced" in forced.note
    forced.release()
    # ... but a requeued Slurm job (same job id, another node) is that job's own successor.
    (tmp_path / LOCK_FILE).write_text(json.dumps(foreign))
    monkeypatch.setenv("SLURM_JOB_ID", "81234")
    requeued = acquire(tmp_path, Owner.this_process())
    assert "an earlier run of this Slurm job (81234)" in requeued.note
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    requeued.release()


# ----------------------------------------------------------------------------- pma-train


def test_second_job_stops_at_once_naming_the_first_and_a_killed_jobs_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    first = start_train(run_dir, ["train.iters=12"])
    # Freeze the first job in the middle of a save: the moment a second job used to delete its temporary.
    wait_for(lambda: layout.read_tracker(ckpt) and any(p.is_dir() for p in ckpt.glob(".tmp-iter_*")), first,
             "a save in flight after a published one")
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        in_flight = temporaries(ckpt)
        # Two ranks: both stop (rank 1 does not wait for rank 0 in a collective), one message;
        # the job's status is torchrun's (1), a single process exits with 3.
        second = train_tiny(run_dir, ["train.iters=12", "train.micro_batch_size=1"], nproc=2, check=False, timeout=300)
        assert second.returncode != 0 and "exitcode  : 3" in second.output, second.output[-3000:]
        assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in second.output, second.output[-3000:]
        assert second.output.count("is in use by") == 1
        assert "start iteration" not in second.output
        # The first job's in-flight save and its lock are untouched.
        assert temporaries(ckpt) == in_flight and lock_owner(ckpt) == first.pid
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # Killed: the kernel released its lock, the record stays; the rerun takes over and resumes.
    assert lock_owner(ckpt) == first.pid
    latest = layout.read_tracker(ckpt)
    assert latest >= 2
    rerun = train_tiny(run_dir, ["train.iters=12"], nproc=None, timeout=300)
    assert f"taking over the lock of pid {first.pid} on host {socket.gethostname()}" in rerun.output, rerun.output[-3000:]
    assert "that process no longer runs" in rerun.output
    assert f"start iteration {latest}" in rerun.output
    assert layout.read_tracker(ckpt) == 12
    for iteration in layout.list_iterations(ckpt):
        layout.verify_complete(ckpt / layout.iter_dir_name(iteration))
    assert temporaries(ckpt) == [] and not (ckpt / LOCK_FILE).exists()  # released at exit


def test_run_dir_in_use_stops_a_job_whose_checkpoints_go_elsewhere(tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("the other job's\n")
    holder = hold_lock(run_dir)
    try:
        refused = train_tiny(run_dir, ["train.iters=2", f"checkpoint.dir={ckpt}"], nproc=None, check=False, timeout=300)
    finally:
        holder.communicate("\n", timeout=60)
    assert refused.returncode == 3, refused.output[-3000:]
    assert f"{run_dir} is in use by pid {holder.pid} on host {socket.gethostname()}" in refused.output, refused.output[-3000:]
    # Nothing written, and the checkpoint root's lock was given back.
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == "the other job's\n"
    assert not (ckpt / LOCK_FILE).exists() and layout.list_iterations(ckpt) == []
    # run.dir == checkpoint.dir: one lock covers both (the job does not refuse itself).
    same = train_tiny(ckpt, ["train.iters=2", f"checkpoint.dir={ckpt}"], nproc=None, timeout=300)
    assert layout.read_tracker(ckpt) == 2 and not (ckpt / LOCK_FILE).exists(), same.output[-3000:]


def test_second_export_into_an_output_stops_before_touching_the_firsts_files(tmp_path):
    from pma_train.export.exporter import claim_output

    out, ckpt = tmp_path / "hf", tmp_path / "ckpt" / "iter_0000001"
    ckpt.mkdir(parents=True)
    plan = SimpleNamespace(output=out, cfg=SimpleNamespace(force_unlock=False, overwrite=False),
                           source=SimpleNamespace(path=ckpt))
    in_flight = tmp_path / ".tmp-hf.0123abcd"  # the first export's temporary, which a second used to delete
    in_flight.mkdir()
    holder = hold_lock(tmp_path, f"{LOCK_FILE}.hf")
    try:
        with pytest.raises(LockError, match=f"{out} is in use by pid {holder.pid} on host {socket.gethostname()}"):
            claim_output(plan)
        assert in_flight.is_dir()
    finally:
        holder.communicate("\n", timeout=60)
    lock, tmp = claim_output(plan)  # once the first is gone: its leftover removed, a temporary of its own
    try:
        assert not in_flight.exists() and tmp.is_dir() and (tmp_path / f"{LOCK_FILE}.hf").exists()
    finally:
        lock.release()
    assert not (tmp_path / f"{LOCK_FILE}.hf").exists()


# ----------------------------------------------------------------------------- pma-merge


def test_second_merge_into_an_output_stops_naming_the_first(tmp_path):
    inputs = synthetic(tmp_path / "in", range(1, 5))
    out = tmp_path / "out"
    # What a merge of another iteration left when it was killed: cleaned by the next merge into out.
    leftover = out / ".tmp-merge-iter_0000099.0123abcd"
    leftover.mkdir(parents=True)
    (leftover / "__0_0.distcp").write_bytes(b"\0" * 4096)
    args = ["progress_bar=false", f"inputs=[{','.join(map(str, inputs))}]", "memory_budget_mb=1", f"output={out}"]
    first = start("pma_train.cli.merge", args, tmp_path / "first.log")
    wait_for(lambda: lock_owner(out) == first.pid, first, "the first merge to lock its output")
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = merge_cli(args, nproc=None)
        assert second.returncode == 3, second.stdout + second.stderr
        assert f"{out} is in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr, second.stderr
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert layout.list_iterations(out) == [4] and layout.read_tracker(out) == 4
    layout.verify_complete(out / "iter_0000004")
    assert temporaries(out) == [] and not (out / LOCK_FILE).exists()


def test_output_inside_an_input_checkpoint_is_refused_before_anything_is_written(tmp_path):
    a, b = synthetic(tmp_path / "in", [1, 2], rows=64, cols=32)
    before = digest(a)
    proc = merge_cli([f"inputs=[{a},{b}]", f"output={a / 'merged'}"], nproc=None)
    assert proc.returncode == 1 and f"output: {a / 'merged'} is inside the input checkpoint {a}" in proc.stderr, proc.stderr
    assert not (a / "merged").exists() and digest(a) == before


# ----------------------------------------------------------------------------- full disks


@contextmanager
def tmpfs(path: Path, size: str):
    """A small file system to fill up: a tmpfs mount (root only; skipped where mount is not allowed)."""
    path.mkdir(parents=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small file system to fill up")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_during_training_is_named_and_latest_stays(tmp_path):
    # One checkpoint of the tiny model (7.3 MiB) fits in 12 MiB, a second does not.
    with tmpfs(tmp_path / "fs", "12m") as fs:
        ckpt = fs / "ckpt"
        args = ["train.iters=4", f"checkpoint.dir={ckpt}"]
        checked = train_tiny(tmp_path / "run", args, nproc=None, check=False, timeout=300)
        assert checked.returncode == 1, checked.output[-3000:]
        assert f"pma-train: error: checkpoint.dir: {ckpt} has" in checked.output, checked.output[-3000:]
        assert "a checkpoint needs about" in checked.output and "nothing was written" in checked.output
        assert layout.read_tracker(ckpt) == 2 and temporaries(ckpt) == []
        kept = digest(ckpt / "iter_0000002")
        # Without the check the save runs into the full disk: named, partial output removed.
        unchecked = train_tiny(tmp_path / "run", args + ["checkpoint.check_free_space=false"], nproc=None, check=False,
                               timeout=300)
        assert "start iteration 2" in unchecked.output  # the previous checkpoint loads
        assert unchecked.returncode == 1, unchecked.output[-3000:]
        assert f"pma-train: error: disk full (no space left on device, or quota exceeded) while writing {ckpt}/.tmp-iter_0000004" \
            in unchecked.output, unchecked.output[-3000:]
        assert "latest_checkpointed_iteration.txt still names iteration 2" in unchecked.output
        assert "Traceback" not in unchecked.output
        assert layout.read_tracker(ckpt) == 2 and temporaries(ckpt) == [] and layout.list_iterations(ckpt) == [2]
        assert digest(ckpt / "iter_0000002") == kept
        layout.verify_complete(ckpt / "iter_0000002")
        assert not (ckpt / LOCK_FILE).exists()


def test_full_disk_during_a_merge_is_named_and_latest_stays(tmp_path):
    inputs = synthetic(tmp_path / "in", [1, 2, 3], rows=512, cols=512)  # 2 MiB of tensors each
    with tmpfs(tmp_path / "fs", "3m") as out:
        ok = merge_cli([f"inputs=[{inputs[0]},{inputs[1]}]", f"output={out}"], nproc=None)
        assert ok.returncode == 0, ok.stderr[-3000:]
        kept = digest(out / "iter_0000002")
        refused = merge_cli([f"inputs=[{inputs[1]},{inputs[2]}]", f"output={out}"], nproc=None)
        assert refused.returncode == 1 and f"output: {out} has " in refused.stderr, refused.stderr[-3000:]
        assert "a checkpoint needs about 2.1 MiB (the merged tensors' bytes); nothing was written" in refused.stderr
        assert digest(out / "iter_0000002") == kept and temporaries(out) == []
        # Past the check (an estimate can be short), a write that finds the disk full is named too.
        full = merge_cli([f"inputs=[{inputs[1]},{inputs[2]}]", f"output={out}", "check_free_space=false"], nproc=2)
        assert full.returncode == 1, full.stdout + full.stderr
        assert "disk full (no space left on device, or quota exceeded) while writing" in full.stderr, full.stderr[-3000:]
        assert "latest_checkpointed_iteration.txt still names iteration 2" in full.stderr
        assert layout.read_tracker(out) == 2 and layout.list_iterations(out) == [2] and temporaries(out) == []
        assert digest(out / "iter_0000002") == kept
