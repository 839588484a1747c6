"""`pma-plan`: a dry run of a pma-train job on a given number of GPUs, in seconds, on any host.

It validates the job for that world size, builds the real megatron-core model on the meta device
(one rank per pipeline stage, see count.py) and reports total and activated parameters, the
parameters and estimated memory of every pipeline stage's GPUs, FLOPs per token and tokens per
step (estimates: see estimate.py).

Files the job would read on the cluster (data.paths, checkpoint.load / init_from) need not exist
here. The vocabulary size, first of: plan.vocab_size; the job's Hugging Face tokenizer, when its
tokenizer.json is here; `vocab_size=<n>` in model.notes (the paper-size presets state the ~152k
vocabulary they assume); the byte tokenizer's 257.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pma_train.config import ConfigError, JobConfig, validate
from pma_train.plan import estimate
from pma_train.plan.count import BuildError, count_model

__all__ = ["PlanConfig", "PlanJobConfig", "make_plan", "resolve_vocab", "BuildError", "ConfigError"]


@dataclass
class PlanConfig:
    # World size (GPUs) to plan for; None = the smallest that holds the layout, tp*pp*ep.
    gpus: Optional[int] = None
    # Tokenizer vocabulary (padded by the model to model.make_vocab_size_divisible_by); None = see above.
    vocab_size: Optional[int] = None
    # Also write the plan as JSON to this file.
    json: Optional[str] = None
    # Build every layer of every stage instead of one layer of each kind (same counts, slower).
    full_build: bool = False
    # Where the job trains, for its host-memory figures: gpu | cpu (on CPU the training state is host memory).
    device: str = "gpu"


@dataclass
class PlanJobConfig(JobConfig):
    plan: PlanConfig = field(default_factory=PlanConfig)


_NOTES_VOCAB = re.compile(r"\bvocab_size\s*=\s*(\d+)")


def _fail(name: str, message: str) -> None:
    raise ConfigError(f"{name}: {message}")


def resolve_vocab(job: JobConfig, plan: PlanConfig) -> tuple[int, str]:
    """(tokenizer vocabulary size, where it came from)."""
    from pathlib import Path

    if plan.vocab_size is not None:
        if plan.vocab_size < 1:
            _fail("plan.vocab_size", f"must be >= 1, got {plan.vocab_size}")
        return plan.vocab_size, "plan.vocab_size"
    tok = job.data.tokenizer
    if tok.type == "huggingface":
        if not tok.path or not Path(tok.path).is_file():
            _fail("plan.vocab_size", f"the tokenizer file data.tokenizer.path={tok.path} is not here: "
                                     "give its vocabulary size as plan.vocab_size=<n>")
        from pma_train.data.tokenizer import build_tokenizer

        return build_tokenizer(tok).vocab_size, f"tokenizer {tok.path}"
    match = _NOTES_VOCAB.search(job.model.notes or "")
    if match:
        return int(match.group(1)), f"assumed by model {job.model.name} (model.notes)"
    from pma_train.data.tokenizer import ByteTokenizer

    return ByteTokenizer.vocab_size, "byte tokenizer"


def check(job: JobConfig, plan: PlanConfig) -> int:
    """Validate the job for the planned world size (returned); ConfigError names the field."""
    p = job.parallel
    if plan.device not in ("gpu", "cpu"):
        _fail("plan.device", f"'{plan.device}' is not one of gpu, cpu")
    if plan.gpus is not None and plan.gpus < 1:
        _fail("plan.gpus", f"must be >= 1, got {plan.gpus}")
    gpus = plan.gpus if plan.gpus is not None else p.tp * p.pp * p.ep
    # pma-train's own validation (a parallel size below 1 is refused there, by name), except that the
    # files the job reads exist on this host.
    validate(job, world_size=gpus, local_files=False)
    return gpus


def make_plan(job: PlanJobConfig | JobConfig, plan: PlanConfig | None = None) -> dict[str, Any]:
    """The plan as a JSON-able dict. Raises ConfigError (a named field) or BuildError."""
    plan = plan or getattr(job, "plan", None) or PlanConfig()
    gpus = check(job, plan)
    vocab, vocab_source = resolve_vocab(job, plan)
    start = time.perf_counter()
    counted = count_model(job, vocab, full=plan.full_build)
    build_seconds = time.perf_counter() - start

    m, p, t = job.model, job.parallel, job.train
    pattern = m.pattern().replace("|", "")
    dp = gpus // (p.tp * p.pp)
    etp = counted.expert_tensor_parallel
    layout = estimate.Layout(
        world=gpus, tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, expert_tp=etp, dp=dp,
        expert_dp=gpus // (etp * p.ep * p.pp), sequence_parallel=p.sequence_parallel and p.tp > 1,
        distributed_optimizer=p.use_distributed_optimizer,
        microbatches=t.global_batch_size // (t.micro_batch_size * dp))
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    shape = estimate.Shape(
        hidden=m.hidden_size, heads=m.num_attention_heads, kv_channels=kv,
        query_groups=m.num_query_groups or m.num_attention_heads, ffn=m.ffn_hidden_size,
        gated=m.activation == "swiglu", experts=m.num_experts or 0, topk=m.moe_router_topk if m.num_experts else 0,
        moe_ffn=(m.moe_ffn_hidden_size or m.ffn_hidden_size) if m.num_experts else 0,
        shared_ffn=m.moe_shared_expert_intermediate_size or 0, padded_vocab=counted.padded_vocab_size)

    def activated(tally_total: int, tally_expert: int) -> int:
        return tally_total - tally_expert + (tally_expert * shape.topk // shape.experts if shape.experts else 0)

    total = counted.total
    per_layer = {symbol: {"total": c.total, "activated": activated(c.total, c.expert), "per_gpu": c.local}
                 for symbol, c in counted.layers.items()}
    precision = estimate.training_precision(t.precision)
    e = 4 if precision == "fp32" else 2
    tokens_per_microbatch = t.micro_batch_size * t.seq_length

    snapshot_b = {"fp32": 4, "bf16": 2, "param": e}[job.track.dtype]  # track.dtype's bytes per element
    ranks = []
    for pp_rank in range(p.pp):
        chunks = [c for c in counted.chunks if c.pp_rank == pp_rank]
        dense = sum(c.params.local - c.params.local_expert for c in chunks)
        expert = sum(c.params.local_expert for c in chunks)
        state = estimate.state_bytes(dense, expert, layout, precision)
        per_chunk = [tokens_per_microbatch
                     * estimate.chunk_bytes_per_token(c.segment, c.first, c.last, shape, layout, e) for c in chunks]
        held = estimate.in_flight(pp_rank, layout)
        activations = held * sum(per_chunk) / len(per_chunk)
        device_state = state["weights"] + state["grads"] + state["optimizer"] + activations
        sharded = p.use_distributed_optimizer
        host = estimate.host_bytes(dense + expert, e, dp if sharded else 1, plan.device == "gpu", device_state,
                                   job.checkpoint.optimizer_format if sharded else "dp_reshardable",
                                   job.track.n if job.track.enabled else 0, dp,
                                   snapshot_b, job.track.storage,
                                   job.track.buffer_mb << 20)
        ranks.append({
            "pp_rank": pp_rank, "segments": [c.segment for c in chunks],
            "params": dense + expert, "params_expert": expert,
            "weights_bytes": state["weights"], "grads_bytes": state["grads"], "optimizer_bytes": state["optimizer"],
            "activation_bytes": activations, "microbatches_in_flight": held,
            "activation_bytes_per_microbatch": per_chunk,
            "total_bytes": device_state, "host_bytes": host,
            "tracker_disk_bytes": estimate.tracker_disk_bytes(dense + expert, e, job.track.n, dp, snapshot_b)
            if job.track.enabled and job.track.storage == "disk" else 0,
        })
    peak = max(ranks, key=lambda r: r["total_bytes"])

    from pma_train.model.flops import flops_formula  # loaded with the model by count_model above

    matmul_activated = activated(total.matmul, total.matmul_expert)
    flops = flops_formula(matmul_activated, pattern.count("*"), t.seq_length, shape.heads * kv)
    tokens_per_step = t.global_batch_size * t.seq_length
    return {
        "model": m.name,
        "pattern": pattern,
        "layers": {"attention": pattern.count("*"), "mlp": pattern.count("-"), "moe": pattern.count("E")},
        "shape": {"hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads, "kv_channels": kv,
                  "num_query_groups": shape.query_groups, "ffn_hidden_size": m.ffn_hidden_size,
                  "num_experts": m.num_experts, "moe_router_topk": shape.topk or None,
                  "moe_ffn_hidden_size": shape.moe_ffn or None,
                  "moe_shared_expert_intermediate_size": shape.shared_ffn or None,
                  "tied_embeddings": not m.untie_embeddings_and_output_weights},
        "vocab_size": vocab, "vocab_source": vocab_source, "padded_vocab_size": counted.padded_vocab_size,
        "layout": {"gpus": gpus, "tp": p.tp, "pp": p.pp, "vpp": p.vpp, "ep": p.ep, "expert_tp": etp, "dp": dp,
                   "expert_dp": layout.expert_dp, "sequence_parallel": layout.sequence_parallel,
                   "distributed_optimizer": p.use_distributed_optimizer},
        "parameters": {
            "total": total.total, "activated": activated(total.total, total.expert),
            "routed_experts": total.expert, "embedding": counted.embedding.total,
            "output": counted.output.total, "per_layer": per_layer,
        },
        "batch": {"global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
                  "seq_length": t.seq_length, "microbatches_per_step": layout.microbatches,
                  "tokens_per_step": tokens_per_step},
        "flops": {"formula": "6 * N_matmul + 6 * L_attn * seq_length * h_q per token (forward + backward; "
                             "causal attention, as Megatron-LM counts it)",
                  "matmul_params_activated": matmul_activated,
                  "per_token": flops, "per_step": flops["total"] * tokens_per_step,
                  "per_gpu_per_step": flops["total"] * tokens_per_step / gpus},
        "memory": {"precision": precision, "ranks": ranks, "peak_pp_rank": peak["pp_rank"],
                   "peak_bytes": peak["total_bytes"], "estimate": True, "host_device": plan.device,
                   "optimizer_format": job.checkpoint.optimizer_format,
                   "tracker_n": job.track.n if job.track.enabled else 0, "tracker_dtype": job.track.dtype,
                   "tracker_storage": job.track.storage},
        "build": {"full": counted.full_build, "seconds": round(build_seconds, 3),
                  "ranks_built": p.pp, "world_built": p.tp * p.pp * p.ep},
    }
