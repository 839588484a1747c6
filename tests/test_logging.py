"""Metrics: the JSONL file is complete, and wandb in offline mode writes a run with the same keys."""

from __future__ import annotations

import pytest

from tests.launch import train
from pma_train.train.flops import device_peak
from tests.test_plan import megatron_lm_flops_per_token, plan_for


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
    assert flops_per_token == pytest.approx(megatron_lm_flops_per_token(32), rel=1e-9)
    assert "mfu" not in train_rows[0]  # no GPU peak to compare with on CPU
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "run").rglob("*"))[:20]
    # The offline run file is wandb's record log (protobuf records): the metric keys are in it.
    records = (runs[0] / f"run-{runs[0].name.split('-')[-1]}.wandb").read_bytes()
    for key in (b"train/loss", b"train/grad_norm", b"train/tokens_per_s", b"train/tflops_per_rank", b"val/loss"):
        assert key in records, key


@pytest.mark.parametrize("name, label, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.0),
    ("NVIDIA H200", "H200 SXM", 989.0),
    ("NVIDIA H200 NVL", "H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", "GH200", 989.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100-SXM4-40GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA B200", "B200", 2250.0),
    ("NVIDIA L4", "L4", 121.0),
])
def test_peak_by_device_name(name, label, tflops):
    peak = device_peak(name)
    assert peak is not None and (peak.label, peak.tflops) == (label, tflops), (name, peak)


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-32GB", "NVIDIA A10", "AMD Instinct MI300X", ""])
def test_unknown_devices_have_no_peak(name):
    assert device_peak(name) is None  # no MFU for them: TFLOP/s only
