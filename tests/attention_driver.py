"""python -m tests.attention_driver: megatron-core's DotProductAttention and pma-train's SDPAttention
on the same random causal-attention inputs (fp32, CPU, grouped-query heads), one process; prints the
largest differences of the outputs and of the gradients of q, k and v as JSON, and whether a mask is
refused by name."""

from __future__ import annotations

import json


def main() -> None:
    import torch
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from pma_train.config import JobConfig
    from pma_train.model.attention import SDPAttention
    from pma_train.parallel import init_distributed, use_platform
    from pma_train.platform import detect

    platform = detect()
    use_platform(platform)  # on CPU, the layer that gives megatron-core's causal mask a device
    init_distributed(JobConfig().parallel, platform, 5)
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                               attention_dropout=0.0, params_dtype=torch.float32)
    local, sdpa = (cls(config, layer_number=2, attn_mask_type=AttnMaskType.causal, attention_type="self")
                   for cls in (DotProductAttention, SDPAttention))
    generator = torch.Generator().manual_seed(11)
    s, b, d = 48, 3, 8  # [s, b, heads, dim], keys/values with 2 groups of 4 query heads
    inputs = [torch.randn(s, b, h, d, generator=generator) for h in (8, 2, 2)]
    grad_out = torch.randn(s, b, 8 * d, generator=generator)
    results = {}
    for name, module in (("local", local), ("sdpa", sdpa)):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = module(q, k, v, attention_mask=None)
        out.backward(grad_out)
        results[name] = [out.detach(), q.grad, k.grad, v.grad]
    diffs = {key: (a - c).abs().max().item() / c.abs().max().item()
             for key, a, c in zip(("out", "dq", "dk", "dv"), results["sdpa"], results["local"])}
    try:
        sdpa(*inputs, attention_mask=torch.ones(b, 1, s, s, dtype=torch.bool))
        diffs["mask"] = "accepted"
    except ValueError as err:
        diffs["mask"] = str(err)
    diffs["shape"] = list(results["sdpa"][0].shape)
    print(json.dumps(diffs))


if __name__ == "__main__":
    main()
