"""What a DeepSpeed merge reads and writes, checked across the inputs before anything is written.

Inputs of one layout (same ZeRO stage, DP and MP sizes, parameter names and shapes, partition
sizes) merge partition by partition: output partition (mp, dp) of group g is the weighted sum of
the inputs' partitions (mp, dp, g), elementwise. Each partition file is one unit of work; under
ZeRO 1 / 2 the model-states file of each mp rank (the whole module in its training dtype) is a
unit of a second phase, cast from the merged partitions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pma_train.merge.ds.archive import Archive, ArchiveError, TensorRef
from pma_train.merge.ds.layout import DsCheckpoint, DsLayoutError, scan
from pma_train.merge.ds.pipe import DsPipeError, LayerUnit, layer_units

FP32_KEYS = ("single_partition_of_fp32_groups", "fp32_flat_groups")  # ZeRO 1 / 2 (and bf16), ZeRO-3
READ_BLOCK_BYTES = 4 * 2**20


class DsPlanError(ValueError):
    pass


@dataclass
class PartitionUnit:
    mp: int
    dp: int
    name: str  # the file name, the same in every input
    partitions: list[list[TensorRef]]  # per input (oldest first), per parameter group
    archives: list[Archive]  # per input

    @property
    def numel(self) -> int:
        return sum(ref.numel for ref in self.partitions[-1])


@dataclass
class ModelUnit:
    mp: int
    name: str
    module_bytes: int  # the module's tensors in their dtype: what the rewrite holds


@dataclass
class DsPlan:
    checkpoints: list[DsCheckpoint]
    zero_stage: int
    units: list[PartitionUnit]
    model_units: list[ModelUnit]  # empty under ZeRO-3 (its model-states files hold no parameter data)
    layer_units: list[LayerUnit]  # a pipeline run's module, one file per layer (ds/pipe.py); else empty


def fp32_partitions(archive: Archive) -> tuple[str, list[TensorRef]]:
    state = archive.objects.get("optimizer_state_dict") if isinstance(archive.objects, dict) else None
    for key in FP32_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), list):
            return key, state[key]
    raise DsPlanError(f"{archive.path}: no fp32 master partitions ({' / '.join(FP32_KEYS)}) in its "
                      "optimizer_state_dict: not a ZeRO checkpoint this merge reads")


def _stage(model: Archive) -> int:
    config = model.objects.get("ds_config") or {}
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    return int(stage.args[0]) if hasattr(stage, "args") else int(stage)


def _param_shapes(model: Archive) -> list[dict]:
    shapes = model.objects.get("param_shapes")
    if not isinstance(shapes, list):
        raise DsPlanError(f"{model.path}: no param_shapes")
    return [{name: tuple(shape) for name, shape in group.items()} for group in shapes]


def _differences(name: str, mine, newest, what: str) -> list[str]:
    if mine == newest:
        return []
    if isinstance(mine, list) and isinstance(newest, list) and len(mine) == len(newest):
        for g, (a, b) in enumerate(zip(mine, newest)):
            if a != b:
                only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
                if only_a or only_b:
                    return [f"{name}: {what} of group {g}: {only_a[:3]} not in the newest input, "
                            f"{only_b[:3]} only there"]
                bad = next(k for k in a if a[k] != b[k])
                return [f"{name}: {what} of group {g}: {bad} is {a[bad]}, the newest input has {b[bad]}"]
    return [f"{name}: {what} differ from the newest input's ({mine} vs {newest})"[:300]]


def plan(paths: list) -> DsPlan:
    """Scan and index every input; DsPlanError naming every difference (up to 8) with the newest."""
    try:
        checkpoints = [scan(p) for p in paths]
        newest = checkpoints[-1]
        models = [{mp: Archive(c.path / c.model_file(mp)) for mp in range(c.mp_size)} for c in checkpoints]
        optims = [{key: Archive(c.path / name) for key, name in c.optim_files.items()} for c in checkpoints]
    except (DsLayoutError, ArchiveError) as err:
        raise DsPlanError(str(err)) from None
    problems = [p for c, model in zip(checkpoints, models) if (p := _missing_ranks(c, model[0]))]
    if problems:
        raise DsPlanError("\n".join(problems[:8]))
    stage = _stage(models[-1][0])
    for c, model in zip(checkpoints, models):
        if sorted(c.optim_files.values()) != sorted(newest.optim_files.values()) or c.zero3 != newest.zero3:
            problems.append(f"{c.path}: ZeRO-{'3' if c.zero3 else '1/2'} files of DP={c.dp_size} MP={c.mp_size}; the "
                            f"newest input {newest.path} has ZeRO-{'3' if newest.zero3 else '1/2'} DP={newest.dp_size} "
                            f"MP={newest.mp_size} (inputs of different layouts do not merge yet)")
            continue
        if _stage(model[0]) != stage:
            problems.append(f"{c.path}: ZeRO stage {_stage(model[0])}, the newest input has stage {stage}")
        for mp in range(c.mp_size):
            problems += _differences(str(model[mp].path), _param_shapes(model[mp]), _param_shapes(models[-1][mp]),
                                     "parameter names / shapes")
    if problems:
        raise DsPlanError("inputs differ:\n  " + "\n  ".join(problems[:8]))
    units = []
    for key, name in sorted(newest.optim_files.items()):
        partitions = []
        for c, optim in zip(checkpoints, optims):
            try:
                partitions.append(fp32_partitions(optim[key])[1])
            except DsPlanError as err:
                problems.append(str(err))
                continue
            shapes, want = [r.shape for r in partitions[-1]], [r.shape for r in fp32_partitions(optims[-1][key])[1]]
            if shapes != want:
                problems.append(f"{c.path / name}: fp32 partitions of shapes {shapes}, the newest input's are {want}")
        units.append(PartitionUnit(key[0], key[1], name, partitions, [o[key] for o in optims]))
    if problems:
        raise DsPlanError("inputs differ:\n  " + "\n  ".join(problems[:8]))
    model_units = [] if newest.zero3 else [
        ModelUnit(mp, newest.model_file(mp), _module_bytes(models[-1][mp])) for mp in range(newest.mp_size)]
    try:
        layers = layer_units(checkpoints, models)
    except (DsPipeError, ArchiveError) as err:
        raise DsPlanError(str(err)) from None
    return DsPlan(checkpoints, stage, units, model_units, layers)


def _missing_ranks(c: DsCheckpoint, model: Archive) -> str | None:
    """The partition files of the ranks beyond the last one present (scan() finds gaps before it)."""
    recorded = model.objects.get("dp_world_size")
    if isinstance(recorded, int) and recorded > c.dp_size:
        missing = [f"*zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"
                   for mp in range(c.mp_size) for dp in range(c.dp_size, recorded)]
        return (f"{c.path}: partition files of data-parallel ranks {c.dp_size}..{recorded - 1} are missing "
                f"({', '.join(missing[:3])}); {model.path.name} records dp_world_size={recorded}")
    return None


def _module_bytes(model: Archive) -> int:
    module = model.objects.get("module") or {}
    return sum(t.nbytes for t in module.values() if isinstance(t, TensorRef))


def unit_bytes(unit: PartitionUnit, accumulate: torch.dtype) -> int:
    """Peak memory of merging one partition file: the accumulator, its fp32 cast, the newest
    input's optimizer moments (Adam: two fp32 tensors of the partition's size), one read block."""
    acc = torch.empty((), dtype=accumulate).element_size()
    return unit.numel * (acc + (4 if accumulate != torch.float32 else 0) + 8) + READ_BLOCK_BYTES


def check_budget(ds_plan: DsPlan, accumulate: torch.dtype, budget_bytes: int) -> None:
    """A partition file is written whole (torch.save): refuse, naming the file, when one cannot fit."""
    needs = [(unit_bytes(u, accumulate), str(ds_plan.checkpoints[-1].path / u.name)) for u in ds_plan.units]
    needs += [(m.module_bytes + READ_BLOCK_BYTES, str(ds_plan.checkpoints[-1].path / m.name))
              for m in ds_plan.model_units]
    needs += [(u.layer_bytes + READ_BLOCK_BYTES, str(ds_plan.checkpoints[-1].path / u.name))
              for u in ds_plan.layer_units]
    need, where = max(needs)
    if need > budget_bytes:
        raise DsPlanError(f"memory_budget_mb={budget_bytes // 2**20}: rewriting {where} needs "
                          f"{-(-need // 2**20)} MiB (a DeepSpeed partition file is written whole); raise "
                          "memory_budget_mb, or merge a checkpoint saved from more data-parallel ranks")
