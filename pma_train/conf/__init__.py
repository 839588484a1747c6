"""The hydra config directory of every entry point, and the structured schemas its YAML files name.

Registration lives here, next to the YAML it serves, so that anything composing a job config (the
CLIs, pma-repro's workers, benchmarks) imports it from below `cli/` and `repro/`.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from pma_train.config import DataPrepConfig, EvalConfig, JobConfig

CONF_DIR = str(Path(__file__).resolve().parent)


def model_configs_dir() -> Path:
    """model_configs/ of the repo (or $PMA_MODEL_CONFIGS)."""
    env = os.environ.get("PMA_MODEL_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "model_configs"


def register_configs() -> None:
    """The schemas of the training-side configs (train, data, eval) and the model presets.

    Commands with a schema of their own (merge, check, export, plan, repro) store it after this, or
    instead of it where they need no model (the lean merge path).
    """
    store = ConfigStore.instance()
    store.store(name="job_schema", node=JobConfig)
    store.store(name="data_schema", node=DataPrepConfig)
    store.store(name="eval_schema", node=EvalConfig)
    for path in sorted(model_configs_dir().glob("*.yaml")):
        store.store(group="model", name=path.stem, node=OmegaConf.load(path))
