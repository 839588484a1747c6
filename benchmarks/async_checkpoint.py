"""Asynchronous checkpoints (`checkpoint.async_save`, issue 16 item 3): what a save costs the training loop.

One rank (gloo, CPU) trains the same model three times: without checkpoints, with synchronous saves,
and with asynchronous ones, a checkpoint (model + Adam state) every --interval steps. Per run it
records each save call's wall time (the stall: the loop waits for it) and each step's time, tagged by
whether a checkpoint was being written behind it; the publish (finalize) time is measured too.

    python benchmarks/async_checkpoint.py [--iters 24] [--interval 6]

Writes async_checkpoint.{json,md} to --results-dir (default benchmarks/results), with `uptime` before
and after: on a shared host the step times move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model=tiny", "model.hidden_size=512", "model.num_layers=8", "model.ffn_hidden_size=1408",
         "model.num_attention_heads=8", "model.num_query_groups=4"]
MODES = {"none": [], "sync": ["checkpoint.async_save=false"], "async": ["checkpoint.async_save=true"]}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=24)
    p.add_argument("--interval", type=int, default=6)
    p.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one run (its own process)


def _worker(mode: str, iters: int, interval: int, out: Path) -> None:
    from hydra import compose, initialize_config_dir

    from pma_train.checkpoint import async_save
    from pma_train.conf import CONF_DIR, register_configs
    from pma_train.config import to_job_config
    from pma_train.train.trainer import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix=f"async-ckpt-{mode}-", dir=out.parent))
    saving = [f"checkpoint.interval={interval}"] if mode != "none" else [f"checkpoint.interval={iters * 10}",
                                                                           "checkpoint.save_at_end=false"]
    overrides = [f"run.dir={run_dir}", f"train.iters={iters}", "train.seq_length=128", "train.global_batch_size=8",
                 "train.micro_batch_size=4", "train.eval_iters=0", "train.log_interval=1000",
                 "logging.progress_bar=false", "schedule.warmup_iters=1", *MODEL, *saving, *MODES[mode]]
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        trainer = Trainer(to_job_config(compose("train", overrides=overrides)))
    steps, saves, finalizes = [], [], []
    step, save, finalize = trainer.train_step, trainer.save, async_save.maybe_finalize

    def timed_step():
        behind = async_save.in_flight()
        start = time.perf_counter()
        result = step()
        steps.append({"iteration": trainer.state.iteration, "seconds": time.perf_counter() - start,
                      "save_in_flight": behind})
        return result

    def timed_save():
        start = time.perf_counter()
        path = save()
        saves.append(time.perf_counter() - start)
        return path

    def timed_finalize(blocking=False):
        start = time.perf_counter()
        published = finalize(blocking)
        if published:
            finalizes.append(time.perf_counter() - start)
        return published

    trainer.train_step, trainer.save, async_save.maybe_finalize = timed_step, timed_save, timed_finalize
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    latest = Path(trainer.ckpt_root) / "latest_checkpointed_iteration.txt"
    newest = Path(trainer.ckpt_root) / f"iter_{int(latest.read_text()):07d}" if latest.is_file() else None
    ckpt_bytes = sum(f.stat().st_size for f in newest.iterdir()) if newest is not None else 0
    out.write_text(json.dumps({"mode": mode, "params": params, "steps": steps, "saves": saves, "finalizes": finalizes,
                               "total_s": total, "checkpoint_root_bytes": ckpt_bytes}))


# ----------------------------------------------------------------------------- driver


def _run(mode: str, args, scratch: Path) -> dict:
    out = scratch / f"{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-port=29641",
           str(Path(__file__).resolve()), "--worker", mode, "--iters", str(args.iters),
           "--interval", str(args.interval), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def _summary(run: dict) -> dict:
    # The first steps warm up (allocations, first optimizer step): left out of every mean.
    steps = [s for s in run["steps"] if s["iteration"] > 2]
    behind = [s["seconds"] for s in steps if s["save_in_flight"]]
    clear = [s["seconds"] for s in steps if not s["save_in_flight"]]
    return {"mode": run["mode"], "saves": len(run["saves"]),
            "save_call_s": statistics.mean(run["saves"]) if run["saves"] else None,
            "finalize_s": statistics.mean(run["finalizes"]) if run["finalizes"] else None,
            "step_s_no_save_in_flight": statistics.median(clear) if clear else None,
            "step_s_save_in_flight": statistics.median(behind) if behind else None,
            "steps_with_save_in_flight": len(behind), "total_s": run["total_s"]}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _markdown(result: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [f"| {s['mode']} | {s['saves']} | {fmt(s['save_call_s'])} | {fmt(s['finalize_s'])} | "
            f"{fmt(s['step_s_no_save_in_flight'])} | {fmt(s['step_s_save_in_flight'])} ({s['steps_with_save_in_flight']}) | "
            f"{s['total_s']:.1f} |" for s in result["summary"]]
    return "\n".join([
        "# Asynchronous checkpoints: cost to the training loop (CPU, 1 rank, gloo)",
        "",
        f"Command: `python benchmarks/async_checkpoint.py --iters {result['iters']} "
        f"--interval {result['interval']}`",
        f"Model: {result['params'] / 1e6:.1f}M parameters ({' '.join(MODEL)}), seq 128, global batch 8, fp32 + Adam; "
        f"one checkpoint = {result['checkpoint_mb']:.0f} MB on disk.",
        f"Load before: `{result['uptime_before']}`",
        f"Load after: `{result['uptime_after']}`",
        "",
        "| saves | count | save call (stall) s | publish (finalize) s | step s, no save in flight (median) | "
        "step s, save in flight (median, steps) | run total s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "- save call: the wall time the training loop waits at each save. Synchronous: plan + write + hash +",
        "  publish. Asynchronous: plan + copying this rank's tensors to host memory; the write runs on a",
        "  background thread, and the publish (megatron's `.metadata`, checksums, sidecar, rename, `latest`)",
        "  happens in the finalize at the first step boundary after every rank finished writing.",
        "- step with a save in flight: the steps that ran while the background thread wrote; on a CPU host",
        "  the writer shares the cores (and the GIL for the Python parts) with training, so those steps slow",
        "  down; on a GPU host the step runs on the device and the write on the host.",
        "- Measured on a shared 2-core host with other jobs running: compare rows of this table only.",
        "",
    ])


def main(argv=None) -> None:
    args = _args(argv)
    if args.worker:
        return _worker(args.worker, args.iters, args.interval, args.out)
    before = _uptime()
    with tempfile.TemporaryDirectory(prefix="async-ckpt-bench-") as scratch:
        runs = [_run(mode, args, Path(scratch)) for mode in MODES]
    result = {"iters": args.iters, "interval": args.interval, "params": runs[0]["params"],
              "checkpoint_mb": runs[1]["checkpoint_root_bytes"] / 2**20,
              "uptime_before": before, "uptime_after": _uptime(), "summary": [_summary(r) for r in runs], "runs": runs}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "async_checkpoint.json").write_text(json.dumps(result, indent=1))
    (args.results_dir / "async_checkpoint.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
