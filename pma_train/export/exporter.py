"""Export a pma-train checkpoint to a Hugging Face model directory (safetensors, shard by shard).

    plan = prepare(ExportConfig(checkpoint=..., output=..., model=ModelConfig(...)))   # checks only
    summary = export(plan)                                                             # writes

`prepare` does every check before anything is written: the checkpoint is complete, the model config
matches the run's recorded args and every tensor shape, the model maps onto an HF class
(pma_train/export/hf.py), the output may be written. `export` runs on one process or on every rank of
a process group (torchrun): ranks share the shards by bytes, write them into a hidden temporary
directory next to the output, and rank 0 publishes it with one rename once all succeeded.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pma_train.checkpoint import integrity, layout, readers
from pma_train.checkpoint.integrity import Entry
from pma_train.checkpoint.lock import LOCK_FILE, LockError, Owner, RootLock, acquire
from pma_train.export.config import DTYPES, ExportConfig
from pma_train.export.hf import (HF_CLASSES, ExportError, check_args, choose_target, describe, hf_config,
                                  plan_tensors)
from pma_train.export.shards import (INDEX_FILE, Shard, assign, index_json, parse_size, plan_shards, write_json,
                                     write_shards)
from pma_train.export.source import Source, open_checkpoint


PROVENANCE = "pma_export.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportPlan:
    cfg: ExportConfig
    source: Source
    target: str
    shards: list[Shard]
    config: object  # the transformers config
    tokenizer: object | None  # a transformers tokenizer to save, or None
    output: Path
    converted_from: Path | None = None  # the DeepSpeed checkpoint `source` was converted from (deepspeed.py)

    @property
    def hf_class(self) -> str:
        return HF_CLASSES[self.target]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


@dataclass
class ExportSummary:
    output: Path
    hf_class: str
    shards: int
    tensors: int
    bytes_written: int
    bytes_read: int
    seconds: float
    ranks: int
    largest_shard_bytes: int
    peak_held_bytes: int  # the most tensor bytes any rank held at once (<= its largest shard)
    peak_rss_bytes: int  # busiest rank, whole process
    peak_rss_above_start_bytes: int  # busiest rank, growth while writing


def check_request(cfg: ExportConfig) -> int:
    """What needs no checkpoint read: the options given and valid; returns the largest shard's bytes."""
    if not cfg.checkpoint:
        raise ExportError("checkpoint: give the checkpoint to export (a root or an iter_* directory)")
    if not cfg.output and not cfg.dry_run:
        raise ExportError("output: give the output directory (or dry_run=true)")
    if cfg.dtype not in DTYPES:
        raise ExportError(f"dtype: '{cfg.dtype}' is not one of {', '.join(DTYPES)}")
    return parse_size(cfg.max_shard_size)


def prepare(cfg: ExportConfig) -> ExportPlan:
    """Check everything and plan the output; raises ExportError / CheckpointError, writes nothing."""
    max_bytes = check_request(cfg)
    source = open_checkpoint(cfg.checkpoint)
    output = Path(cfg.output) if cfg.output else Path("-")
    if cfg.output:
        check_output(output, source.path, cfg.overwrite)
    if cfg.model is None:
        raise ExportError("model: give the model preset the checkpoint was trained with, e.g. model=tiny"
                          + _recorded(source))
    vocab, eos, pad, tokenizer = _vocabulary(cfg)
    arch = describe(cfg.model, vocab, cfg.keep_padded_vocab)
    check_args(arch, source.args)
    target = choose_target(arch, cfg.target)
    dtype = _DTYPES.get(cfg.dtype)
    tensors = plan_tensors(arch, target, source.index, dtype)
    config = hf_config(arch, target, tensors[0].dtype, eos, pad)
    return ExportPlan(cfg, source, target, plan_shards(tensors, max_bytes), config, tokenizer, output)


def _recorded(source: Source) -> str:
    a = source.args
    if a is None or not hasattr(a, "hidden_size"):
        return ""
    what = f"pattern '{getattr(a, 'hybrid_layer_pattern', '?')}', hidden {a.hidden_size}"
    if getattr(a, "num_experts", None):
        what += f", {a.num_experts} experts"
    return f" (the checkpoint records {what})"


def _vocabulary(cfg: ExportConfig):
    """(real vocab size, eos id, pad id, HF tokenizer to save or None)."""
    if cfg.vocab_size is not None:
        if cfg.vocab_size < 1:
            raise ExportError(f"vocab_size: must be >= 1, got {cfg.vocab_size}")
        return cfg.vocab_size, None, None, None
    from pma_train.data.tokenizer import build_tokenizer

    try:
        tok = build_tokenizer(cfg.tokenizer)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise ExportError(f"tokenizer: {err}") from None
    pad = tok.pad if tok.pad != tok.eod else None
    hf_tok = None
    if cfg.tokenizer.type == "huggingface":
        from transformers import PreTrainedTokenizerFast

        hf_tok = PreTrainedTokenizerFast(tokenizer_file=cfg.tokenizer.path)
        hf_tok.eos_token = hf_tok.convert_ids_to_tokens(tok.eod)
        if pad is not None:
            hf_tok.pad_token = hf_tok.convert_ids_to_tokens(pad)
    return tok.vocab_size, tok.eod, pad, hf_tok


def check_output(output: Path, checkpoint: Path, overwrite: bool) -> None:
    out, ckpt = output.resolve(), checkpoint.resolve()
    if out == ckpt or out in ckpt.parents or ckpt in out.parents:
        raise ExportError(f"output: {output} overlaps the checkpoint {checkpoint}")
    if not output.exists():
        return
    if not overwrite:
        raise ExportError(f"output: {output} exists (overwrite=true replaces a previous export)")
    if not output.is_dir() or (any(output.iterdir()) and not (output / "config.json").is_file()):
        raise ExportError(f"output: {output} exists and is not a previous export (no config.json): not replacing it")


# ----------------------------------------------------------------------------- writing


def export(plan: ExportPlan) -> ExportSummary:
    """Write the plan on every rank of the default process group (or alone) and publish it."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    setup = [None, None]  # (temporary directory, error) from rank 0
    lock = None
    with readers.reading([plan.source.path]):  # its run's retention leaves it alone meanwhile
        if rank == 0:
            try:
                lock, setup[0] = claim_output(plan)
            except (LockError, ExportError) as err:
                setup[1] = str(err)
            except OSError as err:
                setup[1] = f"cannot create a directory next to {plan.output}: {err}"
        if distributed:
            dist.broadcast_object_list(setup, src=0)
        tmp, error = setup
        if error:
            raise ExportError(error)
        try:
            return _export_into(plan, tmp)
        finally:
            if lock is not None:
                lock.release()


def claim_output(plan: ExportPlan) -> tuple[RootLock, Path]:
    """Rank 0 locks the output (a second export to it stops here, naming the first), then, as its only
    writer, removes what killed exports left and makes this one's temporary directory."""
    output = plan.output
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = acquire(output.parent, Owner.this_process(), plan.cfg.force_unlock, "force_unlock=true",
                   name=f"{LOCK_FILE}.{output.name}")
    try:
        check_output(output, plan.source.path, plan.cfg.overwrite)  # published by another export since prepare?
        _remove_leftovers(output)
        tmp = output.parent / f"{layout.TMP_PREFIX}{output.name}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except BaseException:
        lock.release()
        raise
    return lock, tmp


def _export_into(plan: ExportPlan, tmp: Path) -> ExportSummary:
    import torch.distributed as dist

    from pma_train.rss import PeakRss

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    output = plan.output
    start, error, report = time.perf_counter(), None, None
    try:
        with PeakRss() as rss:
            report = write_shards(assign(plan.shards, world)[rank], plan.source.index, tmp)
    except Exception as err:  # reported collectively below, so no rank waits forever
        error = f"rank {rank}: {type(err).__name__}: {err}"
    reports = [(error, report and asdict(report), rss.peak, rss.peak - rss.start)]
    if distributed:
        reports = [None] * world
        dist.all_gather_object(reports, (error, report and asdict(report), rss.peak, rss.peak - rss.start))
    errors = [r[0] for r in reports if r[0]]
    if not errors and rank == 0:
        try:
            _write_metadata(plan, tmp, time.perf_counter() - start)
            _write_checksums(tmp, [Entry(**f) for r in reports for f in r[1]["files"]])
            layout.publish(tmp, output)
        except Exception as err:
            errors.append(f"rank 0: {type(err).__name__}: {err}")
    if distributed:
        holder = [errors]
        dist.broadcast_object_list(holder, src=0)
        errors = holder[0]
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError("export failed, nothing published: " + "; ".join(errors))
    done = [r[1] for r in reports]
    return ExportSummary(
        output=output, hf_class=plan.hf_class, shards=len(plan.shards),
        tensors=sum(len(s.tensors) for s in plan.shards), bytes_written=sum(r["bytes_written"] for r in done),
        bytes_read=sum(r["bytes_read"] for r in done), seconds=time.perf_counter() - start, ranks=world,
        largest_shard_bytes=max(s.nbytes for s in plan.shards),
        peak_held_bytes=max(r["peak_held_bytes"] for r in done), peak_rss_bytes=max(r[2] for r in reports),
        peak_rss_above_start_bytes=max(r[3] for r in reports))


def _write_metadata(plan: ExportPlan, tmp: Path, seconds: float) -> None:
    if len(plan.shards) > 1:
        write_json(tmp / INDEX_FILE, index_json(plan.shards))
    plan.config.save_pretrained(str(tmp))
    _save_generation_config(plan.config, tmp)
    if plan.tokenizer is not None:
        plan.tokenizer.save_pretrained(str(tmp))
    src = plan.source
    write_json(tmp / PROVENANCE, {
        "checkpoint": str((plan.converted_from or src.path).resolve()), "iteration": src.iteration, "consumed_tokens": src.consumed_tokens,
        "model": plan.cfg.model.name, "hf_class": plan.hf_class, "dtype": str(plan.config.dtype).removeprefix("torch."),
        "vocab_size": plan.config.vocab_size, "padded_vocab_kept": plan.cfg.keep_padded_vocab,
        "shards": [s.file for s in plan.shards], "seconds": round(seconds, 3),
        "merge": _merge_record(src.path),
    })


def _write_checksums(tmp: Path, shards: list[Entry]) -> None:
    """Whole-file checksums of the export (`pma-check` verifies them): the shards, hashed by the ranks that
    wrote them, and every file rank 0 wrote."""
    done = {e.path for e in shards}
    others = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name not in done and p.name != integrity.SIDECAR)
    files = sorted(shards + integrity.file_entries(tmp, others), key=lambda e: e.path)
    integrity.write_checksums(tmp, integrity.Checksums(integrity.ALGORITHM, [], files))


def _save_generation_config(config, tmp: Path) -> None:
    from transformers import GenerationConfig

    gen = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                           pad_token_id=config.pad_token_id)
    gen.save_pretrained(str(tmp))


def _merge_record(ckpt: Path) -> dict | None:
    """A pma-merge output records its inputs and weights: carry that along."""
    record = ckpt / layout.MERGE_PROVENANCE
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text())
    except ValueError:
        return None


def _remove_leftovers(output: Path) -> None:
    """Hidden temporaries of earlier exports to this output that were killed."""
    prefix = f"{layout.TMP_PREFIX}{output.name}."
    for path in output.parent.iterdir():
        if path.name.startswith(prefix) and path.is_dir() and len(path.name) == len(prefix) + 8:
            shutil.rmtree(path, ignore_errors=True)
