"""Per parameter of a DeepSpeed ZeRO checkpoint: its torch_dist key in pma-train's model and where its
fp32 master values lie (plan.py's views). What `pma-merge output_format=torch_dist` reads.

Names. The DeepSpeed engine wrapped pma-train's own model (megatron-core's HybridModel), so its
parameter names are the module's: `embedding.word_embeddings.weight`, `decoder.layers.<i>.<...>`,
`decoder.final_norm.weight`, `output_layer.weight`. The torch_dist key is that name, except that the
local layer spec's separate norms are saved under the fused key of the TE spec (megatron-core's
`sharded_state_dict_keys_map`): `input_layernorm.` -> `self_attention.linear_qkv.layer_norm_` and
`pre_mlp_layernorm.` -> `mlp.linear_fc1.layer_norm_` where the layer has that linear (a dense MLP; an
MoE layer keeps `pre_mlp_layernorm`); the experts of a layer (`mlp.experts.local_experts.<e>.<...>`, its
SequentialMLP at expert parallelism 1) are stacked, as megatron-core saves them, under
`mlp.experts.experts.<...>` with a leading expert axis. Any other naming (Hugging Face, Megatron-DeepSpeed's
`language_model.`, a different module) is refused by name: its tensors would need a layout mapping.

Positions: every input's own per-parameter view (plan.py), so inputs of other DP sizes, ZeRO stages
or universal checkpoints convert too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pma_train.merge.ds.archive import Archive, ArchiveError
from pma_train.merge.ds.plan import DsPlan, DsPlanError, param_shapes

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LAYER_MODULES = ("self_attention.", "mlp.", "mixer.", "input_layernorm.", "pre_mlp_layernorm.")
_TOP_LEVEL = re.compile(r"^(embedding\.word_embeddings\.weight|output_layer\.weight|decoder\.final_norm\.(weight|bias))$")
# The local spec's norm -> (the linear whose fused key it takes, the key prefix it takes).
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_FUSED_NORMS = {"input_layernorm.": ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_"),
                "pre_mlp_layernorm.": ("mlp.linear_fc1.weight", "mlp.linear_fc1.layer_norm_")}


@dataclass
class DsParam:
    name: str  # DeepSpeed's (the module's) name
    key: str | None  # the torch_dist key (None: not a name of pma-train's model)
    shape: tuple[int, ...]
    expert: int | None = None  # its index along the key's leading expert axis (stacked experts)
    global_shape: tuple[int, ...] = ()  # the key's: shape, with the expert axis in front for experts

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def prefix(self) -> tuple[int, ...]:
        """The key's leading offsets this parameter sits at."""
        return () if self.expert is None else (self.expert,)


def torch_dist_key(name: str, names: set[str]) -> str | None:
    """pma-train's torch_dist key of a DeepSpeed parameter name, or None if it is not one of its model's."""
    if _TOP_LEVEL.match(name):
        return name
    layer = _LAYER.match(name)
    if layer is None:
        return None
    prefix, rest = layer.group(0), name[layer.end():]
    if not rest.startswith(_LAYER_MODULES) or rest.endswith("."):
        return None
    for norm, (linear, fused) in _FUSED_NORMS.items():
        if rest.startswith(norm) and prefix + linear in names:
            return prefix + fused + rest[len(norm):]
    return _EXPERT.sub(".mlp.experts.experts.", name)


def expert_of(name: str) -> int | None:
    match = _EXPERT.search(name)
    return int(match.group(1)) if match else None


def locate(ds_plan: DsPlan) -> list[DsParam]:
    """Every trained parameter of the newest input, with its key; DsPlanError naming
    the first parameters that are not pma-train's, or partitions that do not add up."""
    params = positions(ds_plan)
    unknown = [p.name for p in params if p.key is None]
    if unknown:
        raise DsPlanError(f"{ds_plan.checkpoints[-1].path}: parameter {unknown[0]!r} is not a parameter of pma-train's "
                          f"model ({len(unknown)} such, first: {unknown[:4]}): output_format=torch_dist converts a "
                          "DeepSpeed engine wrapping pma-train's model (names embedding.word_embeddings.weight, "
                          "decoder.layers.<i>.<module>..., decoder.final_norm.weight, output_layer.weight)")
    return params


def positions(ds_plan: DsPlan) -> list[DsParam]:
    """Every trained parameter of the newest input with its torch_dist key, in DeepSpeed's order (where its values lie: each
    input's per-parameter view, plan.py); the key of
    a name that is not pma-train's is None."""
    newest = ds_plan.checkpoints[-1]
    if newest.mp_size != 1:
        raise DsPlanError(f"{newest.path}: {newest.mp_size} model-parallel ranks (mp_rank_XX): a Megatron-DeepSpeed "
                          "tensor / pipeline-parallel model is not pma-train's; output_format=torch_dist converts "
                          "checkpoints of a DeepSpeed engine wrapping pma-train's model (MP = 1)")
    try:
        model = Archive(newest.path / newest.model_file(0))
    except ArchiveError as err:
        raise DsPlanError(str(err)) from None
    if model.objects.get("frozen_param_shapes"):
        frozen = [n for group in model.objects["frozen_param_shapes"] for n in group][:3]
        raise DsPlanError(f"{newest.path}: frozen parameters {frozen}: pma-train trains every parameter; "
                          "output_format=torch_dist converts checkpoints without frozen parameters")
    groups = param_shapes(model)
    names = {name for group in groups for name in group}
    params = [DsParam(name, torch_dist_key(name, names), shape, expert_of(name))
              for group in groups for name, shape in group.items()]
    _stack_experts(params, newest.path)
    return params


def _stack_experts(params: list[DsParam], where) -> None:
    """Each key's global shape; the experts stacked under one key: all of them, one shape."""
    by_key: dict[str, list[DsParam]] = {}
    for param in params:
        by_key.setdefault(param.key, []).append(param)
    for key, same in by_key.items():
        if key is not None and len(same) > 1 and any(p.expert is None for p in same):
            raise DsPlanError(f"{where}: parameters {[p.name for p in same][:3]} all map to the key {key}")
        if key is None or same[0].expert is None:
            for param in same:
                param.global_shape = param.shape
            continue
        experts = sorted(p.expert for p in same)
        if experts != list(range(len(same))) or len({p.shape for p in same}) != 1:
            raise DsPlanError(f"{where}: the experts stacked under {key} are {experts} with shapes "
                              f"{sorted({p.shape for p in same})}: expected 0..{len(same) - 1}, one shape")
        for param in same:
            param.global_shape = (len(same), *param.shape)
