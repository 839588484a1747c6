"""pma-plan: every preset in model_configs/ is planned from the real (meta-device) megatron-core model;
its counts match the preset's name and YAML comments; bad layouts fail with the field named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pma_train.config import ConfigError
from tests.launch import REPO, test_env

MODEL_CONFIGS = REPO / "model_configs"
PRESETS = sorted(path.stem for path in MODEL_CONFIGS.glob("*.yaml"))
# Tiny CPU presets: the totals their YAML comments derive.
TINY_TOTALS = {"tiny": 467_584, "tiny4": 836_736, "tiny_moe": 591_488}
_SIZE = r"(\d+(?:\.\d+)?)([mb])"


def sizes_from_name(name: str) -> tuple[float, float] | None:
    """(activated, total) parameters a paper preset's name promises: dense_411m, moe_1.3b_13b."""
    value = lambda num, unit: float(num) * (1e6 if unit == "m" else 1e9)
    dense = re.fullmatch(rf"dense_{_SIZE}", name)
    if dense:
        return value(*dense.groups()), value(*dense.groups())
    moe = re.fullmatch(rf"moe_{_SIZE}_{_SIZE}", name)
    if moe:
        a, b, c, d = moe.groups()
        return value(a, b), value(c, d)
    return None


def commented(name: str, what: str) -> int | None:
    """The exact count a paper preset's YAML comment derives ('total = ... = N', 'activated = ... = N')."""
    lines = (MODEL_CONFIGS / f"{name}.yaml").read_text().splitlines()
    comments = "\n".join(line for line in lines if line.startswith("#"))
    match = re.search(rf"{what} = [^=]*= ([\d,]+)", comments)
    return int(match.group(1).replace(",", "")) if match else None


def layout(name: str) -> list[str]:
    """A layout that splits every preset over TP, PP (and EP) ranks: counts must not depend on it."""
    if name.startswith("tiny"):
        return {"tiny": [], "tiny4": ["parallel.pp=2", "parallel.vpp=2", "plan.gpus=2"],
                "tiny_moe": ["parallel.tp=2", "parallel.ep=2", "plan.gpus=4"]}.get(name, [])
    moe = name.startswith("moe_")
    return ["parallel.tp=2", "parallel.pp=2", f"parallel.ep={4 if moe else 1}", f"plan.gpus={16 if moe else 8}",
            "train.global_batch_size=64", "train.micro_batch_size=2", "train.seq_length=4096"]


def megatron_lm_flops_per_token(seq: int, vocab: int = 384, h: int = 128, heads: int = 4, kv: int = 32, groups: int = 2,
                                ffn: int = 352, attention_layers: int = 2, dense_layers: int = 2, moe_layers: int = 0,
                                topk: int = 0, moe_ffn: int = 0, shared_ffn: int = 0) -> float:
    """Megatron-LM's `num_floating_point_operations` (megatron/training/training.py) for a GQA SwiGLU
    GPT, per token of a BSHD batch, written out independently: every GEMM 3 times (forward, wgrad,
    dgrad) at 2 FLOPs per multiply-add; QKV + output projections; the score and value products
    halved for the causal mask; SwiGLU MLP (3 matrices); routed experts x top-k and shared experts;
    the logits. No router, no norms, no embedding lookup. Defaults: the tiny preset."""
    gemm = 3 * 2
    q, k_v = heads * kv, groups * kv
    projections = gemm * (h * (q + 2 * k_v) + q * h)
    core = gemm * q * seq / 2 * 2  # causal: half of QK^T and of softmax(QK^T) V
    mlp = gemm * h * ffn * 3
    moe = gemm * h * (moe_ffn * topk + shared_ffn) * 3
    logits = gemm * h * vocab
    return attention_layers * (projections + core) + dense_layers * mlp + moe_layers * moe + logits


# Hand-computed from Megatron-LM's formula (seq 64): tiny = 2 x (294,912 projections + 811,008 MLP
# + 49,152 causal attention) + 294,912 logits; tiny_moe = 2 x (294,912 + 589,824 (2 of 4 experts,
# FFN 128) + 49,152) + 294,912.
MEGATRON_FLOPS_SEQ64 = {"tiny": 2_605_056, "tiny_moe": 2_162_688}
TINY_MOE = dict(dense_layers=0, moe_layers=2, topk=2, moe_ffn=128)


def plan_for(overrides: list[str]) -> dict:
    from pma_train.cli.plan import compose
    from pma_train.plan import make_plan

    return make_plan(compose(overrides))


def test_every_preset_is_a_paper_size_or_tiny():
    assert set(TINY_TOTALS) <= set(PRESETS)
    for name in PRESETS:
        assert name.startswith("tiny") or sizes_from_name(name), f"model_configs/{name}.yaml: name does not say its size"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_counts(name):
    plan = plan_for([f"model={name}", *layout(name)])
    params = plan["parameters"]
    assert plan["model"] == name
    if name.startswith("tiny"):
        assert plan["vocab_size"] == 257 and plan["padded_vocab_size"] == 384  # byte tokenizer
        assert params["total"] == TINY_TOTALS.get(name, params["total"]) > 0
        if name == "tiny_moe":  # 2 of 4 experts of 2 layers: 591,488 - 2 * 2 * 49,152
            assert params["activated"] == 394_880
        return
    activated, total = sizes_from_name(name)
    assert plan["vocab_size"] == 152_064  # assumed by the preset (model.notes)
    assert abs(params["total"] / total - 1) < 0.05, (name, params["total"])
    assert abs(params["activated"] / activated - 1) < 0.05, (name, params["activated"])
    assert params["total"] == commented(name, "total")
    if name.startswith("moe_"):
        assert params["activated"] == commented(name, "activated")
        assert 8 < params["total"] / params["activated"] < 12
    else:
        assert params["activated"] == params["total"]
    # One GPU of each stage holds a TP (and EP) share of it: together less than the model.
    assert sum(rank["params"] for rank in plan["memory"]["ranks"]) < params["total"]


def test_reduced_build_equals_full_build():
    """One layer of each kind, multiplied, counts what building every layer counts."""
    overrides = ["model=moe_330m_3.3b", "parallel.tp=2", "parallel.pp=4", "parallel.ep=8", "plan.gpus=64",
                 "train.global_batch_size=64"]
    reduced = plan_for(overrides)
    full = plan_for([*overrides, "plan.full_build=true"])
    assert full["build"]["full"] and not reduced["build"]["full"]
    assert reduced["parameters"] == full["parameters"]
    assert [r["params"] for r in reduced["memory"]["ranks"]] == [r["params"] for r in full["memory"]["ranks"]]
    # ... and the layout does not change the model.
    assert plan_for(["model=moe_330m_3.3b"])["parameters"]["total"] == reduced["parameters"]["total"]


def test_memory_and_flops_arithmetic():
    plan = plan_for(["model=tiny", "plan.gpus=2", "train.global_batch_size=32", "train.micro_batch_size=4",
                     "train.seq_length=64"])
    n = 467_584
    (rank,) = plan["memory"]["ranks"]
    # bf16 weights, fp32 gradient buffers, fp32 main params + Adam moments sharded over DP 2.
    assert (rank["weights_bytes"], rank["grads_bytes"], rank["optimizer_bytes"]) == (2 * n, 4 * n, 12 * n / 2)
    assert plan["batch"]["tokens_per_step"] == 32 * 64 and plan["batch"]["microbatches_per_step"] == 4
    # Matrix weights: all but the input embedding (384 x 128) and the 5 norms (128 each).
    matmul = n - 384 * 128 - 5 * 128
    assert plan["flops"]["matmul_params_activated"] == matmul
    assert plan["flops"]["per_token"]["total"] == 6 * matmul + 6 * 2 * 64 * 128  # causal attention
    assert rank["activation_bytes"] > 0 and rank["microbatches_in_flight"] == 1


def test_host_memory_per_rank():
    """GPU job: the save stages what the rank writes (its 1/DP of the replicated weights); fully_reshardable gathers the DP group's optimizer
    state on every rank; the tracker keeps n snapshots of the rank's 1/DP share, plus the live share and
    one gather buffer while the merge is evaluated."""
    n, base = 467_584, 0.8 * 2**30
    args = ["model=tiny", "plan.gpus=2", "train.global_batch_size=32", "train.micro_batch_size=4"]
    (rank,) = plan_for(args)["memory"]["ranks"]
    assert rank["host_bytes"] == {"training": base, "save": base + 2 * n / 2 + 12 * n / 2, "resume": base, "tracker": 0}
    (rank,) = plan_for(args + ["checkpoint.optimizer_format=fully_reshardable", "track.enabled=true",
                               "track.n=3"])["memory"]["ranks"]
    assert rank["host_bytes"] == {"training": base, "save": base + 2 * n / 2 + 12 * n / 2 + 12 * n / 2 + 12 * n,
                                  "resume": base + 12 * n, "tracker": (3 * 4 + 2) * n / 2 + 64 * 2**20}
    (rank,) = plan_for(args + ["track.enabled=true", "track.n=3", "track.dtype=bf16"])["memory"]["ranks"]
    assert rank["host_bytes"]["tracker"] == (3 * 2 + 2) * n / 2 + 64 * 2**20
    # track.storage=disk: the snapshots and the live share are files; the host holds the buffers
    (rank,) = plan_for(args + ["track.enabled=true", "track.n=3", "track.storage=disk", "track.buffer_mb=16"])["memory"]["ranks"]
    assert rank["host_bytes"]["tracker"] == 16 * 2**20 * (1 + 3 / 2) and rank["tracker_disk_bytes"] == (3 * 4 + 2) * n / 2
    # CPU job: the training state is host memory; the writer clones the views it writes.
    (rank,) = plan_for(args + ["plan.device=cpu", "train.precision=fp32"])["memory"]["ranks"]
    assert rank["host_bytes"]["training"] == base + rank["total_bytes"]
    assert rank["host_bytes"]["save"] == base + rank["total_bytes"] + 4 * n / 2 + 4 * n / 2


def test_flops_per_token_are_megatron_lms():
    """pma-plan's count (from the parameters of the meta-built model) equals Megatron-LM's formula,
    dense and MoE, whatever the layout."""
    assert megatron_lm_flops_per_token(64) == MEGATRON_FLOPS_SEQ64["tiny"]
    assert megatron_lm_flops_per_token(64, **TINY_MOE) == MEGATRON_FLOPS_SEQ64["tiny_moe"]
    shape = ["train.seq_length=64", "train.global_batch_size=32", "train.micro_batch_size=4"]
    for name, extra, layout_args in (("tiny", {}, []), ("tiny_moe", TINY_MOE, ["parallel.ep=2", "plan.gpus=2"]),
                                     ("tiny_moe", TINY_MOE, ["parallel.tp=2", "parallel.ep=2", "plan.gpus=4"])):
        per_token = plan_for([f"model={name}", *shape, *layout_args])["flops"]["per_token"]
        assert per_token["total"] == MEGATRON_FLOPS_SEQ64[name], (name, layout_args, per_token)
    # A shared expert and a longer sequence: the same formula.
    shared = plan_for(["model=tiny_moe", "model.moe_shared_expert_intermediate_size=96", "train.seq_length=128",
                       "model.max_position_embeddings=128"])
    assert shared["flops"]["per_token"]["total"] == megatron_lm_flops_per_token(128, **TINY_MOE, shared_ffn=96)


@pytest.mark.parametrize("overrides, field", [
    (["model=moe_1.3b_13b", "parallel.ep=3", "plan.gpus=6"], "parallel.ep"),  # 3 does not divide 128 experts
    (["model=moe_1.3b_13b", "parallel.ep=8", "plan.gpus=4"], "parallel.ep"),  # 8 does not divide DP 4
    (["model=dense_411m", "parallel.tp=3", "plan.gpus=3"], "parallel.tp"),  # 16 heads
    (["model=dense_8b", "parallel.tp=16", "plan.gpus=16"], "parallel.tp"),  # 8 query groups
    (["model=dense_2b", "parallel.pp=3", "plan.gpus=3"], "parallel.pp"),  # 28 blocks
    (["model=dense_2b", "parallel.tp=2", "plan.gpus=3"], "parallel"),  # world 3, tp 2
    (["model=tiny_moe", "parallel.tp=2", "model.moe_ffn_hidden_size=129", "plan.gpus=2"], "parallel.tp"),
    (["model=tiny", "parallel.tp=2", "train.seq_length=127", "plan.gpus=2"], "train.seq_length"),
    (["model=tiny", "plan.gpus=0"], "plan.gpus"),
    (["model=tiny", "plan.vocab_size=0"], "plan.vocab_size"),
])
def test_bad_layout_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        plan_for(overrides)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_cli_error_exit_code(capsys):
    from pma_train.cli.plan import compose, run

    with pytest.raises(SystemExit) as exit_info:
        run(compose(["model=moe_1.3b_13b", "parallel.ep=3", "plan.gpus=6"]))
    assert exit_info.value.code == 2
    message = "pma-plan: configuration error: parallel.ep: 3 does not divide model.num_experts=128"
    assert message in capsys.readouterr().err


def test_cli_plans_200b_moe(tmp_path):
    """The command itself: a 200B MoE on 512 GPUs, table on stdout, JSON on request, in seconds."""
    script = Path(sys.executable).with_name("pma-plan")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pma_train.cli.plan"]
    out = tmp_path / "plan.json"
    proc = subprocess.run([*command, "model=moe_20b_200b", "plan.gpus=512", "parallel.tp=8", "parallel.pp=4",
                           "parallel.ep=8", "train.seq_length=4096", "train.global_batch_size=1024",
                           "train.micro_batch_size=1", f"plan.json={out}"],
                          cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(out.read_text())
    total, activated = plan["parameters"]["total"], plan["parameters"]["activated"]
    assert f"total {total:,}" in proc.stdout and f"activated per token {activated:,}" in proc.stdout
    assert total == commented("moe_20b_200b", "total")
    assert plan["layout"] == {"gpus": 512, "tp": 8, "pp": 4, "vpp": None, "ep": 8, "expert_tp": 8, "dp": 16,
                              "expert_dp": 2, "sequence_parallel": True, "distributed_optimizer": True}
    assert len(plan["memory"]["ranks"]) == 4 and plan["batch"]["tokens_per_step"] == 1024 * 4096
    assert plan["build"]["seconds"] > 0  # reported; how long it may take is a benchmark's business, not a test's


def _verdict(check) -> str | None:
    try:
        check()
    except ConfigError as err:
        return str(err)
    return None


def test_pma_plan_and_pma_train_judge_a_job_alike(tmp_path):
    """One validator: each job below is refused by pma-plan and by pma-train's pre-start check with the
    same message (or accepted by both). Before, pma-plan alone refused the shapes of the first four,
    pma-train alone (after its process groups) the decay window, pma-train alone load + init_from,
    and pma-plan alone an annealing branch (it forgot checkpoint.load)."""
    from pma_train.cli.plan import compose
    from pma_train.config import validate
    from pma_train.plan import check

    for name in ("main", "other"):
        (tmp_path / name).mkdir()
    main, other = tmp_path / "main", tmp_path / "other"
    cases = [
        (["model.hidden_size=130"], "model.num_attention_heads: 4 does not divide hidden_size=130"),
        (["model=tiny_moe", "model.moe_router_topk=5"], "model.moe_router_topk: 5 is not in [1, num_experts=4]"),
        (["model=tiny_moe", "parallel.tp=2", "model.moe_ffn_hidden_size=129"], "parallel.tp: 2 does not divide"),
        (["parallel.tp=2", "train.seq_length=127"], "train.seq_length: 127 is not a multiple of parallel.tp=2"),
        (["schedule=wsd", "schedule.decay_iters=581"], "schedule.decay_iters: gives a decay of 581 iterations"),
        ([f"checkpoint.load={main}", f"checkpoint.init_from={other}"], "checkpoint.init_from: give checkpoint.load"),
        (["schedule=anneal", f"checkpoint.load={main}", f"checkpoint.dir={other}"], None),
    ]
    for overrides, expected in cases:
        job = compose(overrides)
        planned = _verdict(lambda: check(job, job.plan))
        gpus = job.plan.gpus or job.parallel.tp * job.parallel.pp * job.parallel.ep
        trained = _verdict(lambda: validate(job, world_size=gpus))
        assert planned == trained, (overrides, planned, trained)
        assert (trained is None) if expected is None else trained.startswith(expected), (overrides, trained)


def test_pma_train_refuses_what_pma_plan_refuses_before_starting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pma_train.cli.train", "model=tiny_moe", "model.moe_router_topk=5",
                           f"run.dir={tmp_path / 'run'}"], cwd=REPO, env=test_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error: model.moe_router_topk: 5 is not in [1, num_experts=4]" in proc.stderr
    assert not (tmp_path / "run").exists() and "megatron" not in proc.stderr.lower()
