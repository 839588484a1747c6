"""`pma-eval`: validation loss of checkpoints with pma-train's own evaluation (hydra; torchrun or alone)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pma_train.checkpoint.layout import CheckpointError, check_loadable
from pma_train.cli.common import check_perf_for_host
from pma_train.cli.quiet import quiet_third_party
from pma_train.conf import CONF_DIR, register_configs
from pma_train.config import ConfigError, EvalConfig, to_config, validate_eval
from pma_train.platform import PlatformError, check_devices


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _run(node: DictConfig) -> None:
    cfg: EvalConfig = to_config(EvalConfig, node)
    if not cfg.logging.verbose:
        quiet_third_party()
    try:
        validate_eval(cfg)
        check_devices(cfg.parallel.backend)
        check_perf_for_host(cfg)
        for path in cfg.checkpoints:
            check_loadable(path)
    except (ConfigError, CheckpointError, PlatformError) as err:
        print(f"pma-eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    import torch.distributed as dist

    from pma_train.evaluate import Evaluator
    from pma_train.parallel import destroy_distributed

    evaluator = Evaluator(cfg)
    try:
        results = [evaluator.evaluate(path) for path in cfg.checkpoints]
    except CheckpointError as err:  # e.g. a checksum mismatch, found as the checkpoint is loaded
        print(f"pma-eval: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if dist.get_rank() == 0:
        print(f"{'val loss':>10}  {'iteration':>10}  {'tokens':>14}  checkpoint")
        for r in results:
            print(f"{r['val_loss']:>10.5f}  {r['iteration']:>10}  {r['consumed_tokens']:>14,}  {r['checkpoint']}")
        if cfg.output:
            Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.output).write_text(json.dumps(results, indent=2))
    destroy_distributed()


def main() -> None:
    register_configs()
    _run()


if __name__ == "__main__":
    main()
