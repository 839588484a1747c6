"""In-job merging: average checkpoints straight into a running job's sharded model.

Every rank loads only its own shards of each checkpoint (megatron-core's dist_checkpointing with
the model's sharded state dict, any saved layout), accumulates them in fp32 and copies the result
into its parameters. Memory: one extra copy of this rank's shard of the model. Used for
PMA-init and loss-spike recovery.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from pma_train.checkpoint import extra_state, integrity, layout
from pma_train.checkpoint.state import model_sharded_state_dict, unwrap


def _tensors(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _tensors(value, f"{prefix}{key}/")
    elif isinstance(node, torch.Tensor):
        yield prefix.rstrip("/"), node


@torch.no_grad()
def average_into_model(chunks: list[torch.nn.Module], checkpoints: list[str | Path], weights: list[float],
                       accumulate: torch.dtype = torch.float32) -> None:
    """Set the model (this rank's shards) to sum_i weights[i] * checkpoint_i. Oldest first."""
    if len(checkpoints) != len(weights) or not checkpoints:
        raise ValueError(f"{len(weights)} weights for {len(checkpoints)} checkpoints")
    dirs = [layout.check_loadable(path) for path in checkpoints]
    total: dict[str, torch.Tensor] = {}
    newest_state = None
    for ckpt, weight in zip(dirs, weights):
        integrity.verify_checkpoint(ckpt, with_optimizer=False)
        # The sharded state dict is consumed by a load: build it afresh each time. The load also
        # returns the checkpoint's common state (iteration, args, ...): keep the model parts.
        sharded = model_sharded_state_dict(chunks)
        extra_state.match_checkpoint(sharded, ckpt)  # written by the other layer spec (TE / local)
        loaded = dist_checkpointing.load(sharded, str(ckpt))
        state = {key: loaded[key] for key in sharded}
        for name, tensor in _tensors(state):
            if name not in total:
                total[name] = torch.zeros(tensor.shape, dtype=accumulate, device=tensor.device)
            total[name].add_(tensor.to(accumulate), alpha=weight)
        newest_state = state
    # Non-tensor entries (e.g. TE's _extra_state) come from the newest checkpoint.
    for model_key, model_state in newest_state.items():
        for name in list(model_state):
            merged = total.get(f"{model_key}/{name}")
            if merged is not None:
                model_state[name] = merged.to(model_state[name].dtype)
    for index, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{index}"
        unwrap(chunk).load_state_dict(newest_state[key], strict=True)
