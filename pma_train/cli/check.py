"""`pma-check`: verify whole checkpoints (complete, every checksum) of a checkpoint or a tree (hydra).

    pma-check ckpt/run1                      # a positional path is read as path=...
    pma-check path=ckpt/run1/iter_0000400 workers=8

Exit status: 0 when every checkpoint is sound, 1 when any is bad, 2 for a usage error. Stays on the lean
path (torch + pma_train.checkpoint): no megatron-core import.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from pma_train.checkpoint.check import CheckConfig, format_table, timed_check
from pma_train.checkpoint.layout import CheckpointError
from pma_train.conf import CONF_DIR
from pma_train.config import to_config

# hydra options that take the next argument as their value: not a path
_VALUE_OPTIONS = {"-cn", "-cp", "-cd", "--config-name", "--config-path", "--config-dir"}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="check")
def _run(node: DictConfig) -> None:
    cfg: CheckConfig = to_config(CheckConfig, node)
    try:
        if not cfg.path:
            raise CheckpointError("path: give a checkpoint or a root, e.g. 'pma-check ckpt/run1'")
        reports, seconds = timed_check(cfg)
    except CheckpointError as err:
        print(f"pma-check: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_table(reports, seconds))
    if any(r.problems for r in reports):
        raise SystemExit(1)


def positional_to_override(argv: list[str]) -> list[str]:
    """`pma-check DIR` means `pma-check path=DIR` (hydra itself takes key=value overrides only)."""
    out = []
    for i, arg in enumerate(argv):
        value_of_option = i > 0 and argv[i - 1] in _VALUE_OPTIONS
        out.append(arg if "=" in arg or arg.startswith("-") or value_of_option else f"path={arg}")
    return out


def main() -> None:
    ConfigStore.instance().store(name="check_schema", node=CheckConfig)
    sys.argv[1:] = positional_to_override(sys.argv[1:])
    _run()


if __name__ == "__main__":
    main()
