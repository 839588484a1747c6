"""A torch norm usable with sequence parallelism when neither Transformer Engine nor apex exist."""

from __future__ import annotations

import copy

from megatron.core.transformer.torch_norm import WrappedTorchNorm


class LocalNorm:
    """megatron-core's torch norm, allowed under sequence parallelism.

    megatron's wrapper refuses `sequence_parallel` because only fused norms mark their weights.
    We mark them here: with `sequence_parallel=True` on a parameter, megatron all-reduces its
    gradient over the tensor-parallel group, as it does for TE's norms.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        plain_config = config
        if config.sequence_parallel:
            plain_config = copy.copy(config)
            plain_config.sequence_parallel = False
        norm = WrappedTorchNorm(plain_config, hidden_size, eps=eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
