"""Nothing silent: eval_iters=0 logs no validation loss, a resume is marked in metrics.jsonl and readers
see one record per step, init_from is never silently ignored, and pma-merge sorts its explicit inputs
(weights stay with their inputs) and refuses one checkpoint listed twice."""

from __future__ import annotations

import json
import os

import pytest

from pma_train.checkpoint import layout
from pma_train.checkpoint.layout import CheckpointError
from pma_train.checkpoint.origin import check_restart_of_init_run
from pma_train.cli.merge import print_selection, selection
from pma_train.cli.train import check_checkpoints
from pma_train.config import JobConfig, MergeConfig
from pma_train.merge import SelectionError, resolve_inputs
from pma_train.metrics import METRICS_FILE, MetricsLogger, read_metrics
from tests.launch import run_module, train

TINY = ["train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_length=32", "train.log_interval=1",
        "train.eval_iters=0", "train.eval_at_start=true", "schedule.warmup_iters=1", "checkpoint.interval=2", "seed=5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A source run (2 iterations), and a run started from its weights (init_from) that stops at
    iteration 3 (checkpoint at 2) and is restarted with the same command."""
    base = tmp_path_factory.mktemp("guards")
    cache = base / "cache"
    source = train(base / "source", TINY + ["train.iters=2"], nproc=None, cache_dir=cache)
    init = [f"checkpoint.init_from={source.run_dir / 'checkpoints'}", "train.iters=4"]
    first = train(base / "init", TINY + init + ["train.exit_after_iters=3"], nproc=None, cache_dir=cache)
    again = train(base / "init", TINY + init, nproc=None, cache_dir=cache)
    return source, first, again


def test_eval_iters_0_logs_no_validation_loss(runs):
    for run in runs:
        assert run.records("val") == [], run.records("val")
    assert "val loss None" in runs[0].output


def test_pma_eval_refuses_eval_iters_0(tmp_path):
    proc = run_module(["pma_train.cli.eval", "train.eval_iters=0", f"checkpoints=[{tmp_path}]",
                       f"run.dir={tmp_path / 'eval'}"], nproc=None)
    assert proc.returncode == 2 and "pma-eval: error: train.eval_iters: pma-eval needs at least 1" in proc.stderr


def test_restart_of_an_init_from_run_resumes_from_its_own_checkpoints(runs):
    source, first, again = runs
    assert "start iteration 2" in again.output
    assert "checkpoint.init_from: this run started from" in again.output
    own = again.run_dir / "checkpoints"
    sidecar = json.loads((own / "iter_0000004" / "pma_train.json").read_text())
    assert sidecar["extra"]["init_from"] == str((source.run_dir / "checkpoints").resolve())  # carried over the resume
    # A checkpoint.dir holding another run's checkpoints: init_from would be ignored, so it is refused.
    source_root = source.run_dir / "checkpoints"
    for ckpt_dir, init_from, message in ((own, source_root / "iter_0000002", f"that started from {source_root}"),
                                         (source_root, own, "that did not start from checkpoint.init_from")):
        job = JobConfig()
        job.checkpoint.dir, job.checkpoint.init_from = str(ckpt_dir), str(init_from)
        with pytest.raises(CheckpointError, match=f"checkpoint.init_from: checkpoint.dir {ckpt_dir} .* {message}"):
            check_checkpoints(job)


def test_resume_is_marked_and_readers_take_the_newest_record_per_step(runs):
    _, _, again = runs
    lines = [json.loads(line) for line in (again.run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 3, 4]  # step 3 logged twice
    resume = again.records("resume")
    assert len(resume) == 1 and resume[0]["iteration"] == 2
    assert resume[0]["checkpoint"] == str(again.run_dir / "checkpoints" / "iter_0000002")
    history = again.records("train")
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert history[2]["time"] > resume[0]["time"]  # the resumed run's step 3, not the abandoned one


def test_read_metrics_history(tmp_path):
    path = tmp_path / METRICS_FILE
    rows = [{"kind": "train", "step": s, "loss": 10 - s} for s in (1, 2, 3, 4)]
    rows += [{"kind": "val", "step": 2, "loss": 9.0}, {"kind": "recovery", "step": 3, "restored_iteration": 2}]
    rows += [{"kind": "resume", "step": 2, "iteration": 2}, {"kind": "val", "step": 2, "loss": 8.0}]
    rows += [{"kind": "train", "step": 3, "loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')  # torn by a kill
    with pytest.warns(UserWarning, match=f"{METRICS_FILE}:10: not a JSON record"):
        history = read_metrics(path)
    # Step 4 was logged before the job died and resumed from iteration 2: it belongs to no run any more.
    assert [(r["kind"], r["step"]) for r in history] == [
        ("train", 1), ("train", 2), ("resume", 2), ("val", 2), ("recovery", 3), ("train", 3)]
    assert [r["loss"] for r in read_metrics(path, "val")] == [8.0]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_a_resumed_logger_ends_a_torn_last_line(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "tr')
    log = MetricsLogger(JobConfig(), tmp_path, total_iters=2, start_iter=1, enabled=True)
    log.log(2, {"loss": 0.5})
    log.close()
    with pytest.warns(UserWarning, match=f"{METRICS_FILE}:2: not a JSON record"):
        assert [r["loss"] for r in read_metrics(tmp_path / METRICS_FILE, "train")] == [1.0, 0.5]


def _fake_checkpoint(root, iteration, extra=None):
    """A small real torch_dist checkpoint (one tensor, torch's own DCP writer) with our side-car."""
    import torch
    from torch.distributed.checkpoint import FileSystemWriter, save

    ckpt = root / layout.iter_dir_name(iteration)
    ckpt.mkdir(parents=True)
    save({"w": torch.full((4,), float(iteration))}, storage_writer=FileSystemWriter(str(ckpt)), no_dist=True)
    (ckpt / "pma_train.json").write_text(json.dumps({"iteration": iteration, "consumed_tokens": 100 * iteration,
                                                     "extra": extra or {}}))
    return ckpt


def test_restart_check_compares_the_recorded_init_from(tmp_path):
    origin = tmp_path / "pretrained"
    origin.mkdir()
    _fake_checkpoint(tmp_path / "own", 4, {"init_from": str(origin.resolve())})
    check_restart_of_init_run(str(origin), tmp_path / "own")  # the run's own restart
    with pytest.raises(CheckpointError, match=f"started from {origin.resolve()}; it would resume"):
        check_restart_of_init_run(str(tmp_path), tmp_path / "own")
    _fake_checkpoint(tmp_path / "other", 4)
    with pytest.raises(CheckpointError, match="did not start from checkpoint.init_from"):
        check_restart_of_init_run(str(origin), tmp_path / "other")


def test_one_checkpoint_listed_twice_is_refused(tmp_path):
    old, new = _fake_checkpoint(tmp_path / "run", 2), _fake_checkpoint(tmp_path / "run", 4)
    os.symlink(old, tmp_path / "link")
    cases = [([str(tmp_path / "run"), str(new)], str(tmp_path / "run")),  # a root and its latest
             ([str(old), str(new), str(tmp_path / "link")], str(old)),  # a symlink
             ([str(new), str(new)], str(new))]
    for paths, first in cases:
        with pytest.raises(SelectionError, match=f"inputs: {first} and {paths[-1]} are the same checkpoint"):
            resolve_inputs(paths)


def test_explicit_inputs_newest_first_are_sorted_with_their_weights(tmp_path, capsys):
    old, new = _fake_checkpoint(tmp_path / "a", 2), _fake_checkpoint(tmp_path / "b", 4)
    cfg = MergeConfig(inputs=[str(new), str(old)], method="explicit", weights=[3.0, 1.0], output=str(tmp_path / "out"))
    inputs, weights, note = selection(cfg)
    # Oldest first: the engine labels the output with the last input's iteration (4), and each
    # weight stays with the checkpoint it was listed with.
    assert [(i.iteration, w) for i, w in zip(inputs, weights)] == [(2, 0.25), (4, 0.75)]
    print_selection(inputs, weights, note)
    assert "each explicit weight stays with the input it was listed with" in capsys.readouterr().out
    cfg = MergeConfig(inputs=[str(new), str(old)], method="wma", output=str(tmp_path / "out"))
    inputs, weights, note = selection(cfg)  # positional weights count from the oldest
    assert [i.iteration for i in inputs] == [2, 4] and weights[1] > weights[0] and "explicit" not in note
    assert selection(MergeConfig(inputs=[str(old), str(new)], output="x"))[2] is None  # in order: no note
