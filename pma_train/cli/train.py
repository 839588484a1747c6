"""`pma-train`: the training entry point (hydra). `pma-train --help` lists groups and options."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pma_train.cli.common import CONF_DIR, register_configs
from pma_train.config import ConfigError, to_job_config, validate


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _run(cfg: DictConfig) -> None:
    job = to_job_config(cfg)
    try:
        validate(job)  # before megatron-core is even imported, let alone a process group started
    except ConfigError as err:
        print(f"pma-train: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from pma_train.train.trainer import Trainer

    Trainer(job).train()
    from pma_train.parallel import destroy_distributed

    destroy_distributed()


def main() -> None:
    register_configs()
    _run()


if __name__ == "__main__":
    main()
