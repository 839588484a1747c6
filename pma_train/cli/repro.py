"""`pma-repro`: the PMA paper's findings at CPU scale in one command (paper scale by overrides)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from pma_train.conf import CONF_DIR, register_configs
from pma_train.config import ConfigError, to_config
from pma_train.repro.config import ReproConfig, validate_repro


def run(cfg: ReproConfig) -> Path:
    """Run the stages, then write results.json (with the findings), report.md and the plots."""
    from pma_train.repro.experiment import Experiment
    from pma_train.repro.findings import evaluate_findings
    from pma_train.repro.report import write_report

    start = time.perf_counter()
    experiment = Experiment(cfg)
    experiment.run()
    result = experiment.collect()
    result["wall_seconds"]["total"] = round(time.perf_counter() - start, 1)
    result["findings"] = evaluate_findings(result)
    path = Path(cfg.out) / "results.json"
    path.write_text(json.dumps(result, indent=2))
    return write_report(path)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="repro")
def _run(node: DictConfig) -> None:
    cfg: ReproConfig = to_config(ReproConfig, node)
    try:
        validate_repro(cfg)
    except ConfigError as err:
        print(f"pma-repro: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    report = run(cfg)
    print(report.read_text())


def main() -> None:
    register_configs()
    ConfigStore.instance().store(name="repro_schema", node=ReproConfig)
    _run()


if __name__ == "__main__":
    main()
