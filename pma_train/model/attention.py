"""Core attention for the local (non-TE) spec through torch's scaled_dot_product_attention.

megatron-core's local DotProductAttention materialises the [b, heads, s, s] scores and their softmax:
at 4k tokens that is 0.5-1 GiB per layer and micro-batch, read and written several times, and on a
GPU without Transformer Engine it made attention most of the step (benchmarks/results/gpu_acceptance.md).
torch's SDPA picks a flash / memory-efficient kernel on CUDA instead. Same parameters (none), same
checkpoint keys, same function: a drop-in for the spec's `core_attention` (perf.attention_backend).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """DotProductAttention's contract (q, k, v as [s, b, heads, dim]; output [s, b, heads * dim]) for
    causal self-attention without an explicit mask, computed by F.scaled_dot_product_attention."""

    def __init__(self, config, layer_number, attn_mask_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, *args, **kwargs)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"perf.attention_backend=sdpa computes causal attention only, got {attn_mask_type}")
        if self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None:
            raise ValueError("perf.attention_backend=sdpa has no softmax offset or sliding window: use local")
        # With query-key layer scaling, the parent divides the scale by the layer number and its
        # softmax multiplies it back: SDPA sees the product.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("perf.attention_backend=sdpa takes no attention mask, bias or packed sequences "
                             "(the causal mask is implied): use perf.attention_backend=local")
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        p = self.attention_dropout.p if self.training else 0.0
        # Dropout draws from the model-parallel RNG like the parent's (same fork, same condition).
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 and not self.config.sequence_parallel
               else contextlib.nullcontext())
        with rng:
            context = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                                       scale=self.sdpa_scale)
        # [b, h, s, d] -> [s, b, h * d]
        s, b = context.size(2), context.size(0)
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)
