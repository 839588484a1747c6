"""What a DeepSpeed merge reads and writes, checked across the inputs before anything is written.

The output takes the newest input's layout: its partition files, each the unit of work of one
merge rank. Every input is indexed as a per-parameter view (`Fragment`s: which elements of which
parameter lie where in which file), computed from the recorded parameter shapes and DeepSpeed's
partitioning rules, so inputs of other DP sizes, ZeRO stages or universal checkpoints merge too:
an output partition is, fragment by fragment, the weighted sum of the elements the inputs hold for
the same parameter range, read as byte ranges of their files; no process gathers a parameter
beyond the share its output partition holds. Under ZeRO 1 / 2 the model-states file of each mp rank
(the whole module in its training dtype) is a unit of a second phase, cast from the merged partitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pma_train.merge.ds.archive import Archive, ArchiveError, TensorRef
from pma_train.merge.ds.layout import DsCheckpoint, DsLayoutError, scan
from pma_train.merge.ds.pipe import DsPipeError, LayerUnit, layer_units

FP32_KEYS = ("single_partition_of_fp32_groups", "fp32_flat_groups")  # ZeRO 1 / 2 (and bf16), ZeRO-3
READ_BLOCK_BYTES = 4 * 2**20


class DsPlanError(ValueError):
    pass


@dataclass(frozen=True)
class Fragment:
    """Elements [start, start + numel) of one flattened parameter, stored at elements
    [offset, offset + numel) of `ref` in `archive`."""

    archive: Archive
    ref: TensorRef
    offset: int
    start: int
    numel: int


@dataclass
class InputView:
    """One input, per parameter: (mp, name) -> its fragments, in parameter order."""

    checkpoint: DsCheckpoint
    fragments: dict[tuple[int, str], list[Fragment]]
    files: dict[tuple[int, int], Archive] = field(default_factory=dict)  # (mp, dp) -> partition file


@dataclass
class PartitionUnit:
    mp: int
    dp: int
    name: str  # the newest input's file: the output's
    archive: Archive  # the newest input's
    partitions: list[TensorRef]  # the newest input's fp32 partitions, per parameter group
    segments: list[list[tuple[str, Fragment]]]  # per group: the (parameter, fragment) each part holds
    views: list[InputView] = field(default_factory=list)  # every input's, oldest first

    @property
    def numel(self) -> int:
        return sum(ref.numel for ref in self.partitions)


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


def param_shapes(model: Archive) -> list[dict]:
    shapes = model.objects.get("param_shapes")
    if not isinstance(shapes, list):
        zero0 = bool(model.objects.get("ds_config")) and _stage(model) == 0
        raise DsPlanError(f"{model.path}: no param_shapes" + (
            " (a ZeRO stage 0 run, e.g. a bf16 pipeline under DeepSpeed's BF16_Optimizer: DeepSpeed records the "
            "order of the parameters in its flat *_optim_states.pt partitions only under ZeRO, so where each one "
            "lies is not known; pma-merge reads checkpoints of ZeRO stage 1, 2 and 3)" if zero0 else ""))
    return [{name: tuple(shape) for name, shape in group.items()} for group in shapes]


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _differences(name: str, mine: dict, newest: dict) -> list[str]:
    """Parameter names and shapes (all groups) against the newest input's."""
    if mine == newest:
        return []
    only_a, only_b = sorted(set(mine) - set(newest)), sorted(set(newest) - set(mine))
    if only_a or only_b:
        return [f"{name}: parameters {only_a[:3]} not in the newest input, {only_b[:3]} only there"]
    bad = next(k for k in mine if mine[k] != newest[k])
    return [f"{name}: parameter {bad} is {mine[bad]}, the newest input has {newest[bad]}"]


def _zero12_fragments(c: DsCheckpoint, mp: int, groups: list[dict], optims: dict) -> dict:
    """ZeRO 1 / 2: a group's parameters lie back to back in one flat buffer (padded at its end), cut
    into DP consecutive partitions (sizes differing by one where DP does not divide it); where each
    rank's begins: the recorded partition sizes, summed."""
    out, parts = {}, [fp32_partitions(optims[(mp, dp)])[1] for dp in range(c.dp_size)]
    for g, group in enumerate(groups):
        if any(g >= len(p) for p in parts):
            raise DsPlanError(f"{c.path}: {len(groups)} parameter groups, fewer fp32 partitions in a partition file")
        bounds = [0]
        for p in parts:
            bounds.append(bounds[-1] + p[g].numel)
        pos, total = 0, sum(_numel(s) for s in group.values())
        if total > bounds[-1]:
            raise DsPlanError(f"{c.path}: group {g}'s parameters hold more elements than its {c.dp_size} "
                              f"partitions ({bounds[-1]}): param_shapes and partitions disagree")
        _check_zero12_count(c, mp, g, total, [optims[(mp, dp)] for dp in range(c.dp_size)])
        for name, shape in group.items():
            n, at, frags = _numel(shape), pos, []
            while at < pos + n:
                dp = next(r for r in range(c.dp_size) if at < bounds[r + 1])
                stop = min(pos + n, bounds[dp + 1])
                frags.append(Fragment(optims[(mp, dp)], parts[dp][g], at - bounds[dp], at - pos, stop - at))
                at = stop
            out[(mp, name)], pos = frags, pos + n
    return out


def _check_zero12_count(c: DsCheckpoint, mp: int, g: int, total: int, files: list[Archive]) -> None:
    """The recorded parameter shapes of group g hold as many elements as its partitions, less the
    padding the rank files record where they hold it. DeepSpeed cuts a padded flat buffer into equal
    partitions; its ZeRO 1 / 2 optimizer saves them without the padding (each rank's size plus its
    padding equal), its bf16 optimizer with it (sizes equal). Without recorded paddings, DeepSpeed's
    own rule: equal once both are rounded up to 2 x DP. Else a shape is corrupt, and every parameter
    after it would be read from the wrong place."""
    states = [f.objects["optimizer_state_dict"] for f in files]
    for f, state in zip(files, states):
        aligned = (state.get("param_alignment_paddings") or [[]] * (g + 1))[g]
        if any(aligned):
            raise DsPlanError(f"{f.path}: parameters of group {g} are padded for alignment (param_alignment_paddings "
                              f"{list(aligned)[:6]}, zero_optimization.parameter_alignment): a layout this merge "
                              "does not read (parameters back to back)")
    sizes = [fp32_partitions(f)[1][g].numel for f in files]
    paddings = [state.get("group_paddings") for state in states]
    if all(isinstance(p, list) and g < len(p) for p in paddings):
        pads = [p[g] for p in paddings]
        held = {sum(sizes)} if len({n + p for n, p in zip(sizes, pads)}) == 1 else set()
        held |= {sum(sizes) - sum(pads)} if len(set(sizes)) == 1 else set()
        found = f"{' + '.join(map(str, sizes))} with the group_paddings {pads} they record"
    else:
        align = 2 * c.dp_size
        held, total = {-(-sum(sizes) // align) * align}, -(-total // align) * align
        found = f"{sum(sizes)} (rounded up to {align}: {min(held)}; the shapes' {total})"
    if total not in held:
        raise DsPlanError(f"{c.path / c.model_file(mp)}: param_shapes of group {g} hold {total} elements, its "
                          f"{c.dp_size} partition files ({files[0].path.name}, ...) {found}: param_shapes and "
                          "partitions disagree (a corrupt or edited file)")


def _zero3_fragments(c: DsCheckpoint, mp: int, groups: list[dict], optims: dict) -> dict:
    """ZeRO-3: each parameter is padded to a multiple of DP and cut in DP equal parts; rank dp's
    flat group is its part of every parameter of the group, in order."""
    out, parts = {}, [fp32_partitions(optims[(mp, dp)])[1] for dp in range(c.dp_size)]
    for g, group in enumerate(groups):
        offset = 0
        for name, shape in group.items():
            n = _numel(shape)
            part = -(-n // c.dp_size)
            out[(mp, name)] = [Fragment(optims[(mp, dp)], parts[dp][g], offset, dp * part, min(n, (dp + 1) * part) - dp * part)
                               for dp in range(c.dp_size) if dp * part < n]
            offset += part
        bad = next((dp for dp, p in enumerate(parts) if g >= len(p) or p[g].numel != offset), None)
        if bad is not None:
            raise DsPlanError(f"{c.path}: the ZeRO-3 fp32 partitions of group {g} do not hold {offset} elements, "
                              f"one part of each of its parameters ({optims[(mp, bad)].path.name} holds "
                              f"{parts[bad][g].numel if g < len(parts[bad]) else 0}; {c.model_file(mp)} records the "
                              "shapes): param_shapes and partitions disagree")
    return out


def _universal_fragments(c: DsCheckpoint, shapes: dict) -> dict:
    out = {}
    for name, shape in shapes.items():
        path = c.universal_file(name)
        if not path.is_file():
            raise DsPlanError(f"{c.path}: universal checkpoint without {path.relative_to(c.path)} for parameter {name}")
        try:
            archive = Archive(path)
        except ArchiveError as err:
            raise DsPlanError(str(err)) from None
        ref = archive.objects if isinstance(archive.objects, TensorRef) else (
            archive.objects.get("param") if isinstance(archive.objects, dict) else None)
        if not isinstance(ref, TensorRef) or ref.numel != _numel(shape) or ref.dtype != torch.float32:
            raise DsPlanError(f"{path}: not an fp32 tensor of {name}'s {_numel(shape)} elements {shape}")
        out[(0, name)] = [Fragment(archive, ref, 0, 0, ref.numel)]
    return out


def _view(c: DsCheckpoint, models: dict[int, Archive]) -> InputView:
    fragments = {}
    if c.universal:
        shapes = {k: v for group in param_shapes(models[0]) for k, v in group.items()}
        return InputView(c, _universal_fragments(c, shapes))
    optims = {key: Archive(c.path / name) for key, name in c.optim_files.items()}
    rule = _zero3_fragments if c.zero3 else _zero12_fragments
    for mp in range(c.mp_size):
        fragments.update(rule(c, mp, param_shapes(models[mp]), optims))
    return InputView(c, fragments, optims)


def plan(paths: list) -> DsPlan:
    """Scan and index every input; DsPlanError naming every difference (up to 8) with the newest."""
    try:
        checkpoints = [scan(p) for p in paths]
        newest = checkpoints[-1]
        if newest.universal:
            raise DsPlanError(f"{newest.path}: the newest input is a universal checkpoint; the output takes the "
                              "newest input's layout (its partition files), which a universal checkpoint lacks: "
                              "merge into a ZeRO checkpoint (the newest input), universal ones as older inputs")
        models = [{mp: Archive(c.path / c.model_file(mp)) for mp in range(c.mp_size)} for c in checkpoints]
    except (DsLayoutError, ArchiveError) as err:
        raise DsPlanError(str(err)) from None
    problems = [p for c, model in zip(checkpoints, models) if not c.universal and (p := _missing_ranks(c, model[0]))]
    if problems:
        raise DsPlanError("\n".join(problems[:8]))
    stage = _stage(models[-1][0])
    want = [{k: v for group in param_shapes(models[-1][mp]) for k, v in group.items()} for mp in range(newest.mp_size)]
    for c, model in zip(checkpoints, models):
        if c.mp_size != newest.mp_size:
            problems.append(f"{c.path}: {c.describe()}; the newest input {newest.path} has MP={newest.mp_size} "
                            "(inputs of different model-parallel sizes do not merge)")
            continue
        for mp in range(c.mp_size):
            problems += _differences(str(model[mp].path), {k: v for group in param_shapes(model[mp])
                                                            for k, v in group.items()}, want[mp])
    if problems:
        raise DsPlanError("inputs differ:\n  " + "\n  ".join(problems[:8]))
    views = []
    for c, model in zip(checkpoints, models):
        try:
            views.append(_view(c, model))
        except (DsPlanError, ArchiveError) as err:
            problems.append(str(err))
    if problems:
        raise DsPlanError("inputs differ:\n  " + "\n  ".join(problems[:8]))
    units = [_unit(key, name, views) for key, name in sorted(newest.optim_files.items())]
    model_units = [] if newest.zero3 else [
        ModelUnit(mp, newest.model_file(mp), _module_bytes(models[-1][mp])) for mp in range(newest.mp_size)]
    try:
        layers = layer_units(checkpoints, models)
    except (DsPipeError, ArchiveError) as err:
        raise DsPlanError(str(err)) from None
    return DsPlan(checkpoints, stage, units, model_units, layers)


def _unit(key: tuple[int, int], name: str, views: list[InputView]) -> PartitionUnit:
    """Output partition file `name`: the newest input's fragments that lie in it, by group."""
    archive = views[-1].files[key]
    _, partitions = fp32_partitions(archive)
    segments = [[] for _ in partitions]
    for (mp, param), frags in views[-1].fragments.items():
        for frag in frags:
            if frag.archive is archive:
                segments[next(g for g, ref in enumerate(partitions) if ref is frag.ref)].append((param, frag))
    return PartitionUnit(key[0], key[1], name, archive, partitions, segments, views)


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
