"""pma-merge on DeepSpeed ZeRO-3 checkpoints vs DeepSpeed's zero_to_fp32 plus an in-memory average.

Issue 17's measurement: N checkpoints of a >= 100M-parameter model saved by DeepSpeed ZeRO-3 from 2
ranks (CPU, gloo, fp32, AdamW), merged (SMA) by
- pma-merge on 1 and 2 merge ranks (torchrun): wall time of the command, peak RSS per rank (its
  pma_merge.json summary: the busiest rank, whole process);
- `get_fp32_state_dict_from_zero_checkpoint` on every input, accumulated in one fp32 state dict in
  one process: wall time and peak RSS (ru_maxrss).
Both results are checked equal (fp32 accumulation, same order: within 1e-6).

    python benchmarks/ds_merge.py --count 10 --width 4096 --depth 6
writes benchmarks/results/ds_merge.{md,json} (with the machine's load while it ran).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": str(REPO)}


def _free_port() -> int:
    with socket.socket() as sock:  # torchrun's default port may be another job's
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, *args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           f"--master-port={_free_port()}", *args],
                          cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{args[:2]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return time.perf_counter() - start


def train(args) -> None:
    """Under torchrun: one AdamW step and one ZeRO-3 checkpoint per input."""
    import deepspeed
    import torch

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    layers = [torch.nn.Linear(args.width, args.width) for _ in range(args.depth)]
    model = torch.nn.Sequential(*layers)
    config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    for _ in range(args.count):
        x = torch.randn(2, args.width)
        engine.backward(engine(x).square().mean())
        engine.step()
        engine.save_checkpoint(args.ckpt_dir)


def baseline(args) -> None:
    """zero_to_fp32 on every input, averaged in memory; prints seconds and peak RSS as JSON."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import psutil

    start, total, rss_start = time.perf_counter(), None, psutil.Process().memory_info().rss
    tags = [f"global_step{s}" for s in range(1, args.count + 1)]
    for tag in tags:
        state = get_fp32_state_dict_from_zero_checkpoint(args.ckpt_dir, tag=tag)
        if total is None:
            total = {k: torch.zeros_like(v) for k, v in state.items()}
        for k, v in state.items():
            total[k].add_(v, alpha=1.0 / len(tags))
        del state
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the check below loads more
    worst = 0.0
    for merged_dir in args.merged.split(","):  # DeepSpeed's own reconstruction of each pma-merge output
        merged = get_fp32_state_dict_from_zero_checkpoint(merged_dir)
        if merged.keys() != total.keys():
            raise SystemExit(f"{merged_dir}: parameters {sorted(merged)[:3]}..., expected {sorted(total)[:3]}...")
        worst = max([worst] + [float((merged[k] - total[k]).abs().max()) for k in total])
        del merged
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss": peak, "rss_growth": peak - rss_start,
                                  "max_abs_diff_vs_pma_merge": worst,
                                  "params": sum(v.numel() for v in total.values())}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--work", default="/tmp/pma-ds-merge-bench")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--part", default="main", choices=["main", "train", "baseline"])
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--merged")
    args = parser.parse_args()
    if args.part == "train":
        return train(args)
    if args.part == "baseline":
        return baseline(args)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # fp32 master weights + two Adam moments per input, and two merged outputs
    need = 12 * (args.width + 1) * args.width * args.depth * (args.count + 2)
    free = shutil.disk_usage(work).free
    if need > 0.9 * free:
        raise SystemExit(f"{work}: the inputs and outputs need ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    try:
        measure(args, work)
    finally:  # the inputs are large: never left behind
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> None:
    load_before = os.getloadavg()
    ckpts = work / "ds"
    train_s = _torchrun(2, __file__, "--part", "train", "--ckpt-dir", str(ckpts), "--count", str(args.count), "--width",
                        str(args.width), "--depth", str(args.depth))
    input_bytes = sum(f.stat().st_size for f in (ckpts / "global_step1").iterdir())
    rows = []
    for ranks in (1, 2):
        out = work / f"merged{ranks}"
        seconds = _torchrun(ranks, "-m", "pma_train.cli.merge", f"root={ckpts}", f"n={args.count}", "v_iterations=1",
                            "method=sma", f"output={out}", "progress_bar=false", "memory_budget_mb=2048")
        summary = json.loads((out / f"global_step{args.count}" / "pma_merge.json").read_text())["summary"]
        rows.append({"tool": f"pma-merge, {ranks} merge rank(s)", "wall_s": seconds, "merge_s": summary["seconds"],
                     "peak_rss_per_rank_mib": summary["peak_rss_bytes"] / 2**20,
                     "rss_growth_mib": summary["peak_rss_above_start_bytes"] / 2**20})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--part", "baseline", "--ckpt-dir", str(ckpts), "--count", str(args.count),
                           "--merged", f"{work / 'merged1'},{work / 'merged2'}"], cwd=REPO, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
    base = json.loads(line[len("RESULT "):])
    rows.append({"tool": "zero_to_fp32 + in-memory average, 1 process", "wall_s": wall, "merge_s": base["seconds"],
                 "peak_rss_per_rank_mib": base["peak_rss"] / 2**20, "rss_growth_mib": base["rss_growth"] / 2**20})
    result = {"n": args.count, "params": base["params"], "input_bytes_each": input_bytes, "train_s": train_s,
              "load_before": load_before, "load_after": os.getloadavg(), "uptime": subprocess.run(
                  ["uptime"], capture_output=True, text=True).stdout.strip(),
              "max_abs_diff_pma_merge_vs_baseline": base["max_abs_diff_vs_pma_merge"], "rows": rows}
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "ds_merge.json").write_text(json.dumps(result, indent=2))
    lines = ["# pma-merge vs zero_to_fp32 on DeepSpeed ZeRO-3 checkpoints",
             "",
             f"N={args.count} SMA of ZeRO-3 fp32 checkpoints (AdamW) of a {base['params'] / 1e6:.1f}M-parameter MLP saved "
             f"by DeepSpeed 0.19 from 2 ranks ({input_bytes / 2**30:.2f} GiB per checkpoint); CPU, "
             f"memory_budget_mb=2048. Load: {result['uptime']} (1-min load {load_before[0]:.1f} before, "
             f"{result['load_after'][0]:.1f} after). Results agree to {base['max_abs_diff_vs_pma_merge']:.2e}.",
             "",
             "| tool | wall s (command) | merge s | peak RSS per rank (MiB) | growth while merging (MiB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['tool']} | {r['wall_s']:.1f} | {r['merge_s']:.1f} | {r['peak_rss_per_rank_mib']:.0f} | "
              f"{r['rss_growth_mib']:.0f} |" for r in rows]
    lines += ["", "pma-merge's figure is the busiest rank's whole-process peak RSS (torch + deepspeed imports "
              "included); the baseline's is the process's ru_maxrss. pma-merge also writes a resumable DeepSpeed "
              "checkpoint (optimizer partitions included); the baseline writes nothing."]
    (results / "ds_merge.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
