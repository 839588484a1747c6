"""The benchmark's phases, in the order merge_throughput.py runs them; each returns its part of the results."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import merge_startup  # benchmarks/: the lean path's start-up and memory figures
from merge_bench.common import GB, MiB, SCRIPT, checkpoint_files, child_env, median, parse, read_all, run, torchrun
from merge_bench.profiling import summarise_py_spy


@dataclass
class Bench:
    args: object  # merge_throughput's parsed options
    root: Path  # the input checkpoints
    work: Path  # outputs and scratch of this run
    files: list[Path]  # the .distcp files of the N newest inputs
    log: Callable[[str], None]
    merge_args: Callable[[Path, Path], list[str]]  # (root, out) -> pma-merge's arguments
    cli_commands: Callable[[Path, Path], list[tuple[str, list[str], str]]]  # (root, out) -> (label, argv, shown)

    @property
    def out(self) -> Path:
        return self.work / "out"

    def warm(self) -> None:
        """Every input of the run read once, so the phase that follows finds them in the page cache."""
        read_all(checkpoint_files(self.root, max(self.args.sweep)))


def raw_read(b: Bench) -> dict:
    b.warm()
    seconds = [read_all(b.files)[1] for _ in range(3)]
    nbytes = sum(f.stat().st_size for f in b.files)
    result = {"seconds": seconds, "gbps_median": nbytes / median(seconds) / GB, "block_mib": 16}
    b.log(f"raw read: {result['gbps_median']:.2f} GB/s (median of 3, warm cache)")
    return result


def _engine_job(b: Bench, ranks: int, threads: int, cfgs: list[dict], tag: dict) -> list[dict]:
    b.warm()
    proc, wall = run(torchrun(ranks) + [str(SCRIPT), "_engine", "--root", str(b.root), "--out", str(b.out),
                                        "--configs", json.dumps(cfgs)], env=child_env(threads))
    return [{**tag, "ranks": ranks, "job_wall_s": wall, **row} for row in parse(proc, "ENGINE")]


def rounds(b: Bench) -> tuple[list[dict], list[dict]]:
    """Rounds of (engine 1 rank, engine 2 ranks, the two whole commands), so machine noise hits all alike."""
    a = b.args
    engine_runs, cli_runs = [], []
    headline = [{"n": a.n, "budget_mb": x} for x in a.budget_list]
    for round_ in range(a.rounds):
        # Budgets in alternating order (the second merge of a job finds a warmer heap). A 1-rank job
        # with 2 OpenMP threads (what plain `pma-merge` gets on 2 cores) once, at the headline config.
        order = headline if round_ % 2 == 0 else headline[::-1]
        jobs = [(1, 1, order), (2, 1, order)] + ([(1, 2, headline[:1])] if round_ == 0 and not a.quick else [])
        for ranks, threads, cfgs in jobs:
            rows = _engine_job(b, ranks, threads, cfgs, {"phase": "rounds", "round": round_})
            engine_runs += rows
            first = next(r for r in rows if r["budget_mb"] == a.budget_list[0])
            b.log(f"round {round_ + 1}/{a.rounds}: engine {ranks} rank(s) x {threads} thread(s), N={a.n}: "
                  f"{first['read_gbps']:.2f} GB/s ({first['seconds']:.2f} s; job {first['job_wall_s']:.1f} s)")
        for label, cmd, shown in b.cli_commands(b.root, b.out):
            b.warm()
            proc, wall = run(cmd)
            merged = json.loads(next(b.out.glob("iter_*/pma_merge.json")).read_text())["summary"]
            line = next((x for x in proc.stdout.splitlines() if x.startswith("merged ")), "")
            cli_runs.append({"round": round_, "label": label, "command": shown, "wall_s": wall, "summary": merged,
                             "stdout_line": line})
            shutil.rmtree(b.out, ignore_errors=True)
            b.log(f"round {round_ + 1}/{a.rounds}: {label}: wall {wall:.1f} s, engine {merged['seconds']:.2f} s "
                  f"({merged['read_gbps']:.2f} GB/s)")
    return engine_runs, cli_runs


def rss_sweep(b: Bench) -> list[dict]:
    """Peak RSS vs N: one fresh 2-rank job per (budget, N), so no merge inherits another's heap."""
    rows = []
    for budget in (b.args.budget_list[:1] if b.args.quick else b.args.budget_list):
        for n in b.args.sweep:
            row = _engine_job(b, 2, 1, [{"n": n, "budget_mb": budget}], {"phase": "rss"})[0]
            rows.append(row)
            b.log(f"RSS sweep, 2 ranks, budget {budget} MiB, N={n}: growth per rank "
                  f"{[round(r['rss_growth'] / MiB) for r in row['per_rank']]} MiB, {row['read_gbps']:.2f} GB/s")
    return rows


def startup(b: Bench) -> tuple[dict, dict]:
    """The start-up parts alone, and the lean path's figures (dry-run wall, whole-process memory per rank)."""
    proc, _ = run([sys.executable, str(SCRIPT), "_imports"])
    imports = parse(proc, "IMPORTS")
    _, interp = run([sys.executable, "-c", "pass"])
    _, noop = run(torchrun(2) + [str(SCRIPT), "_noop"])
    args = b.merge_args(b.root, b.out)
    plain = b.cli_commands(b.root, b.out)[1][1]
    b.warm()
    lean = merge_startup.measure(run, torchrun(2), plain[:-len(args)], args, b.out)
    b.log(f"lean path: dry run {lean['dry_run_s_median']:.2f} s, peak RSS per rank "
          f"{[round(r['VmHWM'] / MiB) for r in lean['ranks']]} MiB")
    return ({"imports": imports, "bare_interpreter_s": interp, "torchrun_2_noop_s": noop,
             "pma_merge_dry_run_s": lean["dry_run_s_median"]}, lean)


def naive(b: Bench) -> list[dict]:
    """One process that loads every input whole (dcp_to_torch_save + torch.load), for reference."""
    rows = []
    for n in ([b.args.n] if b.args.quick else b.args.sweep):
        b.warm()
        proc, wall = run([sys.executable, str(SCRIPT), "_naive", "--root", str(b.root), "--count", str(n),
                          "--scratch", str(b.work / "naive")])
        row = {**parse(proc, "NAIVE"), "wall_s": wall}
        rows.append(row)
        b.log(f"naive N={n}: {row['seconds']:.1f} s, peak RSS {row['peak_rss'] / MiB:.0f} MiB")
    return rows


def profile(b: Bench) -> dict:
    """The timed 1-rank merge (and a py-spy sampled one when py-spy is installed and allowed)."""
    a = b.args
    cmd = [str(SCRIPT), "_profile", "--root", str(b.root), "--out", str(b.work / "prof"), "--count", str(a.n),
           "--budget-mb", str(a.budget_list[0])]
    b.warm()
    proc, _ = run([sys.executable] + cmd)
    result = {"profile": parse(proc, "PROFILE")}
    b.log(f"profile: {result['profile']['read_gbps']:.2f} GB/s with timers")
    beside = Path(sys.executable).parent / "py-spy"
    spy = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if a.py_spy == "auto" and spy:
        b.warm()
        raw_out = b.work / "py-spy.txt"
        proc, _ = run([spy, "record", "-r", "100", "-n", "-f", "raw", "-o", str(raw_out), "--", sys.executable,
                       *cmd, "--plain"])
        result["py_spy"] = {**summarise_py_spy(raw_out), "plain_run": parse(proc, "PROFILE")}
        b.log("py-spy profile done")
    return result
