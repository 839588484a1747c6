"""Per parameter of a DeepSpeed ZeRO checkpoint: its torch_dist key in pma-train's model and where its
fp32 master values lie in the partition files. What `pma-merge output_format=torch_dist` reads.

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

Positions, as DeepSpeed lays them out (and its zero_to_fp32 reads them back):
- ZeRO 1 / 2: per parameter group, the parameters flattened in `param_shapes` order, concatenated,
  padded at the end, and cut into DP equal partitions (partition k: file of dp rank k);
- ZeRO 3: every parameter cut into DP parts of ceil(numel / DP) elements (the last padded); dp rank
  k's flat partition (its groups concatenated) holds its part of every parameter in order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from pma_train.merge.ds.archive import Archive, ArchiveError
from pma_train.merge.ds.plan import DsPlan, DsPlanError, _param_shapes

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LAYER_MODULES = ("self_attention.", "mlp.", "mixer.", "input_layernorm.", "pre_mlp_layernorm.")
_TOP_LEVEL = re.compile(r"^(embedding\.word_embeddings\.weight|output_layer\.weight|decoder\.final_norm\.(weight|bias))$")
# The local spec's norm -> (the linear whose fused key it takes, the key prefix it takes).
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_FUSED_NORMS = {"input_layernorm.": ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_"),
                "pre_mlp_layernorm.": ("mlp.linear_fc1.weight", "mlp.linear_fc1.layer_norm_")}


@dataclass(frozen=True)
class Segment:
    """Elements [param_start, param_start + count) of a parameter's flat values, stored from element
    `start` of fp32 partition `group` of partition file `unit` (an index into DsPlan.units)."""

    unit: int
    group: int
    start: int
    param_start: int
    count: int


@dataclass
class DsParam:
    name: str  # DeepSpeed's (the module's) name
    key: str | None  # the torch_dist key (None: not a name of pma-train's model)
    shape: tuple[int, ...]
    expert: int | None = None  # its index along the key's leading expert axis (stacked experts)
    global_shape: tuple[int, ...] = ()  # the key's: shape, with the expert axis in front for experts
    segments: list[Segment] = field(default_factory=list)

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
    """Every trained parameter of the newest input, with its key and segments; DsPlanError naming
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
    """Every trained parameter of the newest input with its segments, in DeepSpeed's order; the key of
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
    groups = _param_shapes(model)
    _check_order(ds_plan, [list(group) for group in groups])
    names = {name for group in groups for name in group}
    params = [[DsParam(name, torch_dist_key(name, names), shape, expert_of(name)) for name, shape in group.items()]
              for group in groups]
    _stack_experts([p for group in params for p in group], newest.path)
    sizes = [[ref.numel for ref in unit.partitions[-1]] for unit in ds_plan.units]  # per dp rank, per group
    if newest.zero3:
        _locate_zero3([p for group in params for p in group], sizes, newest.path)
    else:
        for g, group in enumerate(params):
            _locate_zero12(group, g, [s[g] for s in sizes], newest.path)
    return [p for group in params for p in group]


def _check_order(ds_plan: DsPlan, newest: list[list[str]]) -> None:
    """Every input flattened its parameters in the newest input's order: positions are read from the
    newest's (the plan compared names and shapes, not their order)."""
    for ckpt in ds_plan.checkpoints[:-1]:
        try:
            order = [list(group) for group in _param_shapes(Archive(ckpt.path / ckpt.model_file(0)))]
        except ArchiveError as err:
            raise DsPlanError(str(err)) from None
        if order != newest:
            first = next(i for i, (a, b) in enumerate(zip(sum(order, []), sum(newest, []))) if a != b)
            raise DsPlanError(f"{ckpt.path}: its parameters are flattened in another order than the newest input's "
                              f"(position {first}: {sum(order, [])[first]} vs {sum(newest, [])[first]})")


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


def _spans(sizes: list[int], start: int, count: int):
    """(index, offset in it, elements) covering [start, start + count) of the concatenation of pieces of `sizes`."""
    base = 0
    for index, size in enumerate(sizes):
        lo, hi = max(start, base), min(start + count, base + size)
        if lo < hi:
            yield index, lo - base, hi - lo
        base += size


def _locate_zero12(group: list[DsParam], g: int, partition_sizes: list[int], where) -> None:
    offset = 0
    for param in group:
        done = 0
        for dp, start, count in _spans(partition_sizes, offset, param.numel):
            param.segments.append(Segment(dp, g, start, done, count))
            done += count
        if done != param.numel:
            raise DsPlanError(f"{where}: parameter group {g} ends inside {param.name} (its fp32 partitions hold "
                              f"{sum(partition_sizes)} elements): the partitions do not match param_shapes")
        offset += param.numel
    align = 2 * len(partition_sizes)  # DeepSpeed pads a group's flat buffer to a multiple of 2 x DP
    if -(-offset // align) * align != -(-sum(partition_sizes) // align) * align:
        raise DsPlanError(f"{where}: parameter group {g} holds {sum(partition_sizes)} fp32 elements, its parameters "
                          f"{offset}: the partitions do not match param_shapes")


def _locate_zero3(params: list[DsParam], sizes: list[list[int]], where) -> None:
    dp_size, offset = len(sizes), 0
    for param in params:
        part = -(-param.numel // dp_size)
        for dp in range(dp_size):
            first = dp * part
            count = min(part, param.numel - first)
            for g, start, n in _spans(sizes[dp], offset, max(count, 0)):
                param.segments.append(Segment(dp, g, start, first, n))
                first += n
        offset += part
    if any(offset != sum(s) for s in sizes):
        raise DsPlanError(f"{where}: each rank's fp32 partitions hold {[sum(s) for s in sizes]} elements, the "
                          f"parameters' parts {offset}: the partitions do not match param_shapes")
