"""The experiment's stages: each starts pma-train runs or the merge/eval worker through the launcher.

Every run writes its own directory under cfg.out; a finished run leaves `.done`, so an interrupted
experiment resumes where it stopped. All numbers are read back from the runs' metrics.jsonl and the
worker's results, never computed here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pma_train import metrics
from pma_train.slurm_env import free_port
from pma_train.repro.config import ReproConfig, parse_method


def read_metrics(run_dir: Path, kind: str) -> list[dict]:
    """A run's records of one kind, newest per step (pma_train/metrics.py reads every metrics.jsonl)."""
    return metrics.read_metrics(run_dir / metrics.METRICS_FILE, kind)


def _track_overrides(spec: str) -> list[str]:
    fields = parse_method(spec)
    return [f"track.{k}={v}" for k, v in fields.items()]


class Experiment:
    def __init__(self, cfg: ReproConfig, echo=print):
        self.cfg, self.out, self.echo = cfg, Path(cfg.out).resolve(), echo
        self.wall: dict[str, float] = {}

    # ------------------------------------------------------------------ launching

    def launch(self, module: str, args: list[str], log: Path) -> None:
        # Through bash, so a cluster launcher may use the allocation's variables ($SLURM_NNODES, ...).
        launcher = self.cfg.launcher.format(python=shlex.quote(sys.executable), nproc=self.cfg.nproc,
                                            port=free_port(), module=module)
        cmd = ["bash", "-c", launcher + " " + " ".join(shlex.quote(a) for a in args)]
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(f"{module} failed (exit {proc.returncode}); log {log}:\n{tail}")

    def train(self, name: str, overrides: list[str]) -> Path:
        run_dir = self.out / "runs" / name
        if self.cfg.resume and (run_dir / ".done").exists():
            return run_dir
        self.echo(f"[pma-repro] training {name}")
        base = [f"model={self.cfg.model}", *self.cfg.overrides, f"run.dir={run_dir}", f"run.name={name}",
                f"checkpoint.dir={run_dir / 'checkpoints'}", "logging.progress_bar=false"]
        self.launch("pma_train.cli.train", base + overrides, run_dir / "log.txt")
        (run_dir / ".done").touch()
        return run_dir

    def ckpt(self, run: str, iteration: int) -> Path:
        return self.out / "runs" / run / "checkpoints" / f"iter_{iteration:07d}"

    # ------------------------------------------------------------------ stages

    def constant_run(self, name: str, lr: float) -> Path:
        c = self.cfg
        return self.train(name, [f"train.iters={c.iters}", f"train.lr={lr}", f"checkpoint.interval={c.grid_iters}",
                                 f"train.eval_interval={c.eval_interval}", "track.enabled=true",
                                 f"track.n={c.headline_n}", f"track.v_tokens={c.headline_v_tokens}",
                                 *_track_overrides(c.headline_method)])

    def stage_main(self) -> None:
        self.constant_run("main", self.cfg.lr)

    def stage_low_lr(self) -> None:
        if self.cfg.low_lr is not None:
            self.constant_run("low_lr", self.cfg.low_lr)

    def stage_anneal(self) -> None:
        c = self.cfg
        for point in c.points:
            self.train(f"anneal-{point}", [
                "schedule=anneal", f"schedule.decay_shape={c.anneal_shape}", f"train.iters={point}",
                f"train.lr={c.lr}", f"checkpoint.load={self.ckpt('main', point - c.anneal_iters)}",
                f"checkpoint.interval={c.anneal_iters}", f"train.eval_interval={c.anneal_iters}"])

    def merge_jobs(self) -> list[dict]:
        c = self.cfg
        runs = [("main", c.points, c.methods)]
        if c.low_lr is not None and (self.out / "runs" / "low_lr" / ".done").exists():
            runs.append(("low_lr", c.points[-1:], [c.headline_method]))
        jobs = []
        for run, points, methods in runs:
            for point in points:
                jobs.append({"key": f"{run}@{point}/live", "run": run, "point": point,
                             "checkpoint": str(self.ckpt(run, point))})
                for spec in methods:
                    for n in c.ns:
                        for v in c.v_tokens:
                            job = {"key": f"{run}@{point}/{spec}/n{n}/v{v}", "run": run, "point": point, "spec": spec,
                                   "root": str(self.out / "runs" / run / "checkpoints"), "n": n, "v_tokens": v,
                                   "end_iteration": point, **parse_method(spec)}
                            headline = (spec, n, v) == (c.headline_method, c.headline_n, c.headline_v_tokens)
                            if run == "main" and point == c.points[-1] and headline:
                                job["keep"] = str(self.out / "merged-late")  # PMA-init starts from it
                            jobs.append(job)
        return jobs

    def stage_merges(self) -> None:
        results = self.out / "merges.json"
        if self.cfg.resume and results.exists():
            return
        jobs = self.merge_jobs()
        self.echo(f"[pma-repro] merging and evaluating {len(jobs)} models")
        spec = {"overrides": [f"model={self.cfg.model}", *self.cfg.overrides], "work": str(self.out / "merge-eval"),
                "output": str(results), "jobs": jobs}
        spec_path = self.out / "merge-eval" / "spec.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=2))
        self.launch("pma_train.repro.merge_eval", [str(spec_path)], self.out / "merge-eval" / "log.txt")

    def stage_pma_init(self) -> None:
        c = self.cfg
        late = c.points[-1]
        for name, start in (("pma_init-live", self.ckpt("main", late)), ("pma_init-merged", self.out / "merged-late")):
            self.train(name, [f"checkpoint.init_from={start}", f"train.iters={c.pma_init_iters}", f"train.lr={c.lr}",
                              f"train.eval_interval={c.pma_init_eval_interval}", "train.eval_at_start=true",
                              f"checkpoint.interval={c.pma_init_iters}"])

    def stage_spike(self) -> None:
        c = self.cfg
        if c.spike_at is None:
            return
        fork, end = c.spike_at - c.spike_before, c.spike_at + c.spike_after
        common = [f"checkpoint.load={self.ckpt('main', fork)}", f"train.iters={end}", f"train.lr={c.lr}",
                  f"checkpoint.interval={c.grid_iters}", f"train.eval_interval={c.spike_before + c.spike_after}",
                  "train.log_interval=1"]
        inject = [f"spike.inject_at={c.spike_at}", "spike.inject_iters=3", f"spike.inject_lr_mult={c.spike_lr_mult}"]
        self.train("spike-clean", common)
        self.train("spike-unrecovered", common + inject)
        self.train("spike-recovered", common + inject + ["spike.enabled=true"])

    def run(self) -> None:
        for stage in self.cfg.stages:
            if stage == "report":
                continue
            start = time.perf_counter()
            getattr(self, f"stage_{stage}")()
            self.wall[stage] = round(time.perf_counter() - start, 1)

    # ------------------------------------------------------------------ results

    def collect(self) -> dict:
        """Everything the report states, read from what the runs and the worker wrote."""
        c, runs = self.cfg, self.out / "runs"
        result = {"config": dict(vars(c)), "wall_seconds": self.wall, "curves": {}, "anneal": [], "merges": [],
                  "pma_init": {}, "spike": {}}
        for name in ("main", "low_lr"):
            if (runs / name / ".done").exists():
                result["curves"][name] = [{"iteration": r["step"], "tokens": r["consumed_tokens"], "live": r["loss"],
                                           "merged": r.get("loss_merged")} for r in read_metrics(runs / name, "val")]
        for point in c.points:
            if (runs / f"anneal-{point}" / ".done").exists():
                end = read_metrics(runs / f"anneal-{point}", "val")[-1]
                result["anneal"].append({"point": point, "fork": point - c.anneal_iters, "tokens": end["consumed_tokens"],
                                         "val_loss": end["loss"]})
        if (self.out / "merges.json").exists():
            result["merges"] = json.loads((self.out / "merges.json").read_text())
        for arm in ("live", "merged"):
            run = runs / f"pma_init-{arm}"
            if (run / ".done").exists():
                result["pma_init"][arm] = [{"iteration": r["step"], "val_loss": r["loss"]} for r in read_metrics(run, "val")]
        for arm in ("clean", "unrecovered", "recovered"):
            run = runs / f"spike-{arm}"
            if (run / ".done").exists():
                result["spike"][arm] = {"val_loss": read_metrics(run, "val")[-1]["loss"],
                                        "train": [{"iteration": r["step"], "loss": r["loss"]} for r in read_metrics(run, "train")],
                                        "recoveries": read_metrics(run, "recovery")}
        if (runs / "main" / ".done").exists():
            first = read_metrics(runs / "main", "val")[0]
            result["tokens_per_iter"] = first["consumed_tokens"] // first["step"]
        return result
