"""`pma-train`: the training entry point (hydra). `pma-train --help` lists groups and options."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from pma_train.checkpoint.layout import CheckpointError, check_loadable, is_gpt_checkpoint, list_iterations
from pma_train.checkpoint.optimizer_format import check_layout_before_start
from pma_train.checkpoint.origin import check_restart_of_init_run
from pma_train.cli.quiet import quiet_third_party
from pma_train.conf import CONF_DIR, register_configs
from pma_train.merge.ds.accept import check_convertible, deepspeed_refusal, is_deepspeed_checkpoint
from pma_train.config import ConfigError, JobConfig, check_output_dirs, to_job_config, validate
from pma_train.cli.common import check_perf_for_host
from pma_train.platform import PlatformError, check_devices


def check_checkpoints(job: JobConfig) -> None:
    """Every checkpoint the job will read exists and is complete."""
    c = job.checkpoint
    if c.load is not None and (refusal := deepspeed_refusal(c.load, "checkpoint.load")):
        raise CheckpointError(refusal)
    for name, path in (("checkpoint.load", c.load), ("checkpoint.init_from", c.init_from)):
        if name == "checkpoint.init_from" and path is not None and is_deepspeed_checkpoint(path):
            # Converted once the job runs (train/checkpointer.py); its names are checked now.
            check_convertible(path, name)
        elif path is not None:
            try:
                check_loadable(path)
            except CheckpointError as err:
                raise CheckpointError(f"{name}: {err}") from None
    if c.init_merge.root is not None:
        _check_init_merge(job)
    if c.load is None and list_iterations(c.dir):
        try:
            check_loadable(c.dir)
        except CheckpointError as err:
            raise CheckpointError(f"checkpoint.dir (auto-resume): {err}") from None
        if c.init_from is not None:
            check_restart_of_init_run(c.init_from, c.dir)
    if job.schedule.name == "anneal" and c.load is not None and not list_iterations(c.dir):
        from pma_train.merge.select import describe

        fork = describe(c.load).iteration
        if job.train.iters <= fork:
            raise CheckpointError(f"train.iters: {job.train.iters} must be beyond the fork's iteration {fork} "
                                  "for an annealing branch")
    resume = c.load or (c.dir if list_iterations(c.dir) else None)
    if resume is not None and not c.no_load_optim:
        p = job.parallel
        check_layout_before_start(check_loadable(resume), p.tp, p.pp, p.ep, p.vpp or 1)
    if resume is not None and not c.no_load_optim and is_gpt_checkpoint(check_loadable(resume)):
        raise CheckpointError(f"checkpoint.load: {check_loadable(resume)} is a GPTModel checkpoint (Megatron-LM); "
                              "its optimizer state is keyed for GPTModel: start from its weights with "
                              "checkpoint.init_from, or resume without optimizer (checkpoint.no_load_optim=true)")


def _check_init_merge(job: JobConfig) -> None:
    """The checkpoints PMA-init will average exist, are complete and safe to load."""
    from pma_train.merge.select import SelectionError, select_spaced

    m = job.checkpoint.init_merge
    try:
        for info in select_spaced(m.root, m.n, m.v_tokens, m.v_iterations, m.end_iteration):
            check_loadable(info.path)
    except (SelectionError, CheckpointError) as err:
        raise CheckpointError(f"checkpoint.init_merge: {err}") from None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _run(cfg: DictConfig) -> None:
    job = to_job_config(cfg)
    if not job.logging.verbose:
        quiet_third_party()
    try:
        # Before megatron-core is even imported, let alone a process group started.
        validate(job)
        check_devices(job.parallel.backend)
        check_perf_for_host(job)
        check_output_dirs(job)
        check_checkpoints(job)
    except (ConfigError, CheckpointError, PlatformError) as err:
        print(f"pma-train: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from pma_train.checkpoint.lock import LockError
    from pma_train.checkpoint.space import DiskFullError
    from pma_train.parallel import destroy_distributed
    from pma_train.train.trainer import Trainer

    try:
        trainer = Trainer(job)
        summary = trainer.train()
    except (LockError, DiskFullError, CheckpointError) as err:
        # Raised on every rank alike (a lock refused, a full disk, a checksum mismatch found while
        # loading): one line from rank 0, and no rank left waiting for another.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pma-train: error: {err}", file=sys.stderr, flush=True)
        destroy_distributed()
        raise SystemExit(3 if isinstance(err, LockError) else 1) from None
    trainer.checkpointer.release_locks()
    destroy_distributed()
    if summary["preempted"]:
        from pma_train.train.preemption import PREEMPTED_EXIT_CODE

        raise SystemExit(PREEMPTED_EXIT_CODE)  # saved and stopped on a signal: a rerun resumes


def main() -> None:
    register_configs()
    _run()


if __name__ == "__main__":
    main()
