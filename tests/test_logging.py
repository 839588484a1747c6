"""Metrics: the JSONL file is complete, and wandb in offline mode writes a run with the same keys."""

from __future__ import annotations

import pytest

from tests.launch import train
from tests.test_plan import plan_for


def test_jsonl_and_wandb_offline(tmp_path):
    shape = ["train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_length=32"]
    run = train(tmp_path / "run", ["train.iters=4", "train.log_interval=2", "train.eval_interval=4", "train.eval_iters=1",
                                   *shape, "schedule.warmup_iters=1", "checkpoint.interval=100",
                                   "checkpoint.save_at_end=false", "logging.wandb.mode=offline"], nproc=None)
    train_rows = run.records("train")
    assert [r["step"] for r in train_rows] == [2, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_s", "consumed_tokens", "time_fwd_bwd_s",
                "time_optimizer_s", "time_data_s"):
        assert key in train_rows[0], key
    assert run.records("val")[0]["step"] == 4
    # Model FLOPs come from the trained model's own modules; pma-plan counts them on a meta build.
    flops_per_token = train_rows[0]["tflops_per_rank"] * 1e12 / train_rows[0]["tokens_per_s"]
    assert flops_per_token == pytest.approx(plan_for(shape)["flops"]["per_token"]["total"], rel=1e-9)
    assert "mfu" not in train_rows[0]  # no GPU peak to compare with on CPU
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "run").rglob("*"))[:20]
    # The offline run file is wandb's record log (protobuf records): the metric keys are in it.
    records = (runs[0] / f"run-{runs[0].name.split('-')[-1]}.wandb").read_bytes()
    for key in (b"train/loss", b"train/grad_norm", b"train/tokens_per_s", b"train/tflops_per_rank", b"val/loss"):
        assert key in records, key
