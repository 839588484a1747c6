"""checkpoint.optimizer_format=dp_reshardable (the default): each rank saves and loads its own
optimizer shard in place. A resume at the same layout is bit for bit the uninterrupted run; a resume
under another TP layout, or a merge that would carry that state, stops with an error naming the cause
and the fix before anything is written."""

from __future__ import annotations

import json

import pytest

from pma_train.checkpoint import layout, optimizer_format
from tests.launch import run_module, train

COMMON = ["train.iters=4", "train.log_interval=1", "train.eval_interval=100", "train.eval_iters=1",
          "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=64",
          "schedule.warmup_iters=1", "checkpoint.interval=2", "seed=7", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def dp2(tmp_path_factory, cache):
    """Two data-parallel ranks (distributed optimizer), fp32, checkpoints at 2 and 4."""
    return train(tmp_path_factory.mktemp("dp2") / "run", COMMON, nproc=2, cache_dir=cache)


def test_dp_reshardable_is_the_default_and_recorded(dp2):
    ckpt = dp2.run_dir / "checkpoints" / layout.iter_dir_name(2)
    assert optimizer_format.detect(ckpt) == "dp_reshardable"
    saved = json.loads((ckpt / layout.TRAIN_STATE_SIDECAR).read_text())[optimizer_format.SIDECAR_KEY]
    assert saved["format"] == "dp_reshardable"
    assert saved["layout"] == {"tp": 1, "pp": 1, "ep": 1, "vpp": 1, "dp": 2}
    assert len(saved["buckets"]) == 1  # one model-parallel domain, every rank agrees on its buckets


def test_resume_at_dp2_is_bit_exact_and_another_layout_is_refused(dp2, tmp_path, cache):
    ckpt = dp2.run_dir / "checkpoints" / layout.iter_dir_name(2)
    resumed = train(tmp_path / "same", COMMON + [f"checkpoint.load={ckpt}", f"checkpoint.dir={tmp_path / 'c1'}"],
                    nproc=2, cache_dir=cache)
    assert "start iteration 2" in resumed.output
    assert resumed.losses() == {k: v for k, v in dp2.losses().items() if k > 2}  # exactly

    refused = train(tmp_path / "tp2", COMMON + [f"checkpoint.load={ckpt}", f"checkpoint.dir={tmp_path / 'c2'}",
                                                "parallel.tp=2"], nproc=2, cache_dir=cache, check=False)
    assert refused.returncode != 0
    assert "optimizer state is dp_reshardable" in refused.output and "TP=1 (now 2)" in refused.output
    assert "checkpoint.optimizer_format=fully_reshardable" in refused.output, refused.output[-3000:]
    assert "pma-train: configuration error" in refused.output  # before any process group or model exists
    assert not refused.losses() and not list((tmp_path / "c2").glob("iter_*"))


def test_merge_refuses_to_carry_dp_reshardable_state(dp2, tmp_path):
    proc = run_module(["pma_train.cli.merge", "progress_bar=false", f"root={dp2.run_dir / 'checkpoints'}", "n=2",
                       "method=sma", "carry_optimizer=true", f"output={tmp_path / 'merged'}"], nproc=None, timeout=300)
    assert proc.returncode != 0
    assert "dp_reshardable optimizer state" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert not (tmp_path / "merged" / layout.iter_dir_name(4)).exists()
