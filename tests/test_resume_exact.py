"""Resumed runs continue bit for bit: with dropout (every RNG of every rank restored, and nothing
between a checkpoint and the next step shifts them), and from a `pma-merge carry_optimizer=true`
output (the optimizer's fp32 main parameters are the merge, not the newest input's)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from pma_train.checkpoint import layout
from pma_train.merge import sma
from tests.launch import run_module, train

# Evaluations (at 3, 6) fall between checkpoints (2, 4, 6): a run resumed at 4 never made the
# evaluation at 3, and makes one at 4 (eval_at_start) that the uninterrupted run did not.
COMMON = ["train.iters=6", "train.log_interval=1", "train.eval_interval=3", "train.eval_iters=1",
          "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=64",
          "schedule.warmup_iters=1", "checkpoint.interval=2", "seed=5", "train.lr=1e-2",
          "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
MAIN_PARAM = "optimizer.state.param."


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache):
    """One rank, fp32, dropout 0.1, checkpoints at 2, 4, 6 (per-parameter optimizer state: the merges
    below carry it)."""
    return train(tmp_path_factory.mktemp("single") / "run", COMMON + ["checkpoint.optimizer_format=fully_reshardable"], nproc=1, cache_dir=cache)


@pytest.fixture(scope="module")
def dp2_bf16(tmp_path_factory, cache):
    """Two data-parallel ranks (distributed optimizer), bf16 with fp32 main params, dropout 0.1."""
    return train(tmp_path_factory.mktemp("dp2") / "run", COMMON + ["train.precision=bf16", "checkpoint.optimizer_format=fully_reshardable"], nproc=2,
                 cache_dir=cache)


def _resume(source, tmp_path, cache, nproc, extra=(), name="resumed"):
    return train(tmp_path / name, COMMON + list(extra) + [f"checkpoint.load={source}",
                                                          f"checkpoint.dir={tmp_path / name / 'ckpt'}"],
                 nproc=nproc, cache_dir=cache)


def _after(values: dict, step: int) -> dict:
    return {k: v for k, v in values.items() if k > step}


@pytest.mark.parametrize("run,nproc,extra", [("single", 1, []), ("dp2_bf16", 2, ["train.precision=bf16"])],
                         ids=["1rank-fp32", "dp2-bf16"])
def test_resume_with_dropout_is_bit_exact(request, tmp_path, cache, run, nproc, extra):
    full = request.getfixturevalue(run)
    resumed = _resume(full.run_dir / "checkpoints" / layout.iter_dir_name(4), tmp_path, cache, nproc,
                      extra + ["train.eval_at_start=true"])
    assert "start iteration 4" in resumed.output
    assert sorted(resumed.losses()) == [5, 6]
    assert resumed.losses() == _after(full.losses(), 4)  # exactly
    assert _after(resumed.val_losses(), 4) == _after(full.val_losses(), 4) and 6 in resumed.val_losses()


def _tensors(ckpt_dir, scratch) -> dict[str, torch.Tensor]:
    out = scratch / f"{abs(hash(str(ckpt_dir)))}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


def assert_main_params_merged(output, inputs, weights, scratch) -> None:
    """Main params = an fp64 weighted sum of the inputs' main params; model weights = them, cast;
    moments of the newest input."""
    merged = _tensors(layout.resolve_checkpoint(output), scratch)
    loaded = [_tensors(path, scratch) for path in inputs]
    mains = [k for k in merged if k.startswith(MAIN_PARAM)]
    assert len(mains) > 10
    for key in mains:
        reference = sum(w * t[key].double() for w, t in zip(weights, loaded))
        assert torch.allclose(merged[key].double(), reference, rtol=0, atol=2e-6), key
        weight = merged[key[len(MAIN_PARAM):]]
        assert torch.equal(weight, merged[key].to(weight.dtype)), key
    assert not torch.equal(merged[mains[0]], loaded[-1][mains[0]])
    moment = "optimizer.state.exp_avg_sq." + mains[0][len(MAIN_PARAM):]
    assert torch.equal(merged[moment], loaded[-1][moment])


def _merge(root, output, n: int, end: int) -> None:
    proc = run_module(["pma_train.cli.merge", "progress_bar=false", f"root={root}", f"n={n}", "v_iterations=2",
                       f"end_iteration={end}", "method=sma", "carry_optimizer=true", f"output={output}"],
                      nproc=None, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_carried_optimizer_resumes_from_the_merge(single, tmp_path, cache):
    ckpts = single.run_dir / "checkpoints"
    newest, merged = ckpts / layout.iter_dir_name(4), tmp_path / "merged"
    _merge(ckpts, merged, 2, 4)
    assert_main_params_merged(merged, [ckpts / layout.iter_dir_name(2), newest], sma(2), tmp_path)

    resumed = _resume(merged, tmp_path, cache, 1, ["train.eval_at_start=true", "train.exit_after_iters=1"])
    # From the newest input the run goes on exactly as the uninterrupted one (test above).
    assert resumed.losses()[5] != single.losses()[5]

    report = tmp_path / "eval.json"
    proc = run_module(["pma_train.cli.eval", *COMMON, f"run.dir={tmp_path / 'eval'}",
                       f"checkpoints=[{merged},{newest}]", f"output={report}"], nproc=None, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    of_merge, of_newest = (row["val_loss"] for row in json.loads(report.read_text()))
    assert resumed.val_losses()[4] == pytest.approx(of_merge, abs=1e-6)
    assert abs(of_merge - of_newest) > 1e-4


def test_dp2_bf16_merge_carries_the_merged_fp32_main_params(dp2_bf16, tmp_path):
    """Mixed precision: main params averaged from the inputs' fp32 copies, bf16 weights cast from them."""
    ckpts, merged = dp2_bf16.run_dir / "checkpoints", tmp_path / "merged"
    _merge(ckpts, merged, 3, 6)
    assert_main_params_merged(merged, [ckpts / layout.iter_dir_name(i) for i in (2, 4, 6)], sma(3), tmp_path)


def test_bf16_without_the_distributed_optimizer_saves_and_resumes_exactly(tmp_path, cache):
    # megatron's plain mixed-precision optimizer maps only bf16 parameters in its checkpoint: every
    # parameter (norms included) must be bf16, or the first save fails.
    args = ["train.iters=4", "train.log_interval=1", "train.eval_interval=100", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.seq_length=32", "checkpoint.interval=2", "seed=5",
            "train.precision=bf16", "parallel.use_distributed_optimizer=false",
            "data.prefetch=2"]  # read-ahead (off by default on CPU) keeps resumes exact: it counts what the step took
    full = train(tmp_path / "full", args, nproc=1, cache_dir=cache)
    resumed = train(tmp_path / "resumed", args + [f"checkpoint.load={full.run_dir / 'checkpoints' / layout.iter_dir_name(2)}",
                                                  f"checkpoint.dir={tmp_path / 'resumed' / 'ckpt'}"],
                    nproc=1, cache_dir=cache)
    assert "start iteration 2" in resumed.output and sorted(resumed.losses()) == [3, 4]
    assert resumed.losses() == _after(full.losses(), 2)


def test_dp2_ranks_share_the_writing_of_replicated_weights(dp2_bf16):
    """Every weight the DP replicas share is written once, by one of them, spread by size (Megatron-LM's
    fully parallel save): neither rank writes most of the checkpoint, so neither stages most of it."""
    ckpt = dp2_bf16.run_dir / "checkpoints" / layout.iter_dir_name(6)
    sizes = sorted(p.stat().st_size for p in ckpt.glob("__*_0.distcp"))
    assert len(sizes) == 2
    assert sizes[1] / sizes[0] < 1.2, sizes
