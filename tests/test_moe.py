"""Mixture-of-Experts with expert parallelism: EP=2 trains like EP=1, its checkpoints reshard across
EP, and pma-merge averages them exactly."""

from __future__ import annotations

import pytest

from pma_train.checkpoint import layout
from pma_train.merge import ema, sma, wma
from tests.launch import train
from tests.test_merge import assert_merged, merge_cli
from tests.test_plan import MEGATRON_FLOPS_SEQ64

STEPS = 10
MOE = ["model=tiny_moe", f"train.iters={STEPS}", "train.log_interval=1", "train.eval_interval=5", "train.eval_iters=2",
       "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=64", "schedule.warmup_iters=2",
       "checkpoint.interval=2", "seed=11", "model.moe_z_loss_coeff=1e-3"]


def assert_same_router_metrics(a, b):
    """Aux / z-loss and per-layer expert load are logged for the whole model, whatever the layout."""
    ra, rb = a.records("train"), b.records("train")
    assert len(ra) == len(rb) == STEPS
    for x, y in zip(ra, rb):
        for key in ("moe_load_balancing_loss", "moe_z_loss"):
            assert abs(x[key] - y[key]) < 1e-3 * abs(x[key]), (key, x[key], y[key])
        assert sorted(x["moe_expert_load"]) == sorted(y["moe_expert_load"]) == ["2", "4"]  # "*E*E": layers 2, 4
        for layer, fractions in x["moe_expert_load"].items():
            assert sum(fractions) == pytest.approx(1.0, abs=1e-4)
            assert fractions == pytest.approx(y["moe_expert_load"][layer], abs=0.01)
    assert ra[0]["moe_load_balancing_loss"] > 0.9  # ~1 when balanced, the aux loss's minimum


@pytest.fixture(scope="module")
def ep1(tmp_path_factory):
    # Resumed at EP=2 below: the optimizer state must be fully reshardable.
    return train(tmp_path_factory.mktemp("ep1") / "run", MOE + ["checkpoint.optimizer_format=fully_reshardable"], nproc=1)


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    return train(tmp_path_factory.mktemp("ep2") / "run", MOE + ["parallel.ep=2", "checkpoint.optimizer_format=fully_reshardable"], nproc=2)


def test_ep2_matches_ep1(ep1, ep2):
    assert "ep 2" in ep2.output
    a, b = ep1.losses(), ep2.losses()
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert max(abs(a[k] - b[k]) for k in a) < 2e-4, (a, b)
    assert a[STEPS] < a[1] - 1.0
    assert_same_router_metrics(ep1, ep2)


def test_trainer_flops_are_megatron_lms(ep1, ep2):
    """The trainer's FLOPs per token (from its own modules, any EP) are Megatron-LM's for this MoE."""
    for run, world in ((ep1, 1), (ep2, 2)):
        row = run.records("train")[0]
        per_token = row["tflops_per_rank"] * 1e12 * world / row["tokens_per_s"]
        assert per_token == pytest.approx(MEGATRON_FLOPS_SEQ64["tiny_moe"], rel=1e-9), (world, per_token)


def test_ep2_checkpoint_evaluates_the_same_at_ep1_and_back(ep1, ep2, tmp_path):
    for source, nproc, extra in ((ep2, 1, []), (ep1, 2, ["parallel.ep=2"])):
        ckpt = source.run_dir / "checkpoints" / "iter_0000010"
        run = train(tmp_path / f"from-{nproc}", MOE + extra + [f"checkpoint.load={ckpt}", "train.eval_at_start=true",
                                                                 f"checkpoint.dir={tmp_path / f'c{nproc}'}"], nproc=nproc)
        first = run.records("val")[0]
        assert first["step"] == STEPS
        assert abs(first["loss"] - source.val_losses()[STEPS]) < 1e-5


@pytest.mark.parametrize("method, weights", [("sma", sma(3)), ("ema", ema(3, 0.1)), ("wma", wma(3))])
def test_merge_of_ep2_checkpoints_equals_reference(ep2, tmp_path, method, weights):
    root = ep2.run_dir / "checkpoints"
    out = tmp_path / "merged"
    proc = merge_cli([f"root={root}", "n=3", "v_iterations=4", f"method={method}", "alpha=0.1", f"output={out}"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    inputs = [root / layout.iter_dir_name(i) for i in (2, 6, 10)]
    assert_merged(out, inputs, weights, tmp_path)


@pytest.mark.parametrize("layout_args", [["parallel.ep=2", "parallel.tp=2"], ["parallel.ep=2", "parallel.pp=2"]],
                         ids=["ep2-tp2", "ep2-pp2"])
def test_ep_with_tp_or_pp_trains_like_ep1(ep1, tmp_path, layout_args):
    run = train(tmp_path / "run", MOE + layout_args + ["checkpoint.interval=100", "checkpoint.save_at_end=false"], nproc=4)
    a, b = ep1.losses(), run.losses()
    assert sorted(b) == list(range(1, STEPS + 1))
    assert max(abs(a[k] - b[k]) for k in a) < 2e-4, (a, b)
    assert b[STEPS] < b[1] - 1.0
    assert_same_router_metrics(ep1, run)
