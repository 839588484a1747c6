"""Weights depend on the seed only: every layout builds the same global model."""

from __future__ import annotations

import zlib

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.launch import run_module


def full_weights(ckpt_dir, tmp_path) -> dict[str, torch.Tensor]:
    """Independent reference: torch's own DCP reader gathers every tensor whole."""
    out = tmp_path / f"{ckpt_dir.name}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def dump(tmp_path, name, nproc, tp, pp, vpp, model):
    out = tmp_path / name
    proc = run_module(["tests.dist_checks", str(out), str(tp), str(pp), str(vpp), model], nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return full_weights(out, tmp_path)


def test_tp2_pp2_vpp_build_the_tp1_weights(tmp_path):
    reference = dump(tmp_path, "tp1", 1, 1, 1, 0, "tiny4")
    assert len(reference) > 10
    for name, nproc, tp, pp, vpp in [("tp2", 2, 2, 1, 0), ("pp2vpp2", 2, 1, 2, 2)]:
        other = dump(tmp_path, name, nproc, tp, pp, vpp, "tiny4")
        assert sorted(other) == sorted(reference), name
        for key, tensor in reference.items():
            assert torch.equal(other[key], tensor), f"{name}: {key} differs"
    # The draws are not trivially equal: matrices are random, distinct and of the intended scale.
    qkv = reference["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert 0.015 < qkv.std().item() < 0.025
    assert not torch.equal(reference["decoder.layers.0.self_attention.linear_qkv.weight"],
                           reference["decoder.layers.2.self_attention.linear_qkv.weight"])


@torch.no_grad()
def reference_fill(sh, seed: int, std: float) -> None:
    """The init as first written (one generator, one draw and one copy per row): the definition that
    the blocked, threaded fill must reproduce bit for bit."""
    global_shape, offsets, data = tuple(sh.global_shape), tuple(sh.global_offset), sh.data
    lead = len(global_shape) - data.dim()
    local_rows = data.reshape(-1, data.shape[-1])
    for i in range(local_rows.shape[0]):
        local_index = torch.unravel_index(torch.tensor(i), data.shape[:-1]) if data.dim() > 1 else ()
        global_index = list(offsets[:lead]) + [offsets[lead + d] + int(local_index[d]) for d in range(data.dim() - 1)]
        flat = 0
        for dim, idx in zip(global_shape[:-1], global_index):
            flat = flat * dim + idx
        mixed = (seed * 1_000_003 + zlib.crc32(sh.key.encode()) * 65_537 + flat) % (2**63 - 1)
        row = torch.randn(global_shape[-1], generator=torch.Generator().manual_seed(mixed), dtype=torch.float32)
        local_rows[i].copy_(row[offsets[-1]:offsets[-1] + data.shape[-1]].mul_(std))


def test_blocked_fill_equals_the_row_by_row_reference(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from pma_train.model import init

    monkeypatch.setattr(init, "BLOCK_BYTES", 4 * 40 * 3)  # several blocks per tensor, and a ragged last one
    # (key, local shape, dtype, rank offsets (axis, rank, fragments), prepended axes): rows shorter than
    # torch's 16-value sampling unit and not a multiple of it, row and column shards, an expert axis
    # prepended by megatron, a 3-d local tensor, bf16 parameters.
    cases = [("a.weight", (7, 40), torch.float32, [], 0),
             ("b.linear_proj.weight", (9, 20), torch.float32, [(1, 1, 2)], 0),
             ("c.weight", (5, 13), torch.bfloat16, [(0, 2, 3)], 0),
             ("d.experts.weight", (6, 24), torch.float32, [(0, 3, 4), (2, 0, 2)], 1),
             ("e.weight", (2, 3, 8), torch.bfloat16, [(1, 1, 2)], 0)]
    with ThreadPoolExecutor(3) as pool:
        for key, shape, dtype, rank_offsets, prepend in cases:
            tensors = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(3)]
            shards = [ShardedTensor.from_rank_offsets(key, t, *rank_offsets, prepend_axis_num=prepend) for t in tensors]
            reference_fill(shards[0], 1234, 0.02)
            init.fill_normal_layout_invariant(shards[1], 1234, 0.02)
            init.fill_normal_layout_invariant(shards[2], 1234, 0.02, pool, threads=3)
            assert not tensors[0].isnan().any()
            for t in tensors[1:]:
                assert torch.equal(t, tensors[0]), key


def test_build_equals_the_previous_build(tmp_path):
    # The whole model: vectors (norms, biases) as megatron-core sets them, no matrix left undrawn.
    proc = run_module(["tests.dist_checks", "previous_build"], nproc=None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tiny: " in proc.stdout and "tiny_moe: " in proc.stdout
