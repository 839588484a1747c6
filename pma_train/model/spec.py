"""Layer specs for HybridModel: Transformer Engine's on GPUs, megatron-core's local modules elsewhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from pma_train.model.norm import LocalNorm


def have_transformer_engine() -> bool:
    # megatron-core's own verdict: `import transformer_engine` can succeed while the pieces
    # megatron needs fail to import (a broken or mismatched TE build), and then its TE modules
    # are MagicMock stand-ins.
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except Exception:  # a missing or broken build: either way the kernel cannot be used
        return False
    return True


def detect_host(is_cuda: bool):
    """What this host offers the `perf` settings (pma_train/config/perf.py). CPU hosts import nothing."""
    from pma_train.config.perf import CPU, Host

    if not is_cuda:
        return CPU
    from megatron.core.transformer.moe import fused_a2a

    flex = frozenset(name for name, have in (("deepep", fused_a2a.HAVE_DEEP_EP), ("hybridep", fused_a2a.HAVE_HYBRIDEP))
                     if have)
    return Host(cuda=True, te=have_transformer_engine(), wgrad_kernel=_importable("fused_weight_gradient_mlp_cuda"),
                softmax_kernel=_importable("scaled_upper_triang_masked_softmax_cuda"), flex_backends=flex)


@contextlib.contextmanager
def local_final_norm(needed: bool = True) -> Iterator[None]:
    """HybridStack builds its final norm from TE's TENorm whatever the spec says; without a usable
    TE (a CPU host, or a GPU host without TE) that name must be our local norm while models are
    built. Restored afterwards: nothing else in the process sees the swap."""
    from megatron.core.models.hybrid import hybrid_block

    if not needed:
        yield
        return
    te_norm = hybrid_block.TENorm
    hybrid_block.TENorm = LocalNorm
    try:
        yield
    finally:
        hybrid_block.TENorm = te_norm


def te_stack_spec(num_experts: int | None = None, moe_grouped_gemm: bool = True) -> ModuleSpec:
    """megatron-core's TE hybrid spec, whose MoE layer always builds grouped-GEMM experts: with
    moe_grouped_gemm=False, the MoE layer gets TE's per-expert linears (SequentialMLP) instead.
    Both store experts under the same checkpoint keys (megatron-core maps grouped to per-expert)."""
    from dataclasses import replace

    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    if not num_experts or moe_grouped_gemm:
        return hybrid_stack_spec
    moe_layer = hybrid_stack_spec.submodules.moe_layer
    mlp = get_moe_module_spec(use_te=True, num_experts=num_experts, moe_grouped_gemm=False)
    moe_layer = replace(moe_layer, submodules=replace(moe_layer.submodules, mlp=mlp))
    return replace(hybrid_stack_spec, submodules=replace(hybrid_stack_spec.submodules, moe_layer=moe_layer))


def local_stack_spec(num_experts: int | None = None, moe_grouped_gemm: bool = False,
                     attention: str = "local") -> ModuleSpec:
    """A HybridStack spec from the local GPT layer's pieces, split into attention / MLP / MoE layers.

    The keys maps make checkpoint keys equal to the TE spec's (whose norms are fused into the
    next linear), so CPU-written and GPU-written checkpoints interchange. `attention`: sdpa puts
    torch's fused attention (model/attention.py) in place of megatron-core's unfused one.
    """
    dense = get_gpt_layer_local_submodules(normalization="RMSNorm")
    self_attention = dense.self_attention
    if attention == "sdpa":
        from dataclasses import replace

        from pma_train.model.attention import SDPAttention

        self_attention = replace(self_attention, submodules=replace(self_attention.submodules,
                                                                    core_attention=SDPAttention))
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalNorm,
            self_attention=self_attention,
            self_attn_bda=dense.self_attn_bda,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=LocalNorm,
            mlp=dense.mlp,
            mlp_bda=dense.mlp_bda,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )
    moe_layer = None
    if num_experts:
        moe = get_gpt_layer_local_submodules(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                             normalization="RMSNorm")
        # The TE spec keeps a separate pre-MLP norm in MoE layers: no keys map.
        moe_layer = ModuleSpec(
            module=MoETransformerLayer,
            submodules=TransformerLayerSubmodules(pre_mlp_layernorm=LocalNorm, mlp=moe.mlp, mlp_bda=moe.mlp_bda),
        )
    submodules = HybridStackSubmodules(attention_layer=attention_layer, mlp_layer=mlp_layer)
    if moe_layer is not None:
        submodules.moe_layer = moe_layer
    return ModuleSpec(module=HybridStack, submodules=submodules)


def initialize_userbuffers(cfg) -> None:
    """Transformer Engine's userbuffers for perf.tp_comm_overlap, sized for one micro-batch's
    sequence-parallel activations, as Megatron-LM's initialize does (after the process groups,
    before the model)."""
    import inspect

    from transformer_engine.pytorch import module as te_module

    shape = [cfg.train.seq_length * cfg.train.micro_batch_size, cfg.model.hidden_size]
    kwargs = dict(shape=shape, tp_size=cfg.parallel.tp, ub_cfgs={}, bootstrap_backend="nccl")
    if "quantization_modes" in inspect.signature(te_module.base.initialize_ub).parameters:  # TE >= 2.7
        modes = te_module.base.UserBufferQuantizationMode
        kwargs["quantization_modes"] = [modes.FP8 if cfg.perf.fp8 else modes.NONE]
    else:
        kwargs["use_fp8"] = cfg.perf.fp8 is not None
    te_module.base.initialize_ub(**kwargs)
