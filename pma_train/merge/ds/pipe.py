"""DeepSpeed pipeline-parallel layer files (`layer_<LL>[-model_<tp>]-model_states.pt`) in a merge.

A pipeline run's module lives in one file per layer (the layer's state dict, parameter `<key>`),
while its master weights live in the partitions of the stage that owns the layer, under the
PipelineModule's name `<LL>.<key>`. Each layer file is a unit of the merge's second phase: the
newest input's file with every trained parameter cast from the merged partitions of its stage (as
the mp_rank model-states file of a ZeRO 1 / 2 run), buffers and frozen parameters from the newest
input. Tied layers (their masters are named `tied_modules.<key>.<param>`, in no layer's name) are
refused by name before anything is written: their module weights could not follow the merge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pma_train.merge.ds.archive import Archive, TensorRef, load_objects
from pma_train.merge.ds.layout import DsCheckpoint


class DsPipeError(ValueError):
    pass


@dataclass
class LayerUnit:
    name: str  # the file name, the same in every input
    layer: int
    mp: int | None  # the mp rank (pipeline stage) whose partitions hold this layer's masters; None: no masters
    layer_bytes: int  # the layer's tensors in their dtype: what the rewrite holds


def layer_units(checkpoints: list[DsCheckpoint], models: list[dict[int, Archive]]) -> list[LayerUnit]:
    """The newest input's layer files, each tied to the stage owning its parameters; DsPipeError
    when the inputs' layer files differ or a stage's master weights are in no layer file."""
    newest, problems = checkpoints[-1], []
    for c in checkpoints[:-1]:
        if c.layer_files != newest.layer_files:
            only_c = sorted(set(c.layer_files) - set(newest.layer_files))
            only_n = sorted(set(newest.layer_files) - set(c.layer_files))
            problems.append(f"{c.path}: pipeline layer files {only_c[:3]} not in the newest input, {only_n[:3]} "
                            "only there")
    if problems:
        raise DsPipeError("inputs differ:\n  " + "\n  ".join(problems[:8]))
    if not newest.layer_files:
        return []
    owner = {}  # master parameter name -> mp rank
    for mp, model in models[-1].items():
        if model.objects.get("module") is not None:
            raise DsPipeError(f"{model.path}: holds a module beside pipeline layer files: a layout this merge "
                              "does not read")
        for group in model.objects.get("param_shapes") or []:
            owner.update((name, mp) for name in group)
    units, covered = [], set()
    for name, (layer, _) in sorted(newest.layer_files.items()):
        layer_file = Archive(newest.path / name)
        if not isinstance(layer_file.objects, dict):
            raise DsPipeError(f"{layer_file.path}: holds a {type(layer_file.objects).__name__}, not a layer's "
                              "state dict")
        tensors = {k: v for k, v in layer_file.objects.items() if isinstance(v, TensorRef)}
        stages = {owner[f"{layer}.{k}"] for k in tensors if f"{layer}.{k}" in owner}
        if len(stages) > 1:
            raise DsPipeError(f"{layer_file.path}: its parameters are master weights of stages {sorted(stages)}")
        covered.update(f"{layer}.{k}" for k in tensors)
        units.append(LayerUnit(name, layer, stages.pop() if stages else None,
                               sum(t.nbytes for t in tensors.values())))
    orphans = sorted(set(owner) - covered)
    if orphans:
        raise DsPipeError(f"{newest.path}: master weights {orphans[:4]} are in no pipeline layer file as "
                          "<layer>.<name> (tied layers, TiedLayerSpec): a layout this merge does not read")
    return units


def write_layer_file(newest: Path, unit: LayerUnit, merged: list[Archive],
                     partitions_of: Callable[[Archive], list[TensorRef]], tmp: Path) -> None:
    """The newest input's layer file, each trained parameter = its stage's merged master weight
    (`merged`: the output's partition files of that stage, by dp rank; `partitions_of`: their fp32
    partitions per group), in the file's dtype."""
    state = load_objects(newest / unit.name)
    for key, value in state.items():
        pieces = []
        for archive in merged:
            optim = archive.objects["optimizer_state_dict"]
            for g, mapping in enumerate(optim.get("param_slice_mappings") or []):
                where = mapping.get(f"{unit.layer}.{key}")
                if where is not None:
                    start, numel = where.get("start"), where.get("numel")
                    pieces.append(archive.read(partitions_of(archive)[g], start, start + numel))
        if not pieces:
            continue  # a buffer or frozen parameter: the newest input's
        flat = torch.cat(pieces)
        if flat.numel() != value.numel():
            raise DsPipeError(f"{unit.name}: {key} has {flat.numel()} of its {value.numel()} elements in the "
                              "partitions' param_slice_mappings")
        state[key] = flat.view(value.shape).to(value.dtype)
    torch.save(state, tmp / unit.name)
