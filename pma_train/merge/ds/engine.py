"""The sharded merge of DeepSpeed ZeRO checkpoints: every rank merges its share of partition files.

Phase 1: the newest input's partition files (one per DP x MP rank) are split among the merge ranks
by bytes; for each parameter range an output partition holds, a rank streams the elements the N
inputs hold for it (their own layouts: other DP sizes, stages, universal files; plan.py) in blocks,
accumulates in fp32 / fp64, and writes the file back as the newest input's with the merged
partitions (optimizer moments and step carried, or reset to zero). Phase 2 (ZeRO 1 / 2): each mp rank's model-states file
is the newest input's with every trained parameter cast from the merged partitions (so the module
weights are the master weights in their training dtype); ZeRO-3's hold no parameter data and are
copied. Rank 0 records provenance and checksums, publishes `<output>/<tag>/` atomically and points
`<output>/latest` at it. No process holds the model beyond one module file of a ZeRO 1 / 2 run,
which DeepSpeed's own format stores whole.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from pma_train.checkpoint import integrity, layout
from pma_train.merge.ds.archive import Archive, import_deepspeed, load_objects
from pma_train.merge.ds.layout import LATEST, read_latest, step_of
from pma_train.merge.ds.pipe import LayerUnit, write_layer_file
from pma_train.merge.ds.plan import (
    READ_BLOCK_BYTES,
    DsPlan,
    DsPlanError,
    Fragment,
    ModelUnit,
    PartitionUnit,
    check_budget,
    fp32_partitions,
    plan,
    unit_bytes,
)
from pma_train.merge.engine import DTYPES, PROVENANCE, package_version
from pma_train.merge.plan import Piece, assign
from pma_train.merge.publish import (
    MergeError,
    MergeRequest,
    MergeSummary,
    claimed_output,
    describe,
    fail_together,
    inputs_leased,
    publish,
)
from pma_train.rss import PeakRss


def run_ds_merge(request: MergeRequest) -> MergeSummary:
    """Merge DeepSpeed inputs on every rank of the default process group; returns the summary."""
    with inputs_leased(request):
        return _run_ds_merge(request)


def _run_ds_merge(request: MergeRequest) -> MergeSummary:
    if len(request.weights) != len(request.inputs):
        raise MergeError(f"{len(request.weights)} weights for {len(request.inputs)} inputs")
    if request.output_dtype != "input":
        raise MergeError("output_dtype: a DeepSpeed output keeps its inputs' dtypes (fp32 master partitions, "
                         "the module in its training dtype); leave output_dtype=input")
    accumulate = DTYPES[request.accumulate]
    tag = request.inputs[-1].path.name
    final = request.output_root / tag
    for info in request.inputs:
        if info.path.resolve() == final.resolve() or request.output_root.resolve().is_relative_to(info.path.resolve()):
            raise MergeError(f"output: {request.output_root} is (inside) the input {info.path}")
    if final.exists() and not request.overwrite:
        raise MergeError(f"output: {final} exists (pass overwrite=true to replace it)")
    try:
        ds_plan = plan([info.path for info in request.inputs])
        check_budget(ds_plan, accumulate, request.budget_bytes)
    except DsPlanError as err:
        raise MergeError(str(err)) from None
    import_deepspeed()  # before the merge's memory is measured
    mine = _share(ds_plan.units, accumulate, dist.get_world_size())[dist.get_rank()]
    with claimed_output(request, final, _output_bytes(ds_plan), "the newest input's files, rewritten") as tmp:
        return _merge_into(request, ds_plan, mine, accumulate, tmp, final)


def _output_files(ds_plan: DsPlan) -> list[str]:
    """The files of the output: the newest input's partition and model-states (or layer) files."""
    newest = ds_plan.checkpoints[-1]
    model = [u.name for u in ds_plan.model_units + ds_plan.layer_units] if ds_plan.model_units else \
        list(newest.model_files.values())  # ZeRO-3's, copied
    return [u.name for u in ds_plan.units] + model


def _output_bytes(ds_plan: DsPlan) -> int:
    """What the output will hold: its files are the newest input's, rewritten with the same tensors."""
    return sum((ds_plan.checkpoints[-1].path / name).stat().st_size for name in _output_files(ds_plan))


def _share(units: list[PartitionUnit], accumulate: torch.dtype, world: int) -> list[list[PartitionUnit]]:
    by_name = {u.name: u for u in units}
    pieces = [Piece(u.name, (), (), unit_bytes(u, accumulate)) for u in units]
    return [[by_name[p.key] for p in share] for share in assign(pieces, world)]


def _merge_into(request: MergeRequest, ds_plan, mine, accumulate, tmp: Path, final: Path) -> MergeSummary:
    rank, world = dist.get_rank(), dist.get_world_size()
    written, error, start, bytes_read, verified = [], None, time.perf_counter(), 0, set()
    with PeakRss() as rss:
        try:
            for unit in mine:
                bytes_read += _merge_unit(request, unit, accumulate, tmp, verified)
                written.append(integrity.digest_file(tmp / unit.name))
        except Exception as err:  # reported collectively: no rank hangs in a barrier
            error = describe(err, tmp, request.output_root)
        fail_together(error, tmp)
        try:
            for k, model_unit in enumerate(ds_plan.model_units + ds_plan.layer_units):
                if k % world == rank:
                    _write_model_states(request, ds_plan, model_unit, tmp)
                    written.append(integrity.digest_file(tmp / model_unit.name))
            if not ds_plan.model_units and rank == 0:  # ZeRO-3: no parameter data in them
                for name in ds_plan.checkpoints[-1].model_files.values():
                    shutil.copy2(ds_plan.checkpoints[-1].path / name, tmp / name)
                    written.append(integrity.digest_file(tmp / name))
        except Exception as err:
            error = describe(err, tmp, request.output_root)
        fail_together(error, tmp)
    report = {"rank": rank, "error": None, "files": written, "bytes_read": bytes_read,
              "bytes_written": sum(e.length for e in written), "seconds": time.perf_counter() - start,
              "pieces": len(mine), "peak_rss": rss.peak, "rss_growth": rss.peak - rss.start}
    pieces = len(ds_plan.units) + len(ds_plan.model_units) + len(ds_plan.layer_units)
    return publish(request, report, final, tmp, pieces, lambda summary, reports: _finish(
        request, ds_plan, tmp, final, [e for r in reports for e in r["files"]], summary))


def _verify_recorded(archive: Archive) -> None:
    """A file of an input pma-merge wrote carries its digest: checked before it is read."""
    recorded = integrity.read_checksums(archive.path.parent)
    entry = next((e for e in recorded.files if e.path == archive.path.name), None) if recorded else None
    if entry is not None:
        problems = integrity.verify_file_entries(archive.path.parent, recorded.algorithm, [entry])
        if problems:
            raise MergeError(problems[0])


def _merge_unit(request: MergeRequest, unit: PartitionUnit, accumulate: torch.dtype, tmp: Path,
                verified: set[Path]) -> int:
    """Each of the file's fp32 partitions: per parameter fragment it holds, the weighted sum of the
    elements every input holds for that parameter range (read in blocks); padding stays zero.
    Then the newest input's file is written with the merged partitions. `verified`: the input files
    whose recorded checksums this rank has checked."""
    merged, read, opened = [], 0, {}
    for g, ref in enumerate(unit.partitions):
        acc = torch.zeros(ref.numel, dtype=accumulate)
        for param, out in unit.segments[g]:
            for view, weight in zip(unit.views, request.weights):
                for frag in view.fragments[(unit.mp, param)]:
                    lo, hi = max(out.start, frag.start), min(out.start + out.numel, frag.start + frag.numel)
                    if lo >= hi:
                        continue
                    if frag.archive.path not in verified:
                        _verify_recorded(frag.archive)
                        verified.add(frag.archive.path)
                    opened[frag.archive.path] = frag.archive
                    read += _add_range(acc, out.offset + lo - out.start, frag, lo - frag.start, hi - lo, weight)
        if not bool(torch.isfinite(acc).all()):
            raise MergeError(f"{unit.name}: the merged fp32 partition of group {g} holds NaN or Inf "
                             "(an input does, or the weighted sum overflows)")
        merged.append(acc.to(ref.dtype))
        del acc
    for archive in opened.values():  # a read leaves its file open: N inputs' files, not all at once
        archive.close()
    objects = load_objects(unit.archive.path)  # the newest input's file, tensors memory-mapped
    state = objects["optimizer_state_dict"]
    key, _ = fp32_partitions(unit.archive)
    state[key] = merged
    if not request.carry_optimizer:
        _reset_moments(state)
    torch.save(objects, tmp / unit.name)
    return read


def _add_range(acc: torch.Tensor, at: int, frag: Fragment, skip: int, numel: int, weight: float) -> int:
    """acc[at:at + numel] += weight * elements [skip, skip + numel) of the fragment, in read blocks."""
    block = max(1, READ_BLOCK_BYTES // frag.ref.dtype.itemsize)
    for done in range(0, numel, block):
        n = min(block, numel - done)
        first = frag.offset + skip + done
        acc[at + done:at + done + n].add_(frag.archive.read(frag.ref, first, first + n), alpha=weight)
    return numel * frag.ref.dtype.itemsize


def _reset_moments(state: dict) -> None:
    """Zero every optimizer state tensor (moments, step): the merged run's optimizer starts afresh."""
    base = state.get("base_optimizer_state") or state.get("optimizer_state_dict")
    for per_param in (base or {}).get("state", {}).values():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                per_param[name] = torch.zeros_like(value, device="cpu")


def _write_model_states(request: MergeRequest, ds_plan, unit: ModelUnit | LayerUnit, tmp: Path) -> None:
    """The newest input's model-states file with each trained parameter = the merged master weight
    (a pipeline run's: its layer files; its mp_rank files hold no module and are copied)."""
    newest = ds_plan.checkpoints[-1].path
    outputs = [Archive(tmp / u.name) for u in sorted(ds_plan.units, key=lambda u: u.dp) if u.mp == unit.mp]
    if isinstance(unit, LayerUnit):
        return write_layer_file(newest, unit, outputs, lambda archive: fp32_partitions(archive)[1], tmp)
    objects = load_objects(newest / unit.name)
    module = objects["module"]
    if module is None:
        shutil.copy2(newest / unit.name, tmp / unit.name)
        return
    for g, shapes in enumerate(objects["param_shapes"]):
        for name, shape in shapes.items():
            pieces = []
            for archive in outputs:
                state = archive.objects["optimizer_state_dict"]
                where = state["param_slice_mappings"][g].get(name) if "param_slice_mappings" in state else None
                if where is not None:
                    start, numel = where.get("start"), where.get("numel")
                    pieces.append(archive.read(fp32_partitions(archive)[1][g], start, start + numel))
            flat = torch.cat(pieces) if pieces else torch.empty(0)
            if flat.numel() != torch.Size(shape).numel():
                raise MergeError(f"{unit.name}: {name} has {flat.numel()} of its {torch.Size(shape).numel()} "
                                 "elements in the partitions' param_slice_mappings")
            module[name] = flat.view(shape).to(module[name].dtype)
    for alias, source in (objects.get("shared_params") or {}).items():
        if alias in module and source in module:
            module[alias] = module[source]
    torch.save(objects, tmp / unit.name)


def _finish(request: MergeRequest, ds_plan, tmp: Path, final: Path, files, summary: MergeSummary) -> None:
    """Rank 0: provenance, checksums, publish, `latest`."""
    provenance = {
        "tool": "pma-merge", "version": package_version(), "format": "deepspeed", "zero_stage": ds_plan.zero_stage,
        "method": request.method, "alpha": request.alpha, "decay_shape": request.decay_shape,
        "inputs": [{"path": str(i.path), "iteration": i.iteration, "consumed_tokens": i.consumed_tokens, "weight": w}
                   for i, w in zip(request.inputs, request.weights)],
        "accumulate_dtype": request.accumulate,
        "optimizer_state": ("carried: fp32 master partitions merged, moments and step from the newest input"
                            if request.carry_optimizer else
                            "reset: fp32 master partitions merged, moments and step zero"),
        "module": ("trained parameters cast from the merged master partitions; buffers and frozen parameters "
                   "from the newest input"),
        "summary": {k: v for k, v in asdict(summary).items() if k != "per_rank"},
    }
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    entries = sorted(files, key=lambda e: e.path) + integrity.file_entries(tmp, [PROVENANCE])
    integrity.write_checksums(tmp, integrity.Checksums(integrity.ALGORITHM, [], entries))
    layout.publish(tmp, final)
    current = read_latest(request.output_root)
    if current is not None and current != final.name and (step_of(Path(current)) or -1) > (step_of(final) or -1):
        return  # the root already holds a newer merge: `latest` keeps naming it
    latest = request.output_root / f"{layout.TMP_PREFIX}{LATEST}.{uuid.uuid4().hex}"
    latest.write_text(final.name)
    os.replace(latest, request.output_root / LATEST)
