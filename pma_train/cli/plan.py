"""`pma-plan`: dry-run a pma-train job for a number of GPUs (hydra; pma-train's overrides + plan.*)."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from pma_train.conf import CONF_DIR, register_configs
from pma_train.config import ConfigError, to_config
from pma_train.plan import BuildError, PlanJobConfig, make_plan


def register_plan_configs() -> None:
    """pma-train's configs, with the job schema extended by `plan.*` (train.yaml composes it)."""
    register_configs()
    ConfigStore.instance().store(name="job_schema", node=PlanJobConfig)


def to_plan_job(node: DictConfig) -> PlanJobConfig:
    return to_config(PlanJobConfig, node)


def compose(overrides: list[str]) -> PlanJobConfig:
    """The job pma-plan would plan for these overrides (for in-process use, e.g. tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_plan_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="pma-plan"):
        return to_plan_job(hydra_compose(config_name="plan", overrides=overrides))


def run(job: PlanJobConfig) -> dict:
    """Plan, print the table, write the JSON if asked; exit 2 on a configuration error."""
    from pma_train.plan.report import render

    try:
        plan = make_plan(job)
    except (ConfigError, BuildError) as err:
        field = "" if isinstance(err, ConfigError) else "model: "
        print(f"pma-plan: configuration error: {field}{err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(render(plan))
    if job.plan.json:
        path = Path(job.plan.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=2) + "\n")
    return plan


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="plan")
def _run(cfg: DictConfig) -> None:
    run(to_plan_job(cfg))


def main() -> None:
    # A dry run: megatron-core's import-time notes (no Apex / TE / CUDA here) say nothing about the plan.
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    register_plan_configs()
    _run()


if __name__ == "__main__":
    main()
