"""python -m tests.recompute_driver OUT_DIR OVERRIDES_JSON: train pma-train's Trainer (composed as
the CLI composes it) once per named override list, one after another in this one process (one
megatron-core import for all of them), and print {name: {"loss": [...], "grad_norm": [...]}} as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from hydra import compose, initialize_config_dir

    from pma_train.conf import CONF_DIR, register_configs
    from pma_train.config import to_job_config
    from pma_train.metrics import METRICS_FILE, read_metrics
    from pma_train.parallel import destroy_distributed
    from pma_train.train.trainer import Trainer

    out, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    register_configs()
    results = {}
    for name, overrides in runs.items():
        run_dir = out / name
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = to_job_config(compose("train", overrides=[f"run.dir={run_dir}", *overrides]))
        trainer = Trainer(cfg)
        trainer.train()
        trainer.checkpointer.lock.release()
        destroy_distributed()
        records = read_metrics(run_dir / METRICS_FILE, "train")
        results[name] = {"loss": [r["loss"] for r in records], "grad_norm": [r["grad_norm"] for r in records]}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
