"""`pma-merge`: average checkpoints with the sharded engine (hydra; runs under torchrun or alone).

Stays on the lean path: torch and pma_train's merge / checkpoint packages only (no megatron-core, wandb,
transformers or matplotlib; tests/test_lean_imports.py). A dry run does not even import torch: it reads
the inputs' pma_train.json side-cars only (a Megatron-LM checkpoint without one: its common state).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from pma_train.checkpoint.layout import CheckpointError, read_tracker, verify_complete
from pma_train.conf import CONF_DIR
from pma_train.config import ConfigError, MergeConfig, to_config, validate_merge
from pma_train.merge import SelectionError, WeightError, merge_weights, resolve_inputs, select_spaced
from pma_train.merge.select import sort_oldest_first, verify_deepspeed


def _fail(message: str, code: int = 2) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pma-merge: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def selection(cfg: MergeConfig):
    """(inputs oldest first, weights, a note when the listed inputs were reordered) for a merge request."""
    explicit, note = list(cfg.weights), None
    if cfg.inputs:
        inputs, explicit, reordered = sort_oldest_first(resolve_inputs(cfg.inputs, cfg.seq_length), explicit)
        if reordered:
            note = ("inputs are merged oldest first, not in the order listed"
                    + (": each explicit weight stays with the input it was listed with" if explicit else ""))
    else:
        inputs = select_spaced(cfg.root, cfg.n, cfg.v_tokens, cfg.v_iterations, cfg.end_iteration,
                               cfg.seq_length)
    weights = merge_weights(cfg.method, len(inputs), cfg.alpha, explicit, cfg.normalize,
                            cfg.allow_negative_weights, cfg.decay_shape)
    return inputs, weights, note


def verify_inputs(inputs) -> None:
    """Every input complete and safe to load, before any process group. Not on a dry run: vetting the
    pickles needs torch (seconds of start-up), and a dry run only shows the selection."""
    for info in inputs:
        if info.format == "torch_dist":
            verify_complete(info.path)
        else:
            verify_deepspeed(info)


def print_selection(inputs, weights, note: str | None = None) -> None:
    if note:
        print(f"note: {note}")
    print(f"{'iteration':>10}  {'tokens':>14}  {'weight':>9}  checkpoint")
    for info, weight in zip(inputs, weights):
        tokens = "?" if info.consumed_tokens is None else f"{info.consumed_tokens:,}"
        print(f"{info.iteration:>10}  {tokens:>14}  {weight:>9.5f}  {info.path}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="merge")
def _run(node: DictConfig) -> None:
    cfg: MergeConfig = to_config(MergeConfig, node)
    try:
        validate_merge(cfg)
        inputs, weights, note = selection(cfg)
        if not cfg.dry_run:
            verify_inputs(inputs)
        if cfg.output:
            read_tracker(Path(cfg.output))  # an unreadable tracker of the output fails now, not after the merge
    except (ConfigError, SelectionError, WeightError, CheckpointError) as err:
        _fail(str(err))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if cfg.dry_run:
        if rank0:
            print_selection(inputs, weights, note)
        return

    import torch.distributed as dist

    from pma_train.checkpoint.lock import LockError
    from pma_train.merge.publish import MergeError, MergeRequest
    from pma_train.parallel import init_process_group

    if inputs[0].format == "deepspeed" and cfg.output_format == "torch_dist":
        from pma_train.merge.ds.to_torch_dist import run_ds_to_torch_dist as run_merge
    elif inputs[0].format == "deepspeed":  # imports deepspeed's classes only now, for a DeepSpeed input
        from pma_train.merge.ds.engine import run_ds_merge as run_merge
    else:
        from pma_train.merge.engine import run_merge

    init_process_group("gloo")
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)  # memory-bound: extra threads only contend (measured 4x slower with 2)
    request = MergeRequest(inputs=inputs, weights=weights, output_root=Path(cfg.output), method=cfg.method,
                           alpha=cfg.alpha if cfg.method == "ema" else None,
                           decay_shape=cfg.decay_shape if cfg.method == "decay" else None,
                           budget_bytes=cfg.memory_budget_mb * 2**20, accumulate=cfg.accumulate_dtype,
                           output_dtype=cfg.output_dtype, carry_optimizer=cfg.carry_optimizer,
                           overwrite=cfg.overwrite, progress=cfg.progress_bar and sys.stderr.isatty(),
                           force_unlock=cfg.force_unlock, check_free_space=cfg.check_free_space)
    if rank0:
        print_selection(inputs, weights, note)
    try:
        summary = run_merge(request)
    except (MergeError, CheckpointError, LockError) as err:
        dist.destroy_process_group()
        _fail(str(err), code=3 if isinstance(err, LockError) else 1)
    if rank0:
        print(f"merged {len(inputs)} checkpoints ({cfg.method}) into {summary.output}: "
              f"read {summary.bytes_read / 2**30:.3f} GiB in {summary.seconds:.2f} s "
              f"({summary.read_gbps:.2f} GB/s) on {summary.ranks} rank(s), {summary.pieces} pieces; "
              f"peak RSS of the busiest rank {summary.peak_rss_bytes / 2**20:.0f} MiB "
              f"(+{summary.peak_rss_above_start_bytes / 2**20:.0f} MiB while merging, "
              f"budget {cfg.memory_budget_mb} MiB)")
    dist.destroy_process_group()


def main() -> None:
    # The merge schema only: the trainer's groups (model presets, schedules) are no merge options.
    ConfigStore.instance().store(name="merge_schema", node=MergeConfig)
    _run()


if __name__ == "__main__":
    main()
