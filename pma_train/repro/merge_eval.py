"""Worker (one job under torchrun, any number of ranks): merge with the sharded engine and evaluate.

    python -m torch.distributed.run ... -m pma_train.repro.merge_eval <spec.json>

spec: {"overrides": [pma-train overrides], "work": dir, "output": results.json, "jobs": [...]}, each job
either {"key", "checkpoint"} (evaluate a checkpoint as it is) or {"key", "root", "n", "v_tokens",
"end_iteration", "method", "alpha", "decay_shape", "keep"} (select the last n checkpoints of root
v_tokens apart ending at end_iteration, merge them into `keep` or a scratch dir, evaluate the merge).
The model and validation data are built once; each merge is written, evaluated and (scratch) removed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist


def job_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from pma_train.conf import CONF_DIR, register_configs
    from pma_train.config import to_job_config

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_job_config(compose(config_name="train", overrides=overrides))


def merge_job(job: dict, scratch: Path) -> tuple[Path, dict]:
    """Merge one selection; returns (checkpoint root to evaluate, what was merged)."""
    from pma_train.merge import merge_weights, select_spaced
    from pma_train.merge.engine import run_merge
    from pma_train.merge.publish import MergeRequest

    inputs = select_spaced(job["root"], job["n"], v_tokens=job["v_tokens"], end_iteration=job["end_iteration"])
    weights = merge_weights(job["method"], len(inputs), job.get("alpha", 0.2),
                            decay_shape=job.get("decay_shape", "linear"))
    output = Path(job["keep"]) if job.get("keep") else scratch
    summary = run_merge(MergeRequest(inputs=inputs, weights=weights, output_root=output, method=job["method"],
                           alpha=job.get("alpha"), decay_shape=job.get("decay_shape"), overwrite=True,
                           progress=False))
    return Path(summary.output), {"iterations": [i.iteration for i in inputs], "weights": weights}


def main(spec_path: str) -> None:
    from pma_train.evaluate import Evaluator
    from pma_train.merge import SelectionError
    from pma_train.parallel import destroy_distributed

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    evaluator = Evaluator(job_config(spec["overrides"]))
    rank0 = dist.get_rank() == 0
    results = []
    for job in spec["jobs"]:
        row = {k: v for k, v in job.items() if k != "keep"}
        if "checkpoint" in job:
            path = Path(job["checkpoint"])
        else:
            try:
                path, merged = merge_job(job, work / "scratch")
            except SelectionError as err:  # e.g. N x V reaching back before the first checkpoint
                results.append(row | {"val_loss": None, "skipped": str(err)})
                continue
            row |= merged
        row["val_loss"] = evaluator.evaluate(path)["val_loss"]
        results.append(row)
        if rank0:
            print(f"{job['key']}: {row['val_loss']:.4f}", flush=True)
    dist.barrier()
    if rank0:
        shutil.rmtree(work / "scratch", ignore_errors=True)
        Path(spec["output"]).write_text(json.dumps(results, indent=2))
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
