"""Model FLOPs per token from the built model's own parameters, and MFU against the GPU's peak.

Counted as pma-plan does (6 x activated matmul weights + attention's 12 x layers x seq x heads x
kv_channels, forward + backward), from this rank's modules scaled to the whole model and summed
over pipeline stages, so every rank gets the same figure.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def flops_per_token(model_chunks, cfg) -> float:
    from pma_train.plan.count import tally

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
    attention_layers = m.pattern().count("*")
    return 6 * activated + 12 * attention_layers * cfg.train.seq_length * m.num_attention_heads * kv


def peak_flops_per_gpu(device: torch.device, half_precision: bool) -> float | None:
    """The GPU's dense half-precision peak, or None (CPU, fp32 training, unknown GPU): no MFU then."""
    if device.type != "cuda" or not half_precision:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)
