"""pma-merge output_format=torch_dist on DeepSpeed ZeRO-3 checkpoints: memory per merge rank vs model size.

N checkpoints of a model with pma-train's parameter names (plain torch modules named as the HybridModel's
`embedding.word_embeddings`, `decoder.layers.<i>.pre_mlp_layernorm` / `mlp.linear_fc1` / `mlp.linear_fc2`,
`output_layer`: what the conversion reads is names, shapes and partitions, not the forward), saved by
DeepSpeed ZeRO-3 fp32 from 2 ranks, converted (SMA) on 1 and 2 merge ranks at `memory_budget_mb`; per run
the command's wall time and the busiest rank's peak RSS and its growth while converting (its
pma_merge.json summary), beside DeepSpeed's zero_to_fp32 + an in-memory average in one process.

    python benchmarks/ds_to_torch_dist.py --count 4 --hidden 1024 --layers 6
writes benchmarks/results/ds_to_torch_dist.{md,json} (with the machine's load while it ran).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": str(REPO)}


def _run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:6]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return time.perf_counter() - start, proc.stdout


def _torchrun(nproc: int, *args: str) -> float:
    return _run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *args])[0]


def _model(hidden: int, layers: int, vocab: int):
    import torch
    from torch import nn

    def module(**children) -> nn.Module:
        m = nn.Module()
        for name, child in children.items():
            setattr(m, name, child)
        return m

    torch.manual_seed(0)
    layer = lambda: module(pre_mlp_layernorm=nn.LayerNorm(hidden),  # noqa: E731
                           mlp=module(linear_fc1=nn.Linear(hidden, 8 * hidden, bias=False),
                                      linear_fc2=nn.Linear(4 * hidden, hidden, bias=False)))
    return module(embedding=module(word_embeddings=nn.Embedding(vocab, hidden)),
                  decoder=module(layers=nn.ModuleList([layer() for _ in range(layers)]), final_norm=nn.LayerNorm(hidden)),
                  output_layer=nn.Linear(hidden, vocab, bias=False))


def save(args) -> None:
    """Under torchrun: a ZeRO-3 engine of the model, saved `count` times (the conversion's work does not
    depend on the values)."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=_model(args.hidden, args.layers, args.vocab), config=config)
    for step in range(1, args.count + 1):
        engine.save_checkpoint(args.ckpt_dir, tag=f"global_step{step}")


def baseline(args) -> None:
    """zero_to_fp32 of every input, averaged in memory; prints seconds and peak RSS as JSON."""
    import psutil
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    start, total, rss_start = time.perf_counter(), None, psutil.Process().memory_info().rss
    for step in range(1, args.count + 1):
        state = get_fp32_state_dict_from_zero_checkpoint(args.ckpt_dir, tag=f"global_step{step}")
        total = total or {k: torch.zeros_like(v) for k, v in state.items()}
        for k, v in state.items():
            total[k].add_(v, alpha=1.0 / args.count)
        del state
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "peak_rss": peak,
                                  "rss_growth": peak - rss_start, "params": sum(v.numel() for v in total.values())}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--budget-mb", type=int, default=64)
    parser.add_argument("--work", default="/tmp/pma-ds-to-torch-dist-bench")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--part", default="main", choices=["main", "save", "baseline"])
    parser.add_argument("--ckpt-dir")
    args = parser.parse_args()
    if args.part != "main":
        return save(args) if args.part == "save" else baseline(args)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load_before, ckpts = os.getloadavg(), work / "ds"
    _torchrun(2, __file__, "--part", "save", "--ckpt-dir", str(ckpts), "--count", str(args.count), "--hidden",
              str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab))
    input_bytes = sum(f.stat().st_size for f in (ckpts / f"global_step{args.count}").iterdir())
    rows = []
    for ranks in (1, 2):
        out = work / f"converted{ranks}"
        seconds = _torchrun(ranks, "-m", "pma_train.cli.merge", f"root={ckpts}", f"n={args.count}", "v_iterations=1",
                            "method=sma", "output_format=torch_dist", f"output={out}", "progress_bar=false",
                            f"memory_budget_mb={args.budget_mb}")
        summary = json.loads((out / f"iter_{args.count:07d}" / "pma_merge.json").read_text())["summary"]
        rows.append({"tool": f"pma-merge output_format=torch_dist, {ranks} rank(s)", "wall_s": seconds,
                     "merge_s": summary["seconds"], "peak_rss_mib": summary["peak_rss_bytes"] / 2**20,
                     "growth_mib": summary["peak_rss_above_start_bytes"] / 2**20})
        shutil.rmtree(out)
    wall, stdout = _run([sys.executable, __file__, "--part", "baseline", "--ckpt-dir", str(ckpts),
                         "--count", str(args.count)])
    base = json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    rows.append({"tool": "zero_to_fp32 + in-memory average, 1 process", "wall_s": wall, "merge_s": base["seconds"],
                 "peak_rss_mib": base["peak_rss"] / 2**20, "growth_mib": base["rss_growth"] / 2**20})
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = {"n": args.count, "params": base["params"], "input_bytes_each": input_bytes, "budget_mb": args.budget_mb,
              "load_before": load_before, "load_after": os.getloadavg(), "uptime": uptime, "rows": rows}
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "ds_to_torch_dist.json").write_text(json.dumps(result, indent=2))
    lines = ["# pma-merge output_format=torch_dist on DeepSpeed ZeRO-3 checkpoints", "",
             f"SMA of N={args.count} ZeRO-3 fp32 checkpoints of a {base['params'] / 1e6:.1f}M-parameter model with "
             f"pma-train's names, saved by DeepSpeed from 2 ranks ({input_bytes / 2**30:.2f} GiB each), converted "
             f"with memory_budget_mb={args.budget_mb} (fp32 accumulation); CPU. Load: {uptime} (1-min load "
             f"{load_before[0]:.1f} before, {result['load_after'][0]:.1f} after).", "",
             "| tool | wall s (command) | merge s | peak RSS per rank (MiB) | growth while converting (MiB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['tool']} | {r['wall_s']:.1f} | {r['merge_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['growth_mib']:.0f} |" for r in rows]
    lines += ["", "pma-merge's figures are the busiest rank's (whole process, torch and deepspeed imports included; "
              "growth: above its RSS when the conversion started). The fp32 model is "
              f"{base['params'] * 4 / 2**20:.0f} MiB: a rank holds one row block within the budget, not the model."]
    (results / "ds_to_torch_dist.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
