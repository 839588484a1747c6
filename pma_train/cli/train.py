"""`pma-train`: the training entry point (hydra). `pma-train --help` lists groups and options."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pma_train.cli.common import CONF_DIR, register_configs
from pma_train.checkpoint.layout import CheckpointError, check_loadable, is_gpt_checkpoint, list_iterations
from pma_train.config import ConfigError, JobConfig, to_job_config, validate


def check_checkpoints(job: JobConfig) -> None:
    """Every checkpoint the job will read exists and is complete."""
    c = job.checkpoint
    for name, path in (("checkpoint.load", c.load), ("checkpoint.init_from", c.init_from)):
        if path is not None:
            try:
                check_loadable(path)
            except CheckpointError as err:
                raise CheckpointError(f"{name}: {err}") from None
    if c.load is None and list_iterations(c.dir):
        try:
            check_loadable(c.dir)
        except CheckpointError as err:
            raise CheckpointError(f"checkpoint.dir (auto-resume): {err}") from None
    if job.schedule.name == "anneal" and c.load is not None and not list_iterations(c.dir):
        from pma_train.merge.select import describe

        fork = describe(c.load).iteration
        if job.train.iters <= fork:
            raise CheckpointError(f"train.iters: {job.train.iters} must be beyond the fork's iteration {fork} "
                                  "for an annealing branch")
    resume = c.load or (c.dir if list_iterations(c.dir) else None)
    if resume is not None and not c.no_load_optim and is_gpt_checkpoint(check_loadable(resume)):
        raise CheckpointError(f"checkpoint.load: {check_loadable(resume)} is a GPTModel checkpoint (Megatron-LM); "
                              "its optimizer state is keyed for GPTModel: start from its weights with "
                              "checkpoint.init_from, or resume without optimizer (checkpoint.no_load_optim=true)")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _run(cfg: DictConfig) -> None:
    job = to_job_config(cfg)
    try:
        # Before megatron-core is even imported, let alone a process group started.
        validate(job)
        check_checkpoints(job)
    except (ConfigError, CheckpointError) as err:
        print(f"pma-train: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from pma_train.train.trainer import Trainer

    try:
        Trainer(job).train()
    except CheckpointError as err:  # e.g. a checksum mismatch, found as a checkpoint is loaded
        print(f"pma-train: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    from pma_train.parallel import destroy_distributed

    destroy_distributed()


def main() -> None:
    register_configs()
    _run()


if __name__ == "__main__":
    main()
