"""The `perf` settings (schema.PerfConfig, and model.moe_grouped_gemm) resolved once at start for the
host the job runs on: a pure function of the config and what the host offers (`Host`), so the table
of defaults can be tested without a GPU. Static checks of the same keys: check_perf (run by config.validate).

Auto (null) values follow megatron-core's requirements and Megatron-LM's defaults: on with CUDA where
the kernels they need exist, off on CPU (where every fusion is a CUDA kernel, and CPU numerics stay
those of the unfused model). An explicit `true` the host cannot honour is a ConfigError naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from pma_train.config.schema import ConfigError, JobConfig


@dataclass(frozen=True)
class Host:
    """What the host offers the performance settings."""

    cuda: bool
    te: bool = False  # megatron-core's HAVE_TE: Transformer Engine usable
    wgrad_kernel: bool = False  # apex's fused_weight_gradient_mlp_cuda (megatron-core's own linears)
    softmax_kernel: bool = False  # scaled_upper_triang_masked_softmax_cuda (local spec's attention)
    flex_backends: frozenset = frozenset()  # of "deepep", "hybridep": importable MoE dispatch kernels

    def describe(self) -> str:
        if not self.cuda:
            return "a CPU host"
        return "a CUDA host " + ("with" if self.te else "without") + " Transformer Engine"


CPU = Host(cuda=False)

# Booleans of PerfConfig whose null means "auto".
AUTO_FLAGS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
              "gradient_accumulation_fusion", "cross_entropy_loss_fusion", "overlap_grad_reduce",
              "overlap_param_gather", "deallocate_pipeline_outputs", "overlap_p2p_comm", "moe_permute_fusion")


def _fail(name: str, message: str) -> None:
    raise ConfigError(f"{name}: {message}")


FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe", "moe_act", "shared_experts")
MOE_DISPATCHERS = ("allgather", "alltoall", "flex")
# te: Transformer Engine's (the TE spec); sdpa: torch's scaled_dot_product_attention (flash /
# memory-efficient kernels); local: megatron-core's unfused DotProductAttention (CPU numerics).
ATTENTION_BACKENDS = ("te", "sdpa", "local")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        _fail(name, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def check_perf(cfg: JobConfig) -> None:
    """The `perf` keys (and the MoE dispatcher's) by themselves, part of config.validate; what the
    host must offer them is checked when they are resolved (resolve below)."""
    pf, m, p = cfg.perf, cfg.model, cfg.parallel
    for name in AUTO_FLAGS:
        _one_of(f"perf.{name}", getattr(pf, name), (None, True, False))
    _one_of("perf.tp_comm_overlap", pf.tp_comm_overlap, (True, False))
    _one_of("model.moe_grouped_gemm", m.moe_grouped_gemm, (None, True, False))
    _one_of("perf.cross_entropy_fusion_impl", pf.cross_entropy_fusion_impl, ("native", "te"))
    _one_of("perf.attention_backend", pf.attention_backend, (None, *ATTENTION_BACKENDS))
    if pf.bucket_size is not None and not pf.bucket_size >= 1:
        _fail("perf.bucket_size", f"must be >= 1 element (or null: megatron-core's default), got {pf.bucket_size}")
    if pf.overlap_param_gather and not p.use_distributed_optimizer:
        _fail("perf.overlap_param_gather", "gathers the distributed optimizer's parameters: needs "
                                           "parallel.use_distributed_optimizer=true")
    if pf.overlap_param_gather and pf.overlap_grad_reduce is False:
        _fail("perf.overlap_param_gather", "needs perf.overlap_grad_reduce (Megatron-LM refuses one without the other)")
    if pf.overlap_p2p_comm and p.vpp is None:
        _fail("perf.overlap_p2p_comm", "overlaps the interleaved pipeline schedule's p2p: needs parallel.vpp")
    if pf.cuda_device_max_connections is not None and not pf.cuda_device_max_connections >= 1:
        _fail("perf.cuda_device_max_connections", f"must be >= 1, got {pf.cuda_device_max_connections}")
    if pf.bias_activation_fusion and not (m.activation == "swiglu" or m.add_bias_linear):
        _fail("perf.bias_activation_fusion", "megatron-core fuses GeLU only with a bias: needs model.add_bias_linear")
    if pf.apply_rope_fusion and m.position_embedding_type != "rope":
        _fail("perf.apply_rope_fusion", f"needs model.position_embedding_type=rope, got {m.position_embedding_type}")
    if pf.moe_router_dtype is not None:
        _one_of("perf.moe_router_dtype", pf.moe_router_dtype, ("fp32", "fp64", "param"))
    _one_of("model.moe_token_dispatcher_type", m.moe_token_dispatcher_type, MOE_DISPATCHERS)
    _one_of("model.moe_flex_dispatcher_backend", m.moe_flex_dispatcher_backend, ("deepep", "hybridep"))

    if pf.fp8 is not None:
        _one_of("perf.fp8", pf.fp8, FP8_FORMATS)
        _one_of("perf.fp8_recipe", pf.fp8_recipe, FP8_RECIPES)
        _one_of("perf.fp8_amax_compute_algo", pf.fp8_amax_compute_algo, ("most_recent", "max"))
        if not pf.fp8_amax_history_len >= 1:
            _fail("perf.fp8_amax_history_len", f"must be >= 1, got {pf.fp8_amax_history_len}")
        if not pf.fp8_margin >= 0:
            _fail("perf.fp8_margin", f"must be >= 0, got {pf.fp8_margin}")

    g = pf.recompute_granularity
    if g is not None:
        _one_of("perf.recompute_granularity", g, ("selective", "full"))
    if g == "full":
        _one_of("perf.recompute_method", pf.recompute_method, ("uniform", "block"))
        per_chunk = len(m.pattern().replace("|", "")) // (p.pp * (p.vpp or 1))
        n = pf.recompute_num_layers
        if n is None or not 1 <= n <= per_chunk:
            _fail("perf.recompute_num_layers", f"full recompute needs 1 <= recompute_num_layers <= {per_chunk} "
                                               f"(the layers of a pipeline chunk), got {n}")
    else:
        for name in ("recompute_method", "recompute_num_layers"):
            if getattr(pf, name) is not None:
                _fail(f"perf.{name}", "only full recompute uses it (perf.recompute_granularity=full)")
    if pf.recompute_modules and g != "selective":
        _fail("perf.recompute_modules", "only selective recompute uses it (perf.recompute_granularity=selective)")
    for module in pf.recompute_modules:
        _one_of("perf.recompute_modules", module, RECOMPUTE_MODULES)
    if g == "selective" and {"moe", "moe_act", "shared_experts"} & set(pf.recompute_modules) and not m.num_experts:
        _fail("perf.recompute_modules", f"{pf.recompute_modules} name MoE modules, and the model has no experts")

    if g == "selective" and pf.fp8 and pf.fp8_recipe == "delayed" and {"moe_act", "layernorm"} & set(pf.recompute_modules):
        _fail("perf.recompute_modules", "megatron-core cannot recompute moe_act / layernorm under FP8 delayed scaling "
                                        "(perf.fp8_recipe=tensorwise can)")
    _one_of("perf.cuda_graph_impl", pf.cuda_graph_impl, ("none", "local", "transformer_engine"))
    if pf.cuda_graph_impl != "none" and g == "full":
        _fail("perf.cuda_graph_impl", "megatron-core captures no graph of a fully recomputed layer: "
                                      "use recompute_granularity=selective or cuda_graph_impl=none")
    if pf.tp_comm_overlap and not (p.tp > 1 and p.sequence_parallel):
        _fail("perf.tp_comm_overlap", f"overlaps sequence-parallel TP communication: needs parallel.tp > 1 "
                                      f"and parallel.sequence_parallel=true (tp={p.tp}, "
                                      f"sequence_parallel={p.sequence_parallel})")


def _choose(name: str, value: Optional[bool], auto: bool, can: bool, needs: str, host: Host) -> bool:
    """`value`, or `auto` when null; an explicit true this host cannot do fails, naming the key."""
    if value is None:
        return auto and can
    if value and not can:
        _fail(name, f"needs {needs}, and this is {host.describe()}")
    return bool(value)


def is_resolved(cfg: JobConfig) -> bool:
    return cfg.model.moe_grouped_gemm is not None and all(getattr(cfg.perf, n) is not None for n in AUTO_FLAGS) \
        and cfg.perf.moe_router_dtype is not None and cfg.perf.attention_backend is not None


def cuda_connections(cfg: JobConfig, cuda: bool) -> Optional[int]:
    """CUDA_DEVICE_MAX_CONNECTIONS for this job: decided from the config alone, so that it can be set
    before anything (Transformer Engine's import included) may start CUDA."""
    pf, p = cfg.perf, cfg.parallel
    if pf.cuda_device_max_connections is None and cuda and (p.tp > 1 or pf.tp_comm_overlap):
        return 1  # Megatron-LM asserts it for TP on GPUs before Blackwell; harmless after
    return pf.cuda_device_max_connections


def attention_backend(value: Optional[str], host: Host) -> str:
    """te wherever the TE spec is used (TE on CUDA), sdpa on other CUDA hosts, local (unfused, the CPU's
    reference numerics) on CPU; an explicit choice must match the spec the host gets."""
    te = host.cuda and host.te
    if value is None:
        return "te" if te else "sdpa" if host.cuda else "local"
    if te and value != "te":
        _fail("perf.attention_backend", f"{value}: a CUDA host with Transformer Engine builds TE's spec, whose "
                                        "attention is TE's (te)")
    if value == "te" and not te:
        _fail("perf.attention_backend", f"te needs CUDA with Transformer Engine, and this is {host.describe()}")
    return value


def resolve(cfg: JobConfig, host: Host) -> JobConfig:
    """`cfg` with every auto value of `perf` (and model.moe_grouped_gemm) decided for `host`.

    Idempotent: a resolved config comes back unchanged.
    """
    pf, m, p = cfg.perf, cfg.model, cfg.parallel
    cuda, te, moe = host.cuda, host.te, bool(m.num_experts)

    def choose(name, auto, can, needs):
        return _choose(f"perf.{name}", getattr(pf, name), auto, can, needs, host)

    gated_or_bias = m.activation == "swiglu" or m.add_bias_linear
    grad = choose("overlap_grad_reduce", cuda, cuda, "CUDA")
    out = dict(
        # megatron-core fuses bias+activation for SwiGLU, and for GeLU only with a bias to fuse.
        bias_activation_fusion=choose("bias_activation_fusion", cuda and gated_or_bias, cuda, "CUDA"),
        bias_dropout_fusion=choose("bias_dropout_fusion", cuda, cuda, "CUDA"),
        # TE's attention has its own softmax; the local spec's needs apex's kernel.
        masked_softmax_fusion=choose("masked_softmax_fusion", cuda, cuda and (te or host.softmax_kernel),
                                     "CUDA with Transformer Engine or apex's masked-softmax kernel"),
        apply_rope_fusion=choose("apply_rope_fusion", m.position_embedding_type == "rope", cuda and te,
                                 "CUDA with Transformer Engine"),
        # The output layer is megatron-core's own linear, which needs apex's kernel even under TE.
        gradient_accumulation_fusion=choose("gradient_accumulation_fusion", cuda, cuda and host.wgrad_kernel,
                                            "CUDA with apex's fused_weight_gradient_mlp_cuda"),
        cross_entropy_loss_fusion=choose("cross_entropy_loss_fusion", cuda, cuda, "CUDA"),
        overlap_grad_reduce=grad,
        # Megatron-LM: only with the distributed optimizer, and with overlap_grad_reduce.
        overlap_param_gather=choose("overlap_param_gather", cuda and p.use_distributed_optimizer and grad, cuda, "CUDA"),
        deallocate_pipeline_outputs=choose("deallocate_pipeline_outputs", cuda, cuda, "CUDA"),
        # Megatron-LM: overlapped p2p is the interleaved schedule's; other schedules ignore it.
        overlap_p2p_comm=choose("overlap_p2p_comm", cuda and p.vpp is not None, cuda, "CUDA"),
        moe_permute_fusion=choose("moe_permute_fusion", cuda and moe, cuda and te, "CUDA with Transformer Engine"),
        moe_router_dtype=pf.moe_router_dtype or ("fp32" if cuda and moe else "param"),
    )
    if pf.cross_entropy_fusion_impl == "te" and out["cross_entropy_loss_fusion"] and not te:
        _fail("perf.cross_entropy_fusion_impl", f"te needs Transformer Engine, and this is {host.describe()}")
    if pf.fp8 is not None and not (cuda and te):
        _fail("perf.fp8", f"FP8 needs CUDA with Transformer Engine, and this is {host.describe()}")
    if pf.cuda_graph_impl != "none" and not (cuda and te):
        _fail("perf.cuda_graph_impl", f"CUDA graphs need CUDA with Transformer Engine, and this is {host.describe()}")
    if pf.tp_comm_overlap and not (cuda and te):
        _fail("perf.tp_comm_overlap", f"needs CUDA with Transformer Engine (userbuffers), and this is {host.describe()}")
    if moe and m.moe_token_dispatcher_type == "flex" and m.moe_flex_dispatcher_backend not in host.flex_backends:
        _fail("model.moe_token_dispatcher_type", f"flex needs CUDA and the {m.moe_flex_dispatcher_backend} "
                                                 f"kernels (model.moe_flex_dispatcher_backend), which this host lacks")
    out["cuda_device_max_connections"] = cuda_connections(cfg, cuda)
    out["attention_backend"] = attention_backend(pf.attention_backend, host)

    grouped = _choose("model.moe_grouped_gemm", m.moe_grouped_gemm, cuda and te and moe, cuda and te,
                      "CUDA with Transformer Engine (TE's GroupedLinear)", host)
    # megatron-core recomputes these discarding their outputs, with a TE-only checkpoint function.
    discarded = sorted({"layernorm", "moe_act"} & set(pf.recompute_modules))
    if pf.recompute_granularity == "selective" and discarded and not te:
        _fail("perf.recompute_modules", f"{', '.join(discarded)} need Transformer Engine, and this is {host.describe()}")
    if pf.recompute_granularity == "selective" and "moe_act" in pf.recompute_modules and not grouped:
        _fail("perf.recompute_modules", "moe_act is recomputed only with grouped GEMM experts (model.moe_grouped_gemm)")
    return dataclasses.replace(cfg, perf=dataclasses.replace(pf, **out),
                               model=dataclasses.replace(m, moe_grouped_gemm=grouped))


def summary(cfg: JobConfig) -> str:
    """One line for the start of the log: the performance settings in effect (resolved)."""
    pf = cfg.perf
    on = [n for n in AUTO_FLAGS if getattr(pf, n)]
    if cfg.model.num_experts and cfg.model.moe_grouped_gemm:
        on.append("moe_grouped_gemm")
    parts = ["on: " + (", ".join(on) if on else "none"), f"attention {pf.attention_backend}"]
    if pf.cross_entropy_loss_fusion:
        parts.append(f"cross entropy {pf.cross_entropy_fusion_impl}")
    if pf.overlap_grad_reduce:
        parts.append(f"bucket_size {pf.bucket_size or 'megatron default'}")
    if cfg.model.num_experts:
        parts.append(f"router {pf.moe_router_dtype}, dispatcher {cfg.model.moe_token_dispatcher_type}")
    if pf.fp8:
        parts.append(f"fp8 {pf.fp8} ({pf.fp8_recipe}, amax history {pf.fp8_amax_history_len} "
                     f"{pf.fp8_amax_compute_algo}, margin {pf.fp8_margin})")
    if pf.recompute_granularity:
        detail = (f"{pf.recompute_method}, {pf.recompute_num_layers} layers" if pf.recompute_granularity == "full"
                  else ",".join(pf.recompute_modules or ["core_attn"]))
        parts.append(f"recompute {pf.recompute_granularity} ({detail})")
    if pf.cuda_graph_impl != "none":
        parts.append(f"cuda graphs {pf.cuda_graph_impl}")
    if pf.tp_comm_overlap:
        parts.append("tp comm overlap")
    if pf.cuda_device_max_connections is not None:
        parts.append(f"CUDA_DEVICE_MAX_CONNECTIONS={pf.cuda_device_max_connections}")
    return "perf: " + " | ".join(parts)
