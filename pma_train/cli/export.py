"""`pma-export`: a pma-train checkpoint to a Hugging Face model directory (hydra; torchrun or alone)."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from pma_train.conf import CONF_DIR, register_configs
from pma_train.config import to_config
from pma_train.export.config import ExportConfig


def _fail(message: str, code: int = 2) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pma-export: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def register_export_configs() -> None:
    """pma-train's model presets plus the export schema (export.yaml composes them)."""
    register_configs()
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def print_plan(plan) -> None:
    src = plan.source
    tokens = "?" if src.consumed_tokens is None else f"{src.consumed_tokens:,}"
    name = src.path if plan.converted_from is None else f"{plan.converted_from} (converted)"
    print(f"checkpoint {name} (iteration {src.iteration}, {tokens} tokens) -> {plan.hf_class} "
          f"({plan.config.num_hidden_layers} layers, vocab {plan.config.vocab_size}, "
          f"{str(plan.config.dtype).removeprefix('torch.')})")
    for shard in plan.shards:
        print(f"  {shard.file}: {len(shard.tensors)} tensors, {shard.nbytes / 2**20:.1f} MiB")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def _run(node: DictConfig) -> None:
    cfg: ExportConfig = to_config(ExportConfig, node)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = int(os.environ.get("RANK", "0")) == 0

    from pma_train.export import CheckpointError, ExportError, export, prepare
    from pma_train.merge.ds.accept import is_deepspeed_checkpoint

    if cfg.checkpoint and is_deepspeed_checkpoint(cfg.checkpoint):
        _run_deepspeed(cfg, rank0)
        return
    try:
        plan = prepare(cfg)  # every rank checks the same things: all fail or none
    except (ExportError, CheckpointError) as err:
        _fail(str(err))
    if cfg.dry_run:
        if rank0:
            print_plan(plan)
        return
    distributed = world > 1
    if distributed:
        from pma_train.parallel import init_process_group

        init_process_group("gloo")
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)  # copying bytes: extra threads only contend
    try:
        summary = export(plan)
    except (ExportError, CheckpointError) as err:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
        _fail(str(err), code=1)
    if rank0:
        _print_summary(plan, summary)
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


def _print_summary(plan, summary) -> None:
    print_plan(plan)
    print(f"exported {summary.tensors} tensors in {summary.shards} shard(s) to {summary.output} "
          f"({summary.bytes_written / 2**20:.1f} MiB in {summary.seconds:.2f} s on {summary.ranks} rank(s)); "
          f"largest shard {summary.largest_shard_bytes / 2**20:.1f} MiB, most tensor bytes held at once "
          f"{summary.peak_held_bytes / 2**20:.1f} MiB, peak RSS of the busiest rank "
          f"{summary.peak_rss_bytes / 2**20:.0f} MiB (+{summary.peak_rss_above_start_bytes / 2**20:.0f} MiB "
          f"while writing)")


def _run_deepspeed(cfg, rank0: bool) -> None:
    """A DeepSpeed checkpoint: checked, then converted on the fly by every rank (a process group even alone)."""
    from pma_train.export import CheckpointError, ExportError
    from pma_train.export.deepspeed import check_before_conversion, export_deepspeed
    from pma_train.parallel import init_process_group

    try:
        note = check_before_conversion(cfg)
    except (ExportError, CheckpointError) as err:
        _fail(str(err))
    if cfg.dry_run:
        if rank0:
            print(note)
        return
    init_process_group("gloo")
    import torch
    import torch.distributed as dist

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # copying bytes: extra threads only contend
    try:
        plan, summary = export_deepspeed(cfg, log=_printer(rank0))
    except (ExportError, CheckpointError) as err:
        dist.destroy_process_group()
        _fail(str(err), code=1)
    if rank0:
        _print_summary(plan, summary)
    dist.destroy_process_group()


def _printer(rank0: bool):
    def log(line: str) -> None:
        if rank0:
            print(f"pma-export: {line}", flush=True)

    return log


def main() -> None:
    register_export_configs()
    _run()


if __name__ == "__main__":
    main()
