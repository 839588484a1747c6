"""Memory estimates of a training step: arithmetic only (no torch, no megatron-core).

Memory per GPU, as pma-train trains (megatron-core DDP + Adam, see train/optim.py):
  bf16 / fp16: weights 2 bytes/param, gradient buffers 4 (fp32 reduction), optimizer 12 = fp32
  main params + Adam m + v; fp32: 4, 4 and 8 (m + v). With the distributed optimizer the optimizer
  part is sharded over the data-parallel ranks (routed experts: the expert-data-parallel ranks);
  weights and gradient buffers are not.

Activations per micro-batch, bytes per token of a layer, without recomputation, with a fused
(flash) attention that stores no s x s matrices, dropout off; the accounting of Korthikanti et
al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", table 2) carried over to
GQA, SwiGLU and top-k MoE. e = 2 bytes (bf16/fp16) or 4 (fp32); h-wide tensors are split over TP
ranks only with sequence parallelism (r = tp, else 1); inner tensors always (/tp):
  attention '*':  e*(2h/r + (h_q + 2 h_kv)/tp + h_q/tp) + 4*heads/tp
                  norm in, QKV in, q k v, attention out; fp32 softmax statistics
  MLP '-':        e*(2h/r + 3f/tp)    SwiGLU: norm in, fc1 in, fc1 out (2f), fc2 in (f); GELU: 2f/tp
  MoE 'E':        e*(2h/r + k*(2h + 3f_e/tp) + 3f_s/tp) + 8E/r   norm in / out; per routed copy the expert
                  input, fc1 out, fc2 in and the output kept for the weighted combine; shared expert;
                  fp32 router logits and probabilities
  first stage:    16 (token and position ids);  last stage: e*2h/r + 4V/tp + 12 (final norm and
                  output-layer inputs, fp32 softmax of the vocab-parallel cross entropy, labels, mask)
A stage holds min(pp - rank, micro-batches) micro-batches at the 1F1B peak; interleaved, a rank
holds min((pp - rank - 1)*2 + (vpp - 1)*pp + 1, micro-batches*vpp) chunk-micro-batches (megatron's
warm-up count + 1), valued at the mean of its chunks. Not counted: communication and temporary
buffers, the CUDA context, allocator fragmentation.

Host memory per rank (CPU RAM), beside the GPU figures; the job's checkpoint.optimizer_format and
track.* decide it. P = the rank's parameters (its model-parallel shard), dp its data-parallel size:
  training: the process (python, torch, megatron-core, data loader: HOST_BASE, measured on CPU; the
            CUDA runtime's host memory not counted); on a CPU job also everything the GPU columns count
  save:     + what megatron-core's writer stages in host memory before it writes: on a GPU job all
            the rank writes (its 1/dp of the replicated weights, e P / dp: the DP ranks share their
            writing, checkpoint/state.py::save_strategy; and its optimizer shard, 12 P / dp: fp32 main
            params, Adam m, v); on a CPU job the tensors that are views of a larger buffer, which it
            clones: its share of the weights (e P / dp) and, in fp32, the main params (4 P / dp, views
            of the weights). fully_reshardable adds 12 P / dp + 12 P on every
            rank: its optimizer shard copied to contiguous host buffers, and the whole DP group's
            state gathered from them.
  resume:   dp_reshardable reads into the rank's own tensors (+0); fully_reshardable allocates the
            whole DP group's optimizer state on every rank (+12 P).
  tracker:  track.n snapshots of the rank's 1/dp share of its shard (b = 4 bytes for track.dtype=fp32,
            2 for bf16, e for param), and while the merge is evaluated the live weights of that share
            and one gather buffer (B = track.buffer_mb): n b P / dp + e P / dp + B (merge/track.py).
            With track.storage=disk those shares are files (n b P / dp + e P / dp of disk per rank) and
            the host holds the gather buffer plus the merge's fp32 accumulator, its widening and the
            block read, each B / dp at most: B (1 + 3 / dp) (merge/track_store.py).

FLOPs per token: pma_train/model/flops.py (one formula for pma-plan and the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_channels: int
    query_groups: int
    ffn: int
    gated: bool  # SwiGLU
    experts: int
    topk: int
    moe_ffn: int
    shared_ffn: int
    padded_vocab: int


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    vpp: int | None
    ep: int
    expert_tp: int
    dp: int
    expert_dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    microbatches: int


def training_precision(precision: str) -> str:
    """`train.precision` of a GPU run ("auto" means bf16 there)."""
    return "bf16" if precision == "auto" else precision


def state_bytes(dense_params: int, expert_params: int, layout: Layout, precision: str) -> dict[str, float]:
    """Weights, gradient buffers and optimizer state of one rank's parameters."""
    weight, grad, optim = (4, 4, 8) if precision == "fp32" else (2, 4, 12)
    params = dense_params + expert_params
    if layout.distributed_optimizer:
        optimizer = optim * (dense_params / layout.dp + expert_params / layout.expert_dp)
    else:
        optimizer = optim * params
    return {"weights": weight * params, "grads": grad * params, "optimizer": optimizer}


HOST_BASE = 0.8 * 2**30  # peak RSS of a pma-train rank with the tiny model on CPU (checkpoint_memory.md)
OPTIMIZER_BYTES = 12  # per parameter: fp32 main param (the weight itself in fp32) + Adam m + v


def host_bytes(params: int, weight_bytes_per_param: int, dp: int, on_gpu: bool, device_state: float,
               optimizer_format: str, tracker_n: int, tracker_dp: int = 1, tracker_bytes: int = 4,
               tracker_storage: str = "host", tracker_buffer: int = 64 << 20) -> dict[str, float]:
    """Peak host memory of one rank while training,
    saving and resuming, and what track.* adds; device_state = the rank's GPU figure (weights, grads,
    optimizer, activations), resident in host memory on a CPU job."""
    training = HOST_BASE + (0 if on_gpu else device_state)
    gathered = OPTIMIZER_BYTES * params if optimizer_format == "fully_reshardable" else 0
    local = gathered / dp  # the rank's shard, copied to the contiguous buffers it gathers from
    staged = (weight_bytes_per_param + (OPTIMIZER_BYTES if on_gpu else 4)) * params / dp
    return {"training": training, "save": training + staged + local + gathered, "resume": training + gathered,
            "tracker": tracker_host_bytes(params, weight_bytes_per_param, tracker_n, tracker_dp, tracker_bytes,
                                          tracker_storage, tracker_buffer)}


def tracker_host_bytes(params: int, weight_bytes_per_param: int, n: int, dp: int, snapshot_bytes: int,
                       storage: str = "host", buffer: int = 64 << 20) -> float:
    """What track.* adds to a rank's host memory (the formula in the module docstring)."""
    if not n:
        return 0
    if storage == "disk":
        return buffer * (1 + 3 / dp)
    return tracker_disk_bytes(params, weight_bytes_per_param, n, dp, snapshot_bytes) + buffer


def tracker_disk_bytes(params: int, weight_bytes_per_param: int, n: int, dp: int, snapshot_bytes: int) -> float:
    """The snapshots and the live share of track.*, per rank: host memory or, track.storage=disk, files."""
    return (n * snapshot_bytes + weight_bytes_per_param) * params / dp


def layer_bytes_per_token(symbol: str, s: Shape, layout: Layout, e: int) -> float:
    tp = layout.tp
    r = tp if layout.sequence_parallel else 1
    h = s.hidden
    if symbol == "*":
        hq, hkv = s.heads * s.kv_channels, s.query_groups * s.kv_channels
        return e * (2 * h / r + (hq + 2 * hkv) / tp + hq / tp) + 4 * s.heads / tp
    inner = 3 if s.gated else 2
    if symbol == "-":
        return e * (2 * h / r + inner * s.ffn / tp)
    if symbol == "E":
        routed = s.topk * (2 * h + inner * s.moe_ffn / layout.expert_tp)
        return e * (2 * h / r + routed + inner * s.shared_ffn / tp) + 8 * s.experts / r
    raise ValueError(f"unknown layer symbol {symbol!r}")


def chunk_bytes_per_token(segment: str, first: bool, last: bool, s: Shape, layout: Layout, e: int) -> float:
    total = sum(layer_bytes_per_token(symbol, s, layout, e) for symbol in segment)
    if first:
        total += 16
    if last:
        r = layout.tp if layout.sequence_parallel else 1
        total += e * 2 * s.hidden / r + 4 * s.padded_vocab / layout.tp + 12
    return total


def in_flight(pp_rank: int, layout: Layout) -> int:
    """Micro-batches (interleaved: chunk-micro-batches) whose activations a rank holds at its peak."""
    m, pp = layout.microbatches, layout.pp
    if layout.vpp:
        total = m * layout.vpp
        return min((pp - pp_rank - 1) * 2 + (layout.vpp - 1) * pp + 1, total)
    return min(pp - pp_rank, m)
