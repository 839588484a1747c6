"""GPU peaks for MFU: model FLOP/s per GPU (FLOPs per token: pma_train/model/flops.py) over the GPU's
dense half-precision peak."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


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


def peak_flops_per_gpu(device: torch.device, half_precision: bool) -> float | None:
    """The GPU's dense half-precision peak in FLOP/s, or None (CPU, fp32 training, a GPU not in
    PEAKS): then TFLOP/s are logged and no MFU."""
    if device.type != "cuda" or not half_precision:
        return None
    peak = device_peak(torch.cuda.get_device_name(device))
    return None if peak is None else peak.tflops * 1e12
