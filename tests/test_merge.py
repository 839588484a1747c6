"""pma-merge on real checkpoints: exact against an independent fp64 reference, any number of merge
ranks, mixed input layouts, output loadable under another layout, bounded memory, kill safety,
and clear errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter, save
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from pma_train.checkpoint import layout
from pma_train.merge import ema, sma, wma
from tests.launch import REPO, run_module, test_env, train

TRAIN = ["train.log_interval=1", "train.eval_interval=100", "train.eval_iters=2", "train.global_batch_size=8",
         "train.micro_batch_size=2", "train.seq_length=64", "schedule.warmup_iters=1", "checkpoint.interval=2",
         "seed=3", "train.lr=1e-2"]


def merge_cli(args: list[str], nproc: int | None = 1) -> subprocess.CompletedProcess:
    return run_module(["pma_train.cli.merge", "progress_bar=false", *args], nproc=nproc, timeout=300)


def full_tensors(ckpt_dir, scratch) -> dict[str, torch.Tensor]:
    """Independent reference: torch's own DCP tooling loads every tensor whole."""
    out = scratch / f"{abs(hash(str(ckpt_dir)))}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}


def assert_merged(output_root, inputs, weights, scratch, atol=2e-6):
    merged = full_tensors(layout.resolve_checkpoint(output_root), scratch)
    loaded = [full_tensors(path, scratch) for path in inputs]
    assert sorted(merged) == sorted(loaded[0]) and len(merged) > 10
    for key, tensor in merged.items():
        reference = sum(w * t[key].double() for w, t in zip(weights, loaded))
        assert tensor.dtype == loaded[0][key].dtype
        assert torch.allclose(tensor.double(), reference, rtol=0, atol=atol), key
    # the merge is not trivially one of its inputs
    key = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert all(not torch.equal(merged[key], t[key]) for t in loaded)


@pytest.fixture(scope="module")
def tp2pp2_run(tmp_path_factory):
    """Checkpoints at iterations 2, 4, 6 of a TP=2 x PP=2 run (4 gloo ranks)."""
    run_dir = tmp_path_factory.mktemp("tp2pp2") / "run"
    # carry_optimizer and resuming the merge under other layouts need per-parameter optimizer state.
    train(run_dir, TRAIN + ["model=tiny4", "parallel.tp=2", "parallel.pp=2", "train.iters=6", "checkpoint.optimizer_format=fully_reshardable"], nproc=4)
    return run_dir / "checkpoints"


def test_merge_equals_fp64_reference_for_1_2_3_ranks(tp2pp2_run, tmp_path):
    inputs = [tp2pp2_run / layout.iter_dir_name(i) for i in (2, 4, 6)]
    expected = {"sma": sma(3), "ema": ema(3, 0.2), "wma": wma(3)}
    for ranks in (1, 2, 3):
        prefix = tmp_path / f"merged-{ranks}"
        proc = run_module(["tests.merge_driver", str(tp2pp2_run), str(prefix), "sma", "ema:0.2", "wma"], nproc=ranks)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        for method, weights in expected.items():
            out = tmp_path / f"merged-{ranks}-{method}"
            assert len(list((out / "iter_0000006").glob("__*_0.distcp"))) == ranks  # each rank wrote its own file
            assert_merged(out, inputs, weights, tmp_path)
            provenance = json.loads((out / "iter_0000006" / "pma_merge.json").read_text())
            assert [i["weight"] for i in provenance["inputs"]] == pytest.approx(weights)
            assert layout.read_tracker(out) == 6


def test_cli_selects_by_spacing_and_merges_on_two_ranks(tp2pp2_run, tmp_path):
    out = tmp_path / "merged"
    proc = merge_cli([f"root={tp2pp2_run}", "n=2", "v_iterations=4", "method=wma", f"output={out}"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stdout
    assert_merged(out, [tp2pp2_run / "iter_0000002", tp2pp2_run / "iter_0000006"], wma(2), tmp_path)


def test_merged_checkpoint_evaluates_alike_under_other_layouts_and_resumes(tp2pp2_run, tmp_path):
    out = tmp_path / "merged"
    proc = merge_cli([f"root={tp2pp2_run}", "n=3", "method=sma", "carry_optimizer=true", f"output={out}"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = TRAIN + ["model=tiny4", f"checkpoint.load={out}", "train.iters=8", "train.eval_at_start=true"]
    tp1 = train(tmp_path / "tp1", args + [f"checkpoint.dir={tmp_path / 'tp1-ckpt'}"], nproc=1)
    tp2 = train(tmp_path / "tp2", args + [f"checkpoint.dir={tmp_path / 'tp2-ckpt'}", "parallel.tp=2",
                                          "train.exit_after_iters=1"], nproc=2)
    first_tp1, first_tp2 = tp1.records("val")[0], tp2.records("val")[0]
    assert first_tp1["step"] == first_tp2["step"] == 6  # resumed at the newest input's iteration
    assert abs(first_tp1["loss"] - first_tp2["loss"]) < 1e-5
    assert sorted(tp1.losses()) == [7, 8]  # and trained on, with the carried optimizer state


def test_inputs_with_different_layouts(tmp_path):
    """TP=2 checkpoints and TP=1 checkpoints of one run merge exactly, whichever is newest."""
    run_dir = tmp_path / "run"
    train(run_dir, TRAIN + ["parallel.tp=2", "train.iters=6", "train.exit_after_iters=4", "checkpoint.optimizer_format=fully_reshardable"], nproc=2)
    train(run_dir, TRAIN + ["train.iters=6"], nproc=1)
    ckpts = run_dir / "checkpoints"
    tp2, tp1 = ckpts / "iter_0000004", ckpts / "iter_0000006"
    for inputs in ([tp2, tp1], [tp1, tp2]):
        out = tmp_path / f"merged-{inputs[-1].name}"
        proc = merge_cli([f"inputs=[{inputs[0]},{inputs[1]}]", "method=explicit", "weights=[1,3]",
                          f"output={out}"], nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_merged(out, inputs, [0.25, 0.75], tmp_path)


# ----------------------------------------------------------------------------- synthetic inputs


def synthetic(root, iterations, rows=2048, cols=2048, seed=0, poison=None):
    """Model-free torch_dist checkpoints (the engine merges any): ~2 x rows*cols*4 bytes each."""
    paths = []
    for n, it in enumerate(iterations):
        g = torch.Generator().manual_seed(seed + n)
        state = {"layer.weight": torch.randn(rows, cols, generator=g), "layer.bias": torch.randn(cols, generator=g),
                 "embed.weight": torch.randn(cols, rows, generator=g)}
        if poison is not None and n == poison:
            state["layer.weight"][rows // 2, 3] = float("nan")
        ckpt = root / layout.iter_dir_name(it)
        ckpt.mkdir(parents=True)
        save(state, storage_writer=FileSystemWriter(str(ckpt)))
        paths.append(ckpt)
    return paths


def _summary(out):
    return json.loads(next(out.glob("iter_*/pma_merge.json")).read_text())["summary"]


def test_peak_memory_stays_within_budget_whatever_n(tmp_path):
    inputs = synthetic(tmp_path / "in", range(1, 6))  # 5 x 32 MiB
    growth = {}
    for n in (2, 5):
        out = tmp_path / f"out{n}"
        proc = merge_cli([f"inputs=[{','.join(map(str, inputs[-n:]))}]", "memory_budget_mb=8", f"output={out}"],
                         nproc=None)
        assert proc.returncode == 0, proc.stderr[-3000:]
        growth[n] = _summary(out)["peak_rss_above_start_bytes"] / 2**20
    # A naive merge holds the inputs (>= 64 MiB here); the engine stays near its 8 MiB budget.
    assert max(growth.values()) < 8 + 24, growth
    assert abs(growth[5] - growth[2]) < 12, growth


def test_killed_merge_leaves_no_checkpoint_and_rerun_succeeds(tmp_path):
    inputs = synthetic(tmp_path / "in", range(1, 5), rows=4096)
    out = tmp_path / "out"
    args = ["-m", "pma_train.cli.merge", "progress_bar=false", f"inputs=[{','.join(map(str, inputs))}]",
            "memory_budget_mb=1", f"output={out}"]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=test_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the merge is writing data
        written = list(out.glob(".tmp-merge-*/__0_0.distcp")) if out.exists() else []
        if written and written[0].stat().st_size > 2**20:
            break
        time.sleep(0.05)
    else:
        pytest.fail("merge never started writing")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert layout.list_iterations(out) == [] and layout.read_tracker(out) is None
    assert not any(layout.is_checkpoint_dir(p) for p in out.iterdir() if not p.name.startswith("."))
    rerun = merge_cli(args[3:], nproc=None)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert layout.list_iterations(out) == [4] and layout.read_tracker(out) == 4
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp")] == []


# ----------------------------------------------------------------------------- bad input


def _expect_error(args, message, code=None):
    proc = merge_cli(args, nproc=None)
    assert proc.returncode != 0 and (code is None or proc.returncode == code), proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr[-3000:]
    return proc


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    a, b = synthetic(tmp_path / "a", [1, 2], rows=64, cols=32)
    out = tmp_path / "out"
    # different names / shapes
    c = tmp_path / "c" / "iter_0000003"
    c.mkdir(parents=True)
    save({"layer.weight": torch.zeros(64, 16), "other": torch.zeros(3)}, storage_writer=FileSystemWriter(str(c)))
    proc = _expect_error([f"inputs=[{a},{c}]", f"output={out}"], "inputs differ")
    assert "lacks" in proc.stderr and "layer.weight is (64, 32)" in proc.stderr
    # truncated data file
    broken = synthetic(tmp_path / "t", [5], rows=64, cols=32)[0]
    data = next(broken.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])
    _expect_error([f"inputs=[{a},{broken}]", f"output={out}"], f"data file {data.name} is truncated")
    # weights
    _expect_error([f"inputs=[{a},{b}]", "method=explicit", "weights=[1,nan]", f"output={out}"], "finite", code=2)
    _expect_error([f"inputs=[{a},{b}]", "method=explicit", "weights=[-1,2]", f"output={out}"], "negative", code=2)
    _expect_error([f"inputs=[{a},{b}]", "method=explicit", "weights=[1,-1]", "allow_negative_weights=true",
                   f"output={out}"], "sum to 0", code=2)
    # selection
    _expect_error([f"root={tmp_path / 'a'}", "n=3", f"output={out}"], "3 checkpoints requested", code=2)
    _expect_error([f"root={tmp_path / 'a'}", "n=2", "v_iterations=5", f"output={out}"], "no checkpoint at", code=2)
    # NaN in an input
    poisoned = synthetic(tmp_path / "p", [7, 8], rows=64, cols=32, poison=0)
    _expect_error([f"inputs=[{poisoned[0]},{poisoned[1]}]", f"output={out}"],
                  f"tensor layer.weight in {poisoned[0]} holds NaN or Inf")
    assert not out.exists() or layout.list_iterations(out) == []
    # an existing output is not replaced
    ok = merge_cli([f"inputs=[{a},{b}]", f"output={out}"], nproc=None)
    assert ok.returncode == 0, ok.stderr
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "iter_0000002").iterdir())
    _expect_error([f"inputs=[{a},{b}]", f"output={out}"], "exists (pass overwrite=true")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "iter_0000002").iterdir()) == before


def test_dry_run_prints_selection_only(tmp_path):
    a, b = synthetic(tmp_path / "a", [1, 2], rows=8, cols=8)
    proc = merge_cli([f"root={tmp_path / 'a'}", "n=2", "method=wma", "dry_run=true"], nproc=None)
    assert proc.returncode == 0, proc.stderr
    assert "0.33333" in proc.stdout and "0.66667" in proc.stdout and str(b) in proc.stdout
    assert not (tmp_path / "a" / "merged").exists()


def test_in_job_average_equals_offline_merge(tmp_path):
    """average_into_model (each TP rank reads its own shards into the live model) gives exactly the
    offline engine's result on the same checkpoints."""
    run_dir = tmp_path / "run"
    train(run_dir, TRAIN + ["train.iters=6"], nproc=1)
    ckpts = run_dir / "checkpoints"
    offline = tmp_path / "offline"
    proc = merge_cli([f"root={ckpts}", "n=3", "method=sma", f"output={offline}"], nproc=None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    live = tmp_path / "live.json"
    proc = run_module(["tests.dist_checks", "live", str(live), "2", str(ckpts), "3"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(live.read_text())["iterations"] == [2, 4, 6]
    got = full_tensors(tmp_path / "live", tmp_path)
    want = full_tensors(layout.resolve_checkpoint(offline), tmp_path)
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-7), key
