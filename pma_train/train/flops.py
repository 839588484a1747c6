"""Model FLOPs per token from the built model's own parameters, and MFU against the GPU's peak.

Counted as pma-plan and Megatron-LM count them (pma_train/plan/estimate.py: 6 x activated matmul
weights + 6 x attention layers x seq x heads x kv_channels for causal attention, forward + backward),
from this rank's modules scaled to the whole model and summed over pipeline stages, so every rank
gets the same figure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class DevicePeak:
    label: str
    tflops: float  # dense bf16 / fp16 tensor-core peak, TFLOP/s, no sparsity


# NVIDIA datasheets' bf16 tensor-core peaks (their "with sparsity" figures halved), matched in order
# on torch.cuda.get_device_name(): the first pattern found in the name wins, so variants come first.
PEAKS: tuple[tuple[str, DevicePeak], ...] = (
    (r"\bGH200\b", DevicePeak("GH200", 989.0)),
    (r"\bGB200\b", DevicePeak("GB200", 2500.0)),
    (r"\bB200\b", DevicePeak("B200", 2250.0)),
    (r"\bH200\b.*\bNVL\b", DevicePeak("H200 NVL", 835.0)),
    (r"\bH200\b", DevicePeak("H200 SXM", 989.0)),
    (r"\bH100\b.*\bNVL\b", DevicePeak("H100 NVL", 835.0)),
    (r"\bH100\b.*\bPCIe\b", DevicePeak("H100 PCIe", 756.0)),
    (r"\bH100\b", DevicePeak("H100 SXM", 989.0)),  # "NVIDIA H100 80GB HBM3"
    (r"\bH800\b.*\bPCIe\b", DevicePeak("H800 PCIe", 756.0)),
    (r"\bH800\b", DevicePeak("H800 SXM", 989.0)),
    (r"\bA100\b", DevicePeak("A100", 312.0)),  # 40 and 80 GB, SXM4 and PCIe alike
    (r"\bA800\b", DevicePeak("A800", 312.0)),
    (r"\bL40S\b", DevicePeak("L40S", 362.0)),
    (r"\bL4\b", DevicePeak("L4", 121.0)),
)


def device_peak(name: str) -> DevicePeak | None:
    """The peak of a GPU by its torch.cuda.get_device_name(); None for a device not in the table."""
    return next((peak for pattern, peak in PEAKS if re.search(pattern, name, re.IGNORECASE)), None)


def flops_per_token(model_chunks, cfg) -> float:
    from pma_train.plan.count import tally
    from pma_train.plan.estimate import flops_per_token as formula

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
    return formula(activated, m.pattern().count("*"), cfg.train.seq_length, m.num_attention_heads * kv)["total"]


def peak_flops_per_gpu(device: torch.device, half_precision: bool) -> float | None:
    """The GPU's dense half-precision peak in FLOP/s, or None (CPU, fp32 training, a GPU not in
    PEAKS): then TFLOP/s are logged and no MFU."""
    if device.type != "cuda" or not half_precision:
        return None
    peak = device_peak(torch.cuda.get_device_name(device))
    return None if peak is None else peak.tflops * 1e12
