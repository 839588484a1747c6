"""The merge tracked during training: PMA of the last n grid checkpoints, sharded like the model.

Each rank keeps CPU copies of its own parameter shards at the last n grid points (no gather, no
disk reads) and forms their weighted average when asked. Evaluating the merge swaps it into the
model and back, so the live run is untouched.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager

import torch

from pma_train.merge.weights import merge_weights


class MergeTracker:
    def __init__(self, model_chunks: list[torch.nn.Module], n: int, method: str, alpha: float,
                 decay_shape: str = "linear"):
        self.params = [p for chunk in model_chunks for p in chunk.parameters()]
        self.n, self.method, self.alpha, self.decay_shape = n, method, alpha, decay_shape
        self.snapshots: deque[tuple[int, list[torch.Tensor]]] = deque(maxlen=n)

    @torch.no_grad()
    def add(self, iteration: int) -> None:
        """Record this rank's shards at a grid point (called when the grid checkpoint is taken)."""
        self.snapshots.append((iteration, [p.detach().to("cpu", dtype=torch.float32, copy=True) for p in self.params]))

    @property
    def ready(self) -> bool:
        return len(self.snapshots) == self.n

    @property
    def iterations(self) -> list[int]:
        return [it for it, _ in self.snapshots]

    def weights(self) -> list[float]:
        return merge_weights(self.method, len(self.snapshots), self.alpha, decay_shape=self.decay_shape)

    @torch.no_grad()
    def merged(self) -> list[torch.Tensor]:
        weights = self.weights()
        out = [torch.zeros_like(t) for t in self.snapshots[0][1]]
        for weight, (_, tensors) in zip(weights, self.snapshots):
            for acc, tensor in zip(out, tensors):
                acc.add_(tensor, alpha=weight)
        return out

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The model holds the merged weights inside the block, its live weights after."""
        live = [p.detach().clone() for p in self.params]
        for param, value in zip(self.params, self.merged()):
            param.copy_(value.to(param.device, param.dtype))
        try:
            yield
        finally:
            for param, value in zip(self.params, live):
                param.copy_(value)

    @contextmanager
    @torch.no_grad()
    def loaded(self, model_chunks, ckpt_dir):
        """The model holds a checkpoint's weights inside the block (each rank reads its shards)."""
        from pma_train.checkpoint.state import load_checkpoint

        live = [p.detach().clone() for p in self.params]
        load_checkpoint(ckpt_dir, model_chunks)
        try:
            yield
        finally:
            for param, value in zip(self.params, live):
                param.copy_(value)

    def state_dict(self) -> dict:
        return {"iterations": self.iterations}
