"""Where a training step's GPU time goes: pma-train's Trainer (composed as pma-train composes it) under
torch.profiler, the kernels ranked by their own device time, grouped into matrix products, attention,
communication, copies and the rest.

    python benchmarks/gpu_profile.py OUT_FILE [hydra overrides...]

Run by hand on a GPU host (benchmarks/gpu_acceptance.sh's dense_411m shape, e.g.
`model=dense_411m train.seq_length=4096 model.max_position_embeddings=4096 train.iters=4`); the table
goes to stdout and OUT_FILE. The whole run is profiled, first step (compilation, allocation) included:
read the kernels' shares, not the total.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

GROUPS = (("matrix products", ("gemm", "cutlass", "xmma", "cublas", "matmul")),
          ("attention", ("flash", "fmha", "attention", "softmax")),
          ("communication", ("nccl",)),
          ("copies", ("memcpy", "memset", "copy")))


def group_of(name: str) -> str:
    low = name.lower()
    return next((group for group, keys in GROUPS if any(k in low for k in keys)), "other kernels")


def main(out_file: str, overrides: list[str]) -> None:
    import torch
    from hydra import compose, initialize_config_dir
    from torch.profiler import ProfilerActivity, profile

    from pma_train.conf import CONF_DIR, register_configs
    from pma_train.config import to_job_config
    from pma_train.parallel import destroy_distributed
    from pma_train.train.trainer import Trainer

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_job_config(compose("train", overrides=list(overrides)))
    trainer = Trainer(cfg)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.train()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall = time.perf_counter() - started
    # As the CLI ends a job (the GPU run without this hung at exit past its time limit).
    trainer.checkpointer.lock.release()
    destroy_distributed()
    # Kernels only: an operator's own device time repeats its kernels'.
    kernels = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels) or 1.0
    groups: dict[str, float] = {}
    for e in kernels:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_device_time_total
    lines = [f"train() wall {wall:.1f} s; kernels' own device time {total / 1e6:.2f} s ({', '.join(overrides)})", "",
             "| group | device s | share |", "|---|---|---|"]
    lines += [f"| {g} | {t / 1e6:.2f} | {t / total:.1%} |" for g, t in sorted(groups.items(), key=lambda x: -x[1])]
    lines += ["", "| kernel | calls | device ms | share |", "|---|---|---|---|"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]:
        lines.append(f"| {e.key[:90]} | {e.count} | {e.self_device_time_total / 1e3:.1f} | "
                     f"{e.self_device_time_total / total:.1%} |")
    text = "\n".join(lines)
    print(text)
    Path(out_file).write_text(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    main(sys.argv[1], sys.argv[2:])
