"""Model FLOPs per token of a training step, counted on the model's own parameters.

As Megatron-LM counts them (`num_floating_point_operations` in megatron/training/training.py, BSHD
batches), forward + backward = 3 x forward:
  6 * N_matmul + 6 * L_attn * s * h_q
N_matmul = activated weights of matrix products (routed experts x top-k / experts, shared experts;
the output layer; not the input embedding lookup, not norms, not the MoE router). 6 * L_attn * s *
h_q = the score and value products (QK^T, softmax(QK^T) V: 4 s h_q per token forward) of L_attn
attention layers at sequence length s, halved for the causal mask (only half the scores are
computed), as Megatron-LM has counted them since it split out the core-attention term.

One formula and one parameter tally serve both pma-plan (a meta-device build, plan/count.py) and
the trainer (its built chunks, `model_flops_per_token`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Tally:
    """Parameters of some modules: on one rank, and in the whole model (each tensor once)."""

    local: int = 0  # on the rank (its TP / EP shard)
    local_expert: int = 0  # of which routed-expert weights
    total: int = 0  # in the model: TP shards x tp, expert shards x ep (x expert-TP), tied copies once
    expert: int = 0  # of which routed-expert weights
    # of `total`: weights of the matrix products Megatron-LM counts FLOPs of (not the input embedding
    # lookup, not norms, not the MoE router)
    matmul: int = 0
    matmul_expert: int = 0  # of `matmul`: routed-expert weights

    def add(self, other: "Tally", times: int = 1) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + times * getattr(other, name))


def tally(named_params, tp: int, ep: int, etp: int, tied: bool) -> Tally:
    t = Tally()
    for name, param in named_params:
        n = param.numel()
        # pma-train (and megatron at EP > 1) marks routed-expert weights allreduce=False.
        expert = getattr(param, "allreduce", True) is False
        sharded = bool(getattr(param, "tensor_model_parallel", False))
        t.local += n
        t.local_expert += n if expert else 0
        if getattr(param, "shared", False):
            continue  # the last stage's copy of a tied embedding: counted on the first stage
        scale = (ep * (etp if sharded else 1)) if expert else (tp if sharded else 1)
        t.total += n * scale
        t.expert += n * scale if expert else 0
        is_input_embedding = name.startswith("embedding.")
        used_as_matrix = not is_input_embedding or (tied and "word_embeddings" in name)
        # Megatron-LM's FLOPs leave out the router's (hidden x experts) product: so do we, to agree.
        if param.dim() >= 2 and used_as_matrix and ".router." not in name:
            t.matmul += n * scale
            t.matmul_expert += n * scale if expert else 0
    return t


def flops_formula(matmul_activated: int, attention_layers: int, seq_length: int,
                  query_width: int) -> dict[str, float]:
    """Model FLOPs per token of a training step; query_width = heads x kv_channels (h_q)."""
    matmul = 6 * matmul_activated
    attention = 6 * attention_layers * seq_length * query_width  # causal: half of 12 s h_q
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def model_flops_per_token(model_chunks, cfg) -> float:
    """FLOPs per token of the whole model from this rank's chunks (DDP-wrapped or not), scaled to the
    whole model and summed over pipeline stages, so every rank gets the same figure."""
    from megatron.core import parallel_state

    m, p = cfg.model, cfg.parallel
    etp = model_chunks[0].config.expert_tensor_parallel_size or p.tp
    tied = not m.untie_embeddings_and_output_weights
    # Names as in the unwrapped model (DDP adds a "module." prefix): the embedding is told by its name.
    local = tally([named for chunk in model_chunks for named in getattr(chunk, "module", chunk).named_parameters()],
                  p.tp, p.ep, etp, tied)
    counts = torch.tensor([local.matmul, local.matmul_expert], dtype=torch.float64)
    if p.pp > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        counts = counts.to(device)
        dist.all_reduce(counts, group=group)
    matmul, expert = counts.tolist()
    activated = matmul - expert + (expert * m.moe_router_topk / m.num_experts if m.num_experts else 0)
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    return flops_formula(activated, m.pattern().count("*"), cfg.train.seq_length, m.num_attention_heads * kv)["total"]
