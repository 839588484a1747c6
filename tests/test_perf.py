"""The `perf` settings: every key validated (naming the field, before any process group), the auto
table for CPU / CUDA without TE / CUDA with TE, the resolved values in megatron-core's own configs,
and activation recomputation training to the same losses as without it (a real run on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pma_train.config import ConfigError, JobConfig, validate
from pma_train.config.perf import AUTO_FLAGS, CPU, Host, is_resolved, resolve, summary
from tests import launch
from tests.launch import test_env
from tests.test_config import job

CUDA = Host(cuda=True)
CUDA_TE = Host(cuda=True, te=True, wgrad_kernel=True)


@pytest.mark.parametrize("overrides, world, field", [
    *[({f"perf__{name}": "yes"}, 1, f"perf.{name}") for name in AUTO_FLAGS],
    ({"perf__tp_comm_overlap": "yes"}, 1, "perf.tp_comm_overlap"),
    ({"model__moe_grouped_gemm": "on"}, 1, "model.moe_grouped_gemm"),
    ({"perf__cross_entropy_fusion_impl": "apex"}, 1, "perf.cross_entropy_fusion_impl"),
    ({"perf__attention_backend": "flash"}, 1, "perf.attention_backend"),
    ({"perf__bucket_size": 0}, 1, "perf.bucket_size"),
    ({"perf__overlap_param_gather": True, "parallel__use_distributed_optimizer": False}, 1, "perf.overlap_param_gather"),
    ({"perf__overlap_param_gather": True, "perf__overlap_grad_reduce": False}, 1, "perf.overlap_param_gather"),
    ({"perf__overlap_p2p_comm": True}, 1, "perf.overlap_p2p_comm"),           # not interleaved
    ({"perf__cuda_device_max_connections": 0}, 1, "perf.cuda_device_max_connections"),
    ({"perf__bias_activation_fusion": True, "model__activation": "gelu"}, 1, "perf.bias_activation_fusion"),
    ({"perf__apply_rope_fusion": True, "model__position_embedding_type": "learned_absolute"}, 1,
     "perf.apply_rope_fusion"),
    ({"perf__moe_router_dtype": "bf16"}, 1, "perf.moe_router_dtype"),
    ({"model__moe_token_dispatcher_type": "alltoall_seq"}, 1, "model.moe_token_dispatcher_type"),
    ({"model__moe_flex_dispatcher_backend": "nccl"}, 1, "model.moe_flex_dispatcher_backend"),
    ({"perf__fp8": "e5m2"}, 1, "perf.fp8"),
    ({"perf__fp8": "hybrid", "perf__fp8_recipe": "nvfp4"}, 1, "perf.fp8_recipe"),
    ({"perf__fp8": "hybrid", "perf__fp8_amax_compute_algo": "mean"}, 1, "perf.fp8_amax_compute_algo"),
    ({"perf__fp8": "hybrid", "perf__fp8_amax_history_len": 0}, 1, "perf.fp8_amax_history_len"),
    ({"perf__fp8": "hybrid", "perf__fp8_margin": -1}, 1, "perf.fp8_margin"),
    ({"perf__recompute_granularity": "layer"}, 1, "perf.recompute_granularity"),
    ({"perf__recompute_granularity": "full", "perf__recompute_num_layers": 1}, 1, "perf.recompute_method"),
    ({"perf__recompute_granularity": "full", "perf__recompute_method": "uniform"}, 1, "perf.recompute_num_layers"),
    ({"perf__recompute_granularity": "full", "perf__recompute_method": "block", "perf__recompute_num_layers": 5}, 1,
     "perf.recompute_num_layers"),                                            # tiny has 4 layers
    ({"perf__recompute_method": "uniform"}, 1, "perf.recompute_method"),      # without full recompute
    ({"perf__recompute_granularity": "selective", "perf__recompute_num_layers": 1}, 1, "perf.recompute_num_layers"),
    ({"perf__recompute_modules": ["core_attn"]}, 1, "perf.recompute_modules"),  # without selective
    ({"perf__recompute_granularity": "selective", "perf__recompute_modules": ["attention"]}, 1,
     "perf.recompute_modules"),
    ({"perf__recompute_granularity": "selective", "perf__recompute_modules": ["moe"]}, 1, "perf.recompute_modules"),
    ({"perf__recompute_granularity": "selective", "perf__recompute_modules": ["layernorm"], "perf__fp8": "hybrid"}, 1,
     "perf.recompute_modules"),                                               # FP8 delayed scaling
    ({"perf__cuda_graph_impl": "full_iteration"}, 1, "perf.cuda_graph_impl"),
    ({"perf__cuda_graph_impl": "local", "perf__recompute_granularity": "full", "perf__recompute_method": "uniform",
      "perf__recompute_num_layers": 1}, 1, "perf.cuda_graph_impl"),
    ({"perf__tp_comm_overlap": True}, 1, "perf.tp_comm_overlap"),             # TP = 1
    ({"perf__tp_comm_overlap": True, "parallel__tp": 2, "parallel__sequence_parallel": False}, 2,
     "perf.tp_comm_overlap"),
])
def test_validate_names_the_perf_field(overrides, world, field):
    with pytest.raises(ConfigError) as err:
        validate(job(**overrides), world_size=world)
    assert str(err.value).startswith(field + ":"), str(err.value)


def _moe() -> JobConfig:
    cfg = JobConfig()
    cfg.model.layer_pattern, cfg.model.num_experts = "*E*E", 4
    return cfg


def _chosen(cfg: JobConfig) -> dict:
    pf = cfg.perf
    return {**{n: getattr(pf, n) for n in AUTO_FLAGS}, "moe_router_dtype": pf.moe_router_dtype,
            "cuda_device_max_connections": pf.cuda_device_max_connections,
            "moe_grouped_gemm": cfg.model.moe_grouped_gemm}


FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion")
OVERLAP = ("overlap_grad_reduce", "overlap_param_gather", "deallocate_pipeline_outputs")


@pytest.mark.parametrize("host, on", [
    (CPU, set()),
    (CUDA, {*FUSIONS, *OVERLAP}),
    (Host(cuda=True, softmax_kernel=True, wgrad_kernel=True),
     {*FUSIONS, *OVERLAP, "masked_softmax_fusion", "gradient_accumulation_fusion"}),
    (CUDA_TE, {*FUSIONS, *OVERLAP, "masked_softmax_fusion", "gradient_accumulation_fusion", "apply_rope_fusion"}),
    (Host(cuda=True, te=True), {*FUSIONS, *OVERLAP, "masked_softmax_fusion", "apply_rope_fusion"}),  # no apex
])
def test_auto_table(host, on):
    dense = resolve(JobConfig(), host)
    assert is_resolved(dense) and resolve(dense, host) == dense  # once, and idempotent
    assert {n for n in AUTO_FLAGS if getattr(dense.perf, n)} == on
    assert dense.perf.moe_router_dtype == "param" and dense.perf.cuda_device_max_connections is None
    assert dense.perf.attention_backend == ("te" if host.te else "sdpa" if host.cuda else "local")
    # TP > 1 on CUDA: CUDA_DEVICE_MAX_CONNECTIONS=1 (Megatron-LM's requirement); interleaved PP: p2p overlap.
    wide = JobConfig()
    wide.parallel.tp, wide.parallel.pp, wide.parallel.vpp = 2, 2, 2
    wide = resolve(wide, host)
    assert wide.perf.cuda_device_max_connections == (1 if host.cuda else None)
    assert wide.perf.overlap_p2p_comm is host.cuda
    moe = _chosen(resolve(_moe(), host))
    assert moe["moe_permute_fusion"] is moe["moe_grouped_gemm"] is host.te
    assert moe["moe_router_dtype"] == ("fp32" if host.cuda else "param")


def test_everything_is_off_on_cpu_and_the_banner_says_so():
    cfg = resolve(_moe(), CPU)
    assert not any(v for k, v in _chosen(cfg).items() if k != "moe_router_dtype")
    assert summary(cfg) == "perf: on: none | attention local | router param, dispatcher alltoall"


def test_explicit_overrides_win_and_what_a_host_lacks_is_named():
    cfg = JobConfig()
    cfg.perf.overlap_grad_reduce, cfg.perf.bucket_size = False, 1 << 20
    resolved_ = resolve(cfg, CUDA_TE).perf
    assert resolved_.overlap_grad_reduce is False and resolved_.overlap_param_gather is False  # follows it
    for name, value, host in [("perf.apply_rope_fusion", True, CUDA), ("perf.bias_dropout_fusion", True, CPU),
                              ("perf.gradient_accumulation_fusion", True, Host(cuda=True, te=True)),
                              ("perf.fp8", "hybrid", CUDA), ("perf.cuda_graph_impl", "local", CPU),
                              ("perf.cross_entropy_fusion_impl", "te", CUDA),
                              ("perf.recompute_modules", ["core_attn", "layernorm"], CUDA),
                              ("model.moe_grouped_gemm", True, CPU), ("model.moe_token_dispatcher_type", "flex", CUDA_TE),
                              ("perf.attention_backend", "te", CUDA), ("perf.attention_backend", "sdpa", CUDA_TE)]:
        cfg = _moe()
        section, key = name.split(".")
        setattr(getattr(cfg, section), key, value)
        if key == "cross_entropy_fusion_impl":
            cfg.perf.cross_entropy_loss_fusion = True
        if key == "recompute_modules":
            cfg.perf.recompute_granularity = "selective"
        validate(cfg, world_size=1)  # statically fine: what fails is the host
        with pytest.raises(ConfigError, match=f"^{name}: "):
            resolve(cfg, host)


def test_cuda_device_max_connections_is_set_or_a_disagreeing_environment_named(monkeypatch):
    from pma_train.parallel import set_cuda_device_max_connections

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    set_cuda_device_max_connections(None, explicit=False)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    set_cuda_device_max_connections(1, explicit=False)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    with pytest.raises(ConfigError, match="^perf.cuda_device_max_connections: the environment sets "
                                          "CUDA_DEVICE_MAX_CONNECTIONS=32"):
        set_cuda_device_max_connections(1, explicit=False)
    set_cuda_device_max_connections(8, explicit=True)  # the key wins over the environment
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"


def test_cli_names_what_the_host_lacks_before_starting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pma_train.cli.train", "perf.fp8=hybrid", f"run.dir={tmp_path / 'run'}"],
                          cwd=launch.REPO, env=test_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error: perf.fp8: FP8 needs CUDA with Transformer Engine, and this is a CPU host" in proc.stderr
    assert not (tmp_path / "run").exists()
    # pma-eval builds the same model: the same refusal, before it reads a checkpoint.
    proc = subprocess.run([sys.executable, "-m", "pma_train.cli.eval", "perf.fp8=hybrid", f"checkpoints=[{tmp_path}]"],
                          cwd=launch.REPO, env=test_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pma-eval: error: perf.fp8: FP8 needs CUDA" in proc.stderr, proc.stderr[-2000:]


def test_resolved_values_reach_megatron_configs():
    """The TransformerConfig and DDP config pma-train builds, for the values a CUDA host without TE
    resolves to (all of which megatron-core accepts on a CPU host too) and for explicit ones."""
    from pma_train.model.build import perf_kwargs, transformer_config
    from pma_train.platform import Platform
    from pma_train.train.optim import ddp_config

    platform = Platform(torch.device("cpu"), "gloo")
    cfg = _moe()
    cfg.perf.recompute_granularity, cfg.perf.recompute_method, cfg.perf.recompute_num_layers = "full", "block", 2
    cfg.perf.bucket_size = 12345
    cfg = resolve(cfg, CUDA)
    config = transformer_config(cfg, platform)
    for name in ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
                 "gradient_accumulation_fusion", "cross_entropy_loss_fusion", "deallocate_pipeline_outputs",
                 "overlap_p2p_comm", "recompute_granularity", "recompute_method", "recompute_num_layers",
                 "moe_permute_fusion"):
        assert getattr(config, name) == getattr(cfg.perf, name), name
    assert config.bias_activation_fusion and config.cross_entropy_loss_fusion and config.cross_entropy_fusion_impl == "native"
    assert config.moe_router_dtype == "fp32" and config.moe_grouped_gemm is False
    ddp = ddp_config(cfg, config)
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.align_param_gather, ddp.bucket_size) == \
        (True, True, False, 12345)

    # On CPU everything resolves off: megatron-core's configs are the unfused ones CPU runs always had.
    cpu = transformer_config(JobConfig(), platform)
    assert not any(getattr(cpu, n) for n in ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
                                             "apply_rope_fusion", "gradient_accumulation_fusion",
                                             "cross_entropy_loss_fusion", "deallocate_pipeline_outputs"))
    assert cpu.recompute_granularity is None and cpu.fp8 is None and cpu.batch_p2p_comm is False
    assert not ddp_config(JobConfig(), cpu).overlap_grad_reduce

    # FP8 / CUDA graphs / TP overlap (TE-only: megatron-core's config checks need TE, so the kwargs).
    te = JobConfig()
    te.parallel.tp, te.parallel.sequence_parallel = 2, True
    te.perf.fp8, te.perf.fp8_recipe, te.perf.fp8_amax_history_len, te.perf.fp8_margin = "hybrid", "tensorwise", 16, 1
    te.perf.cuda_graph_impl, te.perf.tp_comm_overlap = "transformer_engine", True
    kwargs = perf_kwargs(resolve(te, CUDA_TE), Platform(torch.device("cpu"), "nccl"))
    assert {k: kwargs[k] for k in ("fp8", "fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin",
                                   "cuda_graph_impl", "use_te_rng_tracker", "tp_comm_overlap", "batch_p2p_comm")} == \
        {"fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_amax_history_len": 16, "fp8_amax_compute_algo": "most_recent",
         "fp8_margin": 1, "cuda_graph_impl": "transformer_engine", "use_te_rng_tracker": True, "tp_comm_overlap": True,
         "batch_p2p_comm": True}


def test_the_te_spec_honours_moe_grouped_gemm():
    """megatron-core's TE hybrid spec always asks for grouped-GEMM experts; with the key off, ours asks
    for per-expert ones (SequentialMLP) and is megatron-core's otherwise. (Without TE, megatron-core
    falls back to SequentialMLP either way, so which class a grouped request gives is a GPU check.)"""
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
    from megatron.core.transformer.moe.experts import SequentialMLP

    from pma_train.model.spec import te_stack_spec

    experts = lambda spec: spec.submodules.moe_layer.submodules.mlp.keywords["submodules"].experts  # noqa: E731
    assert te_stack_spec(4, True) is hybrid_stack_spec and te_stack_spec(None, False) is hybrid_stack_spec
    per_expert = te_stack_spec(4, False)
    assert experts(per_expert).func is SequentialMLP
    assert per_expert.submodules.attention_layer is hybrid_stack_spec.submodules.attention_layer
    assert experts(hybrid_stack_spec) is not experts(per_expert)  # megatron-core's own spec left as it was


STEPS = ["train.iters=3", "train.log_interval=1", "train.eval_iters=0", "train.global_batch_size=4",
         "train.micro_batch_size=2", "train.seq_length=64", "checkpoint.interval=100", "checkpoint.save_at_end=false",
         "schedule.warmup_iters=1", "seed=3", "logging.progress_bar=false"]
RECOMPUTE = {"none": [], "selective": ["perf.recompute_granularity=selective",
                                       "perf.recompute_modules=[core_attn,mlp]"],
             "full": ["perf.recompute_granularity=full", "perf.recompute_method=uniform", "perf.recompute_num_layers=2"]}


def test_sdpa_attention_equals_megatron_local():
    """perf.attention_backend=sdpa computes megatron-core's local attention (causal, grouped-query heads):
    outputs and the gradients of q, k, v equal to fp32 rounding; a mask it cannot honour is refused."""
    proc = launch.run_module(["tests.attention_driver"], nproc=None, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [48, 3, 64]
    for key in ("out", "dq", "dk", "dv"):
        assert result[key] < 1e-5, result
    assert "perf.attention_backend=sdpa takes no attention mask" in result["mask"]
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from pma_train.model.attention import SDPAttention
    from pma_train.model.spec import local_stack_spec

    core = lambda spec: spec.submodules.attention_layer.submodules.self_attention.submodules.core_attention  # noqa: E731
    assert core(local_stack_spec(attention="sdpa")) is SDPAttention
    assert core(local_stack_spec(attention="local")) is DotProductAttention


def test_recompute_trains_to_the_same_losses(tmp_path):
    """Recomputation repeats the forward in backward: the same numbers, bit for bit, on CPU (three
    real trainings, one process; the banner names the setting). The same job with SDPA attention
    trains to the same losses within fp32 rounding (on CPU torch may even pick the same operations)."""
    runs = {name: STEPS + extra for name, extra in RECOMPUTE.items()}
    runs["sdpa"] = STEPS + ["perf.attention_backend=sdpa"]
    proc = launch.run_module(["tests.recompute_driver", str(tmp_path), json.dumps(runs)], nproc=None, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["none"]["loss"]) == 3
    assert result["selective"] == result["full"] == result["none"]
    assert result["sdpa"]["loss"] == pytest.approx(result["none"]["loss"], rel=1e-5)
    assert "attention sdpa" in proc.stdout and "attention local" in proc.stdout
    assert "recompute selective (core_attn,mlp)" in proc.stdout and "recompute full (uniform, 2 layers)" in proc.stdout
