"""The sharded merge engine: every rank streams its share of tensor pieces from the N inputs.

No rank holds a model: pieces are planned from the inputs' metadata, sized to a memory budget,
split among ranks by bytes; each rank reads only its pieces' rows (from any input layout),
accumulates in fp32 / fp64, and writes its own data file. Rank 0 then writes the global
metadata and publishes the result atomically in Megatron-LM's layout. Imports nothing of the
trainer or the model: any torch_dist checkpoint (ours or Megatron-LM's) merges.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from pma_train.checkpoint import integrity, layout, sidecar
from pma_train.checkpoint.layout import is_optimizer_key
from pma_train.merge.dcp_io import (
    CheckpointIndex,
    ChunkReader,
    ChunkWriter,
    TensorEntry,
    assemble_metadata,
    itemsize,
)
from pma_train.merge.plan import Piece, PlanError, assign, check_compatible, plan_pieces
from pma_train.merge.publish import (
    MergeError,
    MergeRequest,
    MergeSummary,
    claimed_output,
    describe,
    inputs_leased,
    publish,
)
from pma_train.merge.sources import Source, plan_sources
from pma_train.rss import PeakRss

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVENANCE = layout.MERGE_PROVENANCE


def _intersect(a_off, a_size, b_off, b_size):
    lo = [max(x, y) for x, y in zip(a_off, b_off)]
    hi = [min(x + s, y + t) for x, s, y, t in zip(a_off, a_size, b_off, b_size)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return lo, [h - l for l, h in zip(lo, hi)]


def _blocks(reader: ChunkReader, entry: TensorEntry, piece: Piece, source: str):
    """(index into the piece, block of one input) for every stored chunk overlapping the piece,
    reading only the overlapping rows; the blocks must cover the piece."""
    if not piece.sizes:  # 0-d tensor
        yield (), reader.read_rows(entry.chunks[0], 0, 1).reshape(())
        return
    covered = 0
    for chunk in entry.chunks:
        box = _intersect(piece.offsets, piece.sizes, chunk.offsets, chunk.sizes)
        if box is None:
            continue
        lo, size = box
        first = lo[0] - chunk.offsets[0]
        rows = reader.read_rows(chunk, first, first + size[0])
        block = rows[(slice(None),) + tuple(slice(lo[d] - chunk.offsets[d], lo[d] - chunk.offsets[d] + size[d])
                                            for d in range(1, len(size)))]
        yield tuple(slice(lo[d] - piece.offsets[d], lo[d] - piece.offsets[d] + size[d]) for d in range(len(size))), block
        covered += math.prod(size)
    if covered != math.prod(piece.sizes):
        raise MergeError(f"{entry.key} in {source}: stored chunks cover {covered} of the "
                         f"{math.prod(piece.sizes)} elements at offsets {piece.offsets}")


def _accumulate(reader: ChunkReader, entry: TensorEntry, piece: Piece, acc: torch.Tensor, weight: float,
                source: str, check: bool = False) -> None:
    """acc += weight * (the piece's box of one input)."""
    for index, block in _blocks(reader, entry, piece, source):
        if check:
            _check_finite(block, entry.key, source)
        acc[index].add_(block, alpha=weight)  # promotes bf16 / fp16 blocks on the fly, no temporary


def _all_finite(tensor: torch.Tensor) -> bool:
    # Any NaN / Inf makes the sum non-finite; only an overflowing sum needs the full check.
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _check_finite(block: torch.Tensor, key: str, source: str) -> None:
    if block.is_floating_point() and not _all_finite(block):
        raise MergeError(f"tensor {key} in {source} holds NaN or Inf")


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge (rank 0)",
                            dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _prepare(request: MergeRequest) -> tuple[list[CheckpointIndex], list[str], dict, dict[str, Source]]:
    """Every check that can fail before anything is written."""
    if len(request.weights) != len(request.inputs):
        raise MergeError(f"{len(request.weights)} weights for {len(request.inputs)} inputs")
    for info in request.inputs:
        layout.verify_complete(info.path)
    final = request.output_root / layout.iter_dir_name(request.inputs[-1].iteration)
    for info in request.inputs:
        if info.path.resolve() == final.resolve():
            raise MergeError(f"output: {final} is one of the inputs")
        if request.output_root.resolve().is_relative_to(info.path.resolve()):
            raise MergeError(f"output: {request.output_root} is inside the input checkpoint {info.path}")
    if final.exists() and not request.overwrite:
        raise MergeError(f"output: {final} exists (pass overwrite=true to replace it)")
    indexes = [CheckpointIndex(info.path) for info in request.inputs]
    names = [str(info.path) for info in request.inputs]
    keys = indexes[-1].model_keys()
    if not keys:
        raise MergeError(f"{names[-1]} holds no model tensors")
    try:
        check_compatible(indexes, keys, names)
    except PlanError as err:
        raise MergeError(str(err)) from None
    if request.carry_optimizer:
        if not indexes[-1].optimizer_keys():
            raise MergeError(f"carry_optimizer: {names[-1]} holds no optimizer state")
        if any(".gbuf_idx_" in key for key in indexes[-1].optimizer_keys()):
            # Bucket-keyed: its fp32 main parameters cannot be matched to the merged weights.
            raise MergeError(f"carry_optimizer: {names[-1]} holds dp_reshardable optimizer state; carrying it "
                             "needs checkpoints saved with checkpoint.optimizer_format=fully_reshardable")
        keys = keys + indexes[-1].optimizer_keys()
    out_dtype = {}
    for key in keys:
        dtype = indexes[-1].tensors[key].dtype
        fixed = request.output_dtype != "input" and dtype.is_floating_point and not is_optimizer_key(key)
        out_dtype[key] = DTYPES[request.output_dtype] if fixed else dtype
    try:
        sources = plan_sources(indexes, keys, request.carry_optimizer)
    except PlanError as err:
        raise MergeError(str(err)) from None
    return indexes, keys, out_dtype, sources


def run_merge(request: MergeRequest) -> MergeSummary:
    """Merge on every rank of the default process group (gloo is enough); returns the summary."""
    with inputs_leased(request):
        return _run_merge(request)


def _run_merge(request: MergeRequest) -> MergeSummary:
    rank, world = dist.get_rank(), dist.get_world_size()
    indexes, keys, out_dtype, sources = _prepare(request)
    accumulate = DTYPES[request.accumulate]
    pieces = plan_pieces(indexes, keys, request.budget_bytes, accumulate, out_dtype,
                         {k: s.keys for k, s in sources.items()})
    mine = assign(pieces, world)[rank]
    final = request.output_root / layout.iter_dir_name(request.inputs[-1].iteration)
    output_bytes = sum(math.prod(p.sizes) * out_dtype[p.key].itemsize for p in pieces)
    with claimed_output(request, final, output_bytes, "the merged tensors' bytes") as tmp:
        return _merge_into(request, indexes, keys, out_dtype, sources, accumulate, pieces, mine, final, tmp)


def _merge_into(request: MergeRequest, indexes, keys, out_dtype, sources, accumulate, pieces, mine, final: Path,
                tmp: Path) -> MergeSummary:
    rank = dist.get_rank()
    reader, writer = ChunkReader(), ChunkWriter(tmp, f"__{rank}_0.distcp")
    progress = _Progress(sum(p.nbytes for p in mine) * len(indexes), request.progress and rank == 0)
    error = None
    start = time.perf_counter()
    try:
        with PeakRss() as rss:
            for piece in mine:
                writer.write_tensor(piece.key, piece.offsets, _merge_piece(reader, indexes, request, piece, accumulate,
                                                                           out_dtype[piece.key], progress,
                                                                           sources[piece.key]))
            writer.close()
    except Exception as err:  # reported collectively by publish(), so no rank hangs in a barrier
        error = describe(err, tmp, request.output_root)
        rss = None
    finally:
        progress.close()
        reader.close()
    report = {"rank": rank, "error": error, "tensors": writer.tensors, "bytes_read": reader.bytes_read,
              "bytes_written": writer.bytes_written, "seconds": time.perf_counter() - start, "pieces": len(mine),
              "peak_rss": rss.peak if rss else 0, "rss_growth": (rss.peak - rss.start) if rss else 0}
    return publish(request, report, final, tmp, len(pieces), lambda summary, reports: _finish(
        request, indexes, keys, out_dtype, tmp, [t for r in reports for t in r["tensors"]], summary))


_STRIP_BYTES = 4 * 2**20


def _strips(piece: Piece, entries: list[TensorEntry]):
    """(row slice of the piece, the sub-piece it covers), a few MiB of the widest input each."""
    if not piece.sizes:
        yield slice(None), piece
        return
    widest = max(math.prod(c.sizes[1:]) * itemsize(e.dtype) for e in entries for c in e.chunks)
    rows = max(1, _STRIP_BYTES // max(widest, 1))
    for start in range(0, piece.sizes[0], rows):
        count = min(rows, piece.sizes[0] - start)
        sub = Piece(piece.key, (piece.offsets[0] + start, *piece.offsets[1:]), (count, *piece.sizes[1:]),
                    piece.nbytes * count // piece.sizes[0])
        yield slice(start, start + count), sub


def _merge_piece(reader, indexes, request, piece: Piece, accumulate, out_dtype, progress,
                 source: Source) -> torch.Tensor:
    entries = [index.tensors[read] for index, read in zip(indexes, source.keys)]
    newest = entries[-1]
    # Optimizer moments (carried) and integer buffers are copied from the newest input, never averaged.
    if not source.merge or not newest.dtype.is_floating_point:
        acc = torch.zeros(piece.sizes, dtype=torch.float64 if newest.dtype.is_floating_point else newest.dtype)
        if newest.dtype.is_floating_point:
            _accumulate(reader, newest, piece, acc, 1.0, str(request.inputs[-1].path), check=True)
        else:
            _copy_exact(reader, newest, piece, acc, str(request.inputs[-1].path))
        progress.update(piece.nbytes)
        return acc.to(out_dtype)
    acc = torch.zeros(piece.sizes, dtype=accumulate)
    # Strips of a few MiB through all inputs in turn: the accumulator strip stays in cache.
    for strip, sub in _strips(piece, entries):
        target = acc[strip] if piece.sizes else acc
        for entry, info, weight in zip(entries, request.inputs, request.weights):
            _accumulate(reader, entry, sub, target, weight, str(info.path))
    progress.update(piece.nbytes * len(entries))
    # NaN / Inf in any input reaches the sum: one check of the result, and only when it fails
    # a second look at the inputs to name the culprit.
    if not _all_finite(acc):
        for entry, info in zip(entries, request.inputs):
            _accumulate(reader, entry, piece, torch.zeros_like(acc), 1.0, str(info.path), check=True)
        raise MergeError(f"tensor {piece.key}: the weighted sum overflows to Inf at offsets {piece.offsets}")
    return acc.to(out_dtype)


def _copy_exact(reader: ChunkReader, entry: TensorEntry, piece: Piece, out: torch.Tensor, source: str) -> None:
    for index, block in _blocks(reader, entry, piece, source):
        out[index].copy_(block)


def _finish(request: MergeRequest, indexes, keys, out_dtype, tmp: Path, tensors, summary: MergeSummary) -> None:
    """Rank 0: non-tensor entries from the newest input, global metadata, provenance, publish."""
    newest, newest_index = request.inputs[-1], indexes[-1]
    # Byte entries are not averaged: TE's `_extra_state` (with FP8: amax histories and scales) is a
    # running statistic of recent activations, closest to the merged weights in the newest input
    # (docs/performance.md); an average of histories would be nobody's.
    reader, writer = ChunkReader(), ChunkWriter(tmp, "__0_1.distcp")
    for stored in newest_index.bytes:
        if is_optimizer_key(stored.index.fqn) and not request.carry_optimizer:
            continue
        writer.write_bytes(stored.index.fqn, reader.read_raw(stored.file, stored.offset, stored.length, stored.expected))
    writer.close()
    reader.close()
    shapes = {k: (newest_index.tensors[k].shape, out_dtype[k]) for k in keys}
    metadata = assemble_metadata(newest_index.metadata, shapes, tensors, writer.byte_entries)
    with open(tmp / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    for name in ("metadata.json", "common.pt", sidecar.FILE):
        if (newest.path / name).is_file():
            shutil.copy2(newest.path / name, tmp / name)
    provenance = {
        "tool": "pma-merge", "version": package_version(), "method": request.method, "alpha": request.alpha,
        "decay_shape": request.decay_shape,
        "inputs": [{"path": str(i.path), "iteration": i.iteration, "consumed_tokens": i.consumed_tokens, "weight": w}
                   for i, w in zip(request.inputs, request.weights)],
        "accumulate_dtype": request.accumulate, "output_dtype": request.output_dtype,
        "optimizer_state": ("carried: main parameters merged (model weights cast from them), moments and step "
                            "from the newest input") if request.carry_optimizer else "dropped",
        "summary": {k: v for k, v in asdict(summary).items() if k != "per_rank"},
    }
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    _write_checksums(tmp, tensors, writer.byte_entries)
    layout.verify_complete(tmp)
    final = request.output_root / layout.iter_dir_name(newest.iteration)
    layout.publish(tmp, final)
    latest = layout.read_tracker(request.output_root)
    if latest is None or latest <= newest.iteration:
        layout.write_tracker(request.output_root, newest.iteration)


def _write_checksums(tmp: Path, tensors, byte_entries) -> None:
    # Every rank hashed its pieces while writing them: no re-read.
    chunks = sorted((w.checksum() for w in [*tensors, *byte_entries]), key=lambda e: (e.path, e.offset))
    files = integrity.file_entries(tmp, integrity.METADATA_FILES)
    integrity.write_checksums(tmp, integrity.Checksums(integrity.ALGORITHM, chunks, files))


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("pma-train")
    except Exception:
        return "unknown"
