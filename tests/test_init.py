"""Weights depend on the seed only: every layout builds the same global model."""

from __future__ import annotations

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
