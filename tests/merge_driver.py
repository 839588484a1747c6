"""torchrun ... -m tests.merge_driver ROOT OUT_PREFIX METHOD[:ALPHA] ...: run the merge engine on every
rank for several methods in one job (the CLI's own path is tested separately), so that checking
SMA / EMA / WMA at several world sizes costs one process start per world size."""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    import torch.distributed as dist

    from pma_train.merge import merge_weights, select_spaced
    from pma_train.merge.engine import MergeRequest, run_merge
    from pma_train.parallel import init_process_group

    root, prefix, methods = sys.argv[1], sys.argv[2], sys.argv[3:]
    init_process_group("gloo")
    inputs = select_spaced(root, 3, v_iterations=2)
    for spec in methods:
        method, _, alpha = spec.partition(":")
        weights = merge_weights(method, len(inputs), float(alpha or 0.2))
        summary = run_merge(MergeRequest(inputs=inputs, weights=weights, output_root=Path(f"{prefix}-{method}"),
                                         method=method, progress=False))
        assert summary.ranks == dist.get_world_size()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
