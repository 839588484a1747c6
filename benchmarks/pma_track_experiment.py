"""PMA at CPU scale with pma-train's own trainer: the live constant-LR model, the tracked merge and
annealing branches forked from the same run, over tokens; plus the tracker's cost to the train loop.

    python benchmarks/pma_track_experiment.py [--iters 800] [--fork 400 600] [--out benchmarks/results]

Writes pma_track_experiment.{md,json,png}. Every number comes from the runs' metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pma_train.metrics import METRICS_FILE, read_metrics

REPO = Path(__file__).resolve().parents[1]


def run(run_dir: Path, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "pma_train.cli.train", f"run.dir={run_dir}", "logging.progress_bar=false", *overrides]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return read_metrics(run_dir / METRICS_FILE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=800)
    parser.add_argument("--fork", type=int, nargs="+", default=[400, 600])
    parser.add_argument("--anneal-iters", type=int, default=100)
    parser.add_argument("--interval", type=int, default=20, help="checkpoint / merge grid spacing (iterations)")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pma-track-experiment"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    common = ["train.global_batch_size=8", "train.micro_batch_size=4", "train.seq_length=64", f"train.lr={args.lr}",
              "schedule.warmup_iters=20", f"checkpoint.interval={args.interval}", "train.eval_iters=8",
              "train.log_interval=100", "seed=1"]
    live = run(args.work / "live", common + [f"train.iters={args.iters}", f"train.eval_interval={args.interval * 5}",
                                             "track.enabled=true", f"track.n={args.n}"])
    val = [r for r in live if r["kind"] == "val"]
    track = next(r for r in live if r["kind"] == "track")
    branches = {}
    for fork in args.fork:
        rows = run(args.work / f"anneal-{fork}", common + [
            "schedule=anneal", "schedule.decay_shape=1-sqrt", f"train.iters={fork + args.anneal_iters}",
            f"checkpoint.load={args.work / 'live' / 'checkpoints' / f'iter_{fork:07d}'}", "train.eval_interval=100000",
            f"checkpoint.dir={args.work / f'anneal-{fork}' / 'ckpt'}"])
        end = [r for r in rows if r["kind"] == "val"][-1]
        branches[fork] = {"fork_iteration": fork, "end_iteration": end["step"], "tokens": end["consumed_tokens"],
                          "val_loss": end["loss"]}
    tokens_per_iter = val[0]["consumed_tokens"] // val[0]["step"]
    result = {"config": vars(args) | {"work": str(args.work), "out": str(args.out)}, "tokens_per_iter": tokens_per_iter,
              "live_vs_merged": [{"iteration": r["step"], "tokens": r["consumed_tokens"], "live": r["loss"],
                                  "merged": r.get("loss_merged"), "merged_iterations": r.get("merged_iterations")}
                                 for r in val],
              "annealing_branches": list(branches.values()), "track_overhead": track}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pma_track_experiment.json").write_text(json.dumps(result, indent=2))
    lines = ["# PMA at CPU scale: live vs tracked merge vs annealing branch", "",
             f"tiny model (0.47M params), built-in corpus, constant LR {args.lr}, {tokens_per_iter} tokens/iteration, "
             f"merge = SMA of the last {args.n} checkpoints {args.interval} iterations apart; annealing branches decay "
             f"1-sqrt to 0 over {args.anneal_iters} iterations from the fork.", "",
             "| iteration | tokens | live val loss | merged val loss | merged - live |", "|---|---|---|---|---|"]
    for r in result["live_vs_merged"]:
        merged = r["merged"]
        lines.append(f"| {r['iteration']} | {r['tokens']:,} | {r['live']:.4f} | "
                     + (f"{merged:.4f} | {merged - r['live']:+.4f} |" if merged is not None else "- | - |"))
    lines += ["", "| annealing branch | from iteration | to iteration | tokens | val loss | live at the fork | merged at the fork |",
              "|---|---|---|---|---|---|---|"]
    at = {r["iteration"]: r for r in result["live_vs_merged"]}
    for b in branches.values():
        fork = at.get(b["fork_iteration"], {})
        lines.append(f"| 1-sqrt | {b['fork_iteration']} | {b['end_iteration']} | {b['tokens']:,} | {b['val_loss']:.4f} | "
                     f"{fork.get('live', float('nan')):.4f} | {fork.get('merged') or float('nan'):.4f} |")
    lines += ["", f"Tracker cost to the training loop: {track['track_snapshot_seconds']:.3f} s of snapshots in "
                  f"{track['train_step_seconds']:.1f} s of train steps = {100 * track['track_overhead']:.2f}% "
                  "(the merged model's evaluation is extra eval time, not train-step time)."]
    (args.out / "pma_track_experiment.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["tokens"] for r in result["live_vs_merged"]]
    ax.plot(xs, [r["live"] for r in result["live_vs_merged"]], "o-", label="live (constant LR)")
    merged = [(r["tokens"], r["merged"]) for r in result["live_vs_merged"] if r["merged"] is not None]
    ax.plot([m[0] for m in merged], [m[1] for m in merged], "s-", label=f"tracked merge (SMA, N={args.n})")
    ax.scatter([b["tokens"] for b in branches.values()], [b["val_loss"] for b in branches.values()], marker="*",
               s=150, color="C3", label="annealing branch (end)", zorder=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("PMA at CPU scale (pma-train, built-in corpus)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "pma_track_experiment.png", dpi=120)
    print((args.out / "pma_track_experiment.md").read_text())


if __name__ == "__main__":
    main()
