"""`pma-merge output_format=torch_dist` on DeepSpeed inputs: the merge written as a pma-train (Megatron-LM
torch_dist) checkpoint, which `checkpoint.init_from`, pma-export and pma-merge read under any layout.

Each parameter (ds/params.py: its key and where its fp32 master values lie) is cut into row blocks
that fit `memory_budget_mb`; the blocks are shared among the merge ranks by bytes. A rank streams a
block's elements from the N inputs' partition files, accumulates them weighted in fp32 / fp64, and
writes the block as one chunk of the global tensor (row offsets, as pma-merge's own outputs). Rank 0
writes the common state (iteration, a partial `args`: what the parameter shapes say), the metadata,
the side-car, provenance and checksums, and publishes `<output>/iter_XXXXXXX` with the tracker. No
process holds more than one block; nothing is written before every name and partition is checked.
The weights are the fp32 master weights (output_dtype=input); the optimizer state is not converted.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import time
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata

from pma_train.checkpoint import integrity, layout
from pma_train.merge.dcp_io import ChunkWriter, assemble_metadata
from pma_train.merge.ds.archive import Archive
from pma_train.merge.ds.params import DsParam, locate
from pma_train.merge.ds.plan import READ_BLOCK_BYTES, DsPlan, DsPlanError, plan
from pma_train.merge.engine import DTYPES, PROVENANCE, package_version
from pma_train.merge.plan import Piece, assign
from pma_train.merge.publish import MergeError, MergeRequest, MergeSummary, claimed_output, describe, inputs_leased, publish
from pma_train.rss import PeakRss

COMMON_STATE_KEY = "common_state/shard_0_1"  # megatron-core's ShardedObject("common_state", ...) entry
_METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}


def run_ds_to_torch_dist(request: MergeRequest) -> MergeSummary:
    """Merge DeepSpeed inputs into a torch_dist checkpoint on every rank of the default process group."""
    with inputs_leased(request):
        return _run(request)


def _run(request: MergeRequest) -> MergeSummary:
    if len(request.weights) != len(request.inputs):
        raise MergeError(f"{len(request.weights)} weights for {len(request.inputs)} inputs")
    if request.carry_optimizer:
        raise MergeError("carry_optimizer: output_format=torch_dist writes the merged weights only (DeepSpeed's "
                         "optimizer partitions are not converted); leave carry_optimizer=false")
    iteration = request.inputs[-1].iteration
    final = request.output_root / layout.iter_dir_name(iteration)
    for info in request.inputs:
        if request.output_root.resolve().is_relative_to(info.path.resolve()):
            raise MergeError(f"output: {request.output_root} is inside the input {info.path}")
        if request.output_root.resolve() == info.path.resolve().parent:
            raise MergeError(f"output: {request.output_root} is the DeepSpeed root of the input {info.path}; "
                             "a pma-train checkpoint root of its own is needed")
    if final.exists() and not request.overwrite:
        raise MergeError(f"output: {final} exists (pass overwrite=true to replace it)")
    try:
        ds_plan = plan([info.path for info in request.inputs])
        params = locate(ds_plan)
    except DsPlanError as err:
        raise MergeError(str(err)) from None
    accumulate = DTYPES[request.accumulate]
    out_dtype = torch.float32 if request.output_dtype == "input" else DTYPES[request.output_dtype]
    pieces = conversion_pieces(params, accumulate, out_dtype, request.budget_bytes)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = assign(pieces, world)[rank]
    output_bytes = sum(math.prod(p.sizes) for p in pieces) * _itemsize(out_dtype)
    with claimed_output(request, final, output_bytes, "the converted tensors' bytes") as tmp:
        return _convert(request, ds_plan, {(p.key, p.prefix): p for p in params}, mine, len(pieces), accumulate,
                        out_dtype, tmp, final)


def conversion_pieces(params: list[DsParam], accumulate: torch.dtype, out_dtype: torch.dtype, budget: int) -> list[Piece]:
    """Row blocks of every parameter: its accumulator, output cast and a read block (with the buffer it
    is read into) within the budget."""
    per_element = _itemsize(accumulate) + _itemsize(out_dtype)
    room = budget - 2 * READ_BLOCK_BYTES
    pieces = []
    for param in params:
        row = math.prod(param.shape[1:])
        if row * per_element > room:
            raise MergeError(f"memory_budget_mb={budget // 2**20}: one row of {param.name} {param.shape} needs "
                             f"{-(-(row * per_element + 2 * READ_BLOCK_BYTES) // 2**20)} MiB; raise memory_budget_mb")
        rows = param.shape[0] if param.shape else 1
        step = max(1, room // max(row * per_element, 1))
        ones = (1,) * len(param.prefix)
        for first in range(0, rows, step):
            count = min(step, rows - first)
            sizes = (*ones, count, *param.shape[1:]) if param.shape else ()
            offsets = (*param.prefix, first, *[0] * (len(param.shape) - 1)) if param.shape else ()
            pieces.append(Piece(param.key, offsets, sizes, count * row * 4))
    return pieces


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_elements(ds_plan: DsPlan, param: DsParam, input_index: int, start: int, stop: int, out: torch.Tensor,
                  weight: float = 1.0) -> int:
    """out (flat, elements [start, stop) of the parameter) += weight x those fp32 values of one input,
    read through that input's own per-parameter view (plan.py: any DP size, ZeRO stage or universal
    checkpoint); returns the bytes read."""
    done = 0
    view = ds_plan.units[0].views[input_index]
    for frag in view.fragments[(0, param.name)]:
        lo, hi = max(start, frag.start), min(stop, frag.start + frag.numel)
        for b_lo in range(lo, hi, READ_BLOCK_BYTES // 4):
            b_hi = min(hi, b_lo + READ_BLOCK_BYTES // 4)
            first = frag.offset + b_lo - frag.start
            block = frag.archive.read(frag.ref, first, first + b_hi - b_lo)
            out[b_lo - start:b_hi - start].add_(block, alpha=weight)
            done += block.numel() * block.element_size()
    return done


def _merge_piece(request: MergeRequest, ds_plan: DsPlan, param: DsParam, piece: Piece, accumulate) -> tuple[torch.Tensor, int]:
    row = math.prod(param.shape[1:])
    start = piece.offsets[len(param.prefix)] * row if piece.sizes else 0
    count = math.prod(piece.sizes)
    # Allocated in the piece's shape (not a view of a flat one): the writer then saves it without a copy.
    acc, read = torch.zeros(piece.sizes, dtype=accumulate), 0
    for i, weight in enumerate(request.weights):
        read += read_elements(ds_plan, param, i, start, start + count, acc.view(-1), weight)
    if not torch.isfinite(acc).all():
        raise MergeError(f"{param.name}: the weighted sum holds NaN or Inf (rows from {piece.offsets[:1]})")
    return acc, read


def _of(by_key: dict, piece: Piece) -> DsParam:
    """The parameter a piece belongs to: the key's, or the expert's at the piece's leading offset."""
    return by_key.get((piece.key, ())) or by_key[(piece.key, piece.offsets[:1])]


def _convert(request, ds_plan, by_key: dict[tuple, DsParam], mine: list[Piece], n_pieces: int, accumulate, out_dtype,
             tmp: Path, final: Path) -> MergeSummary:
    rank = dist.get_rank()
    writer, error, read, start = None, None, 0, time.perf_counter()
    with PeakRss() as rss:
        try:
            writer = ChunkWriter(tmp, f"__{rank}_0.distcp")
            for piece in mine:
                merged, n = _merge_piece(request, ds_plan, _of(by_key, piece), piece, accumulate)
                read += n
                writer.write_tensor(piece.key, piece.offsets, merged.to(out_dtype))
            writer.close()
        except Exception as err:  # reported collectively: no rank hangs
            error = describe(err, tmp, request.output_root)
        finally:
            for view in ds_plan.units[0].views if ds_plan.units else []:  # a read left its file open
                for archive in {id(f.archive): f.archive for frags in view.fragments.values() for f in frags}.values():
                    archive.close()
    report = {"error": error, "tensors": writer.tensors if writer else [], "bytes_read": read,
              "bytes_written": writer.bytes_written if writer else 0, "seconds": time.perf_counter() - start,
              "peak_rss": rss.peak, "rss_growth": rss.peak - rss.start, "pieces": len(mine), "rank": rank}
    return publish(request, report, final, tmp, n_pieces, lambda summary, reports: _finish(
        request, ds_plan, by_key, out_dtype, tmp, [t for r in reports for t in r["tensors"]], summary))


def _run_state(request: MergeRequest, ds_plan: DsPlan, by_key: dict[str, DsParam]) -> tuple[dict, dict]:
    """(the common state, the pma_train.json side-car) of the output: the newest input's counters, and
    the architecture its parameter shapes say (what a Megatron-LM loader or pma-export checks)."""
    newest = request.inputs[-1]
    ckpt = ds_plan.checkpoints[-1]
    states = Archive(ckpt.path / ckpt.model_file(0)).objects
    samples = int(states.get("global_samples") or 0)
    keys = {key: param.global_shape for (key, _), param in by_key.items()}
    embedding = keys.get("embedding.word_embeddings.weight")
    layers = {int(k.split(".")[2]) for k in keys if k.startswith("decoder.layers.")}
    args = Namespace(iteration=newest.iteration, consumed_train_samples=samples, consumed_valid_samples=0,
                     tensor_model_parallel_size=1, pipeline_model_parallel_size=1, ckpt_format="torch_dist",
                     num_layers=len(layers), untie_embeddings_and_output_weights="output_layer.weight" in keys)
    if embedding is not None:
        args.padded_vocab_size, args.hidden_size = embedding
    tokens = newest.consumed_tokens
    if tokens is not None and samples:
        args.seq_length = tokens // samples
    common = {"iteration": newest.iteration, "checkpoint_version": 3.0, "args": args}
    sidecar = {"iteration": newest.iteration, "consumed_samples": samples, "consumed_tokens": tokens or 0, "extra": {}}
    return common, sidecar


def _finish(request, ds_plan, by_key, out_dtype, tmp: Path, tensors, summary: MergeSummary) -> None:
    """Rank 0: common state, metadata, side-cars, provenance, checksums; then the publish."""
    common, sidecar = _run_state(request, ds_plan, by_key)
    buffer = io.BytesIO()
    torch.save([common], buffer)  # a ShardedObject's data, as megatron-core stores it
    writer = ChunkWriter(tmp, "__0_1.distcp")
    writer.write_bytes(COMMON_STATE_KEY, buffer.getvalue())
    writer.close()
    shapes = {key: (param.global_shape, out_dtype) for (key, _), param in by_key.items()}
    metadata = assemble_metadata(Metadata(state_dict_metadata={}, version="1.0.0"), shapes, tensors,
                                 writer.byte_entries)
    with open(tmp / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    (tmp / "metadata.json").write_text(json.dumps(_METADATA_JSON))
    (tmp / layout.TRAIN_STATE_SIDECAR).write_text(json.dumps(sidecar, indent=2))
    provenance = {
        "tool": "pma-merge", "version": package_version(), "method": request.method, "alpha": request.alpha,
        "decay_shape": request.decay_shape, "format": "torch_dist", "from_format": "deepspeed",
        "zero_stage": ds_plan.zero_stage,
        "inputs": [{"path": str(i.path), "iteration": i.iteration, "consumed_tokens": i.consumed_tokens, "weight": w}
                   for i, w in zip(request.inputs, request.weights)],
        "accumulate_dtype": request.accumulate, "output_dtype": str(out_dtype).removeprefix("torch."),
        "optimizer_state": "dropped (DeepSpeed's optimizer partitions are not converted)",
        "parameter_names": "pma-train's module names; norms under their fused keys, experts stacked (ds/params.py)",
        "summary": {k: v for k, v in asdict(summary).items() if k != "per_rank"},
    }
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    chunks = sorted((w.checksum() for w in [*tensors, *writer.byte_entries]), key=lambda e: (e.path, e.offset))
    integrity.write_checksums(tmp, integrity.Checksums(integrity.ALGORITHM, chunks,
                                                       integrity.file_entries(tmp, integrity.METADATA_FILES)))
    layout.verify_complete(tmp)
    final = request.output_root / layout.iter_dir_name(request.inputs[-1].iteration)
    layout.publish(tmp, final)
    latest = layout.read_tracker(request.output_root)
    if latest is None or latest <= request.inputs[-1].iteration:
        layout.write_tracker(request.output_root, request.inputs[-1].iteration)
